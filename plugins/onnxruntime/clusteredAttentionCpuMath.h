// Helpers shared by the CPU kernel's two paths (clusteredAttentionCpu.cc, clusteredAttentionSpanCpu.cc).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace chai
{

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHAI_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define CHAI_CLONES
#endif

// exp(x) for x <= 0 (softmax after the max is subtracted): 2^n * poly(r), |r| <= ln2/2, relative error
// < 2e-7. Why not expf: libm's scalar call blocks vectorisation of the softmax loop.
inline float expNonPositive(float x)
{
    x = x < -87.f ? -87.f : x;
    float const n = floorf(x * 1.44269504f + 0.5f);
    float const r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t const bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

} // namespace chai
