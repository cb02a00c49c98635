// CPU kernel of CHAI clustered attention, float32. One task per (batch, cluster, query row): the
// cluster's query against its one K head, a two-pass softmax, then P.V for every head of the cluster.
// K is read once per cluster and V once per head, as on the GPU. Hot loops are vectorised by the
// compiler (omp simd) and cloned per ISA (target_clones) so one binary runs everywhere at full width.

#include "clusteredAttentionCpu.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace chai
{
namespace
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

struct Task
{
    ChaiClusteredAttentionParams const* p;
};

template <typename M>
bool attends(void const* mask, size_t i)
{
    return static_cast<M const*>(mask)[i] != 0;
}

// One query row of one cluster. scores has room for P+S floats.
CHAI_CLONES void attendRow(ChaiClusteredAttentionParams const& p, size_t row, float* scores)
{
    int const d = p.head_dim, S = p.seq_len, C = p.num_clusters;
    size_t const T = static_cast<size_t>(p.past_len) + S;
    size_t const Tc = p.share_buffer ? static_cast<size_t>(p.cache_len) : T;
    int const s = static_cast<int>(row % S);
    int const c = static_cast<int>((row / S) % C);
    size_t const b = row / (static_cast<size_t>(S) * C);
    size_t const kend = p.causal ? std::min(T, static_cast<size_t>(p.past_len) + s + 1) : T;

    float const* q = static_cast<float const*>(p.query) + row * d;
    float const* K = static_cast<float const*>(p.present_key) + (b * p.num_k_heads + p.k_head_index[c]) * Tc * d;
    bool const wide = p.mask_dtype == CHAI_MASK_INT64;
    size_t const maskRow = b * T;

    float mx = -INFINITY;
    for (size_t j = 0; j < kend; ++j)
    {
        bool const on = wide ? attends<int64_t>(p.attention_mask, maskRow + j)
                             : attends<int32_t>(p.attention_mask, maskRow + j);
        float acc = 0.f;
        float const* k = K + j * d;
#pragma omp simd reduction(+ : acc)
        for (int e = 0; e < d; ++e)
            acc += q[e] * k[e];
        scores[j] = on ? acc * p.scale : -INFINITY;
        mx = std::max(mx, scores[j]);
    }
    int const h0 = p.cluster_offsets[c], h1 = p.cluster_offsets[c + 1];
    float* out = static_cast<float*>(p.output) + (b * S + s) * static_cast<size_t>(p.num_heads) * d;
    if (mx == -INFINITY) // no attended key: zeros, as the contract says
    {
        memset(out + static_cast<size_t>(h0) * d, 0, sizeof(float) * (h1 - h0) * d);
        return;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < kend; ++j)
    {
        float const e = expNonPositive(scores[j] - mx); // -inf - mx clamps to exp(-87) ~ 1e-38, then:
        scores[j] = scores[j] == -INFINITY ? 0.f : e;
        sum += scores[j];
    }
    float const inv = 1.f / sum;
    for (int h = h0; h < h1; ++h)
    {
        float const* V = static_cast<float const*>(p.present_value) + (b * p.num_v_heads + p.v_head_index[h]) * Tc * d;
        float* o = out + static_cast<size_t>(h) * d;
#pragma omp simd
        for (int e = 0; e < d; ++e)
            o[e] = 0.f;
        for (size_t j = 0; j < kend; ++j)
        {
            float const w = scores[j];
            if (w == 0.f) // masked keys may hold anything (padding): keep them out of the sum
                continue;
            float const* v = V + j * d;
#pragma omp simd
            for (int e = 0; e < d; ++e)
                o[e] += w * v[e];
        }
#pragma omp simd
        for (int e = 0; e < d; ++e)
            o[e] *= inv;
    }
}

void rowTask(void* ctx, size_t row)
{
    ChaiClusteredAttentionParams const& p = *static_cast<Task*>(ctx)->p;
    thread_local std::vector<float> scores; // why thread_local: one allocation per pool thread, not per row
    scores.resize(static_cast<size_t>(p.past_len) + p.seq_len);
    attendRow(p, row, scores.data());
}

// All rows of past into present (unless they are one buffer: then nothing), then the S new rows at P.
void writeCache(void* present, void const* past, void const* cur, size_t rowsBH, size_t P, size_t S, size_t pastRows,
    size_t presentRows, size_t d)
{
    size_t const row = d * sizeof(float);
    for (size_t i = 0; i < rowsBH; ++i)
    {
        char* dst = static_cast<char*>(present) + i * presentRows * row;
        if (pastRows > 0 && present != past)
            memcpy(dst, static_cast<char const*>(past) + i * pastRows * row, pastRows * row);
        memcpy(dst + P * row, static_cast<char const*>(cur) + i * S * row, S * row);
    }
}

} // namespace

int clusteredAttentionCpu(ChaiClusteredAttentionParams const& p, ParallelFor parallelFor, void* runner)
{
    if (p.dtype != CHAI_DTYPE_FLOAT32)
        return CHAI_ERR_UNSUPPORTED;
    if (p.share_buffer && static_cast<long long>(p.past_len) + p.seq_len > p.cache_len)
        return CHAI_ERR_INVALID_ARGUMENT;
    size_t const T = static_cast<size_t>(p.past_len) + p.seq_len;
    size_t const presentRows = p.share_buffer ? static_cast<size_t>(p.cache_len) : T;
    size_t const pastRows = p.share_buffer ? presentRows : static_cast<size_t>(p.past_len);
    writeCache(p.present_key, p.past_key, p.key, static_cast<size_t>(p.batch) * p.num_k_heads, p.past_len, p.seq_len,
        pastRows, presentRows, p.head_dim);
    writeCache(p.present_value, p.past_value, p.value, static_cast<size_t>(p.batch) * p.num_v_heads, p.past_len,
        p.seq_len, pastRows, presentRows, p.head_dim);
    Task task{&p};
    parallelFor(runner, rowTask, static_cast<size_t>(p.batch) * p.num_clusters * p.seq_len, &task);
    return CHAI_OK;
}

} // namespace chai
