// The CPU kernel's span path (float32): a node with a ring cache (ring_window > 0) or per-cluster spans. Contract:
// chai_compile/kernels/fused_op.py; float64 reference: chai_compile/kernels/fused_span.py.
//
// Every key gets its sequence's real-token index (-1: padding, an empty ring row): the past's rows from the mask's
// ones before the new tokens (a ring row by the ring rule of chai_compile/kernels/span_ring.py), the new rows
// from the mask. One task per (batch, cluster, query row) scores only the keys its span allows, then P.V for the
// cluster's heads. The keys are read from past_* and the new key/value inputs, and the caches are written only
// after every row is done: a chunk's queries still see the ring rows its own later tokens overwrite, and an
// in-place buffer (present == past) is safe to write.

#include "clusteredAttentionCpu.h"
#include "clusteredAttentionCpuMath.h"

#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace chai
{
namespace
{

struct SpanCall
{
    ChaiClusteredAttentionParams const* p;
    size_t pastKeys;   // past rows read as keys: every row of a ring, the P valid ones of a full-length cache
    size_t pastStride; // rows per head of the past_* tensors
    size_t presentRows;
    std::vector<int64_t> keyIndex;   // [B, pastKeys + S]
    std::vector<int64_t> queryIndex; // [B, S]
    std::vector<int64_t> realAfter;  // [B] real tokens once the call's are in
};

bool maskOn(ChaiClusteredAttentionParams const& p, size_t b, size_t t)
{
    size_t const i = b * (static_cast<size_t>(p.past_len) + p.seq_len) + t;
    return p.mask_dtype == CHAI_MASK_INT64 ? static_cast<int64_t const*>(p.attention_mask)[i] != 0
                                           : static_cast<int32_t const*>(p.attention_mask)[i] != 0;
}

// The real token ring row j holds after r real tokens, -1 when empty (span_ring.row_index).
int64_t ringRow(int64_t j, int64_t r, int64_t sinks, int64_t window)
{
    if (j >= std::min(r, sinks + window))
        return -1;
    return j < sinks ? j : r - 1 - (r - 1 - j) % window;
}

// The row of real token r (span_ring.slot).
int64_t ringSlot(int64_t r, int64_t sinks, int64_t window)
{
    return r < sinks ? r : sinks + (r - sinks) % window;
}

void indices(SpanCall& c)
{
    ChaiClusteredAttentionParams const& p = *c.p;
    size_t const B = p.batch, S = p.seq_len, P = p.past_len, E = c.pastKeys + S;
    c.keyIndex.assign(B * E, -1);
    c.queryIndex.assign(B * S, -1);
    c.realAfter.assign(B, 0);
    for (size_t b = 0; b < B; ++b)
    {
        int64_t r = 0;
        for (size_t t = 0; t < P; ++t)
            if (maskOn(p, b, t))
            {
                if (p.ring_window == 0)
                    c.keyIndex[b * E + t] = r;
                ++r;
            }
        if (p.ring_window > 0)
            for (size_t j = 0; j < c.pastKeys; ++j)
                c.keyIndex[b * E + j] = ringRow(static_cast<int64_t>(j), r, p.ring_sinks, p.ring_window);
        for (size_t s = 0; s < S; ++s)
            if (maskOn(p, b, P + s))
                c.keyIndex[b * E + c.pastKeys + s] = c.queryIndex[b * S + s] = r++;
        c.realAfter[b] = r;
    }
}

float const* row(SpanCall const& c, void const* past, void const* cur, int heads, size_t b, int h, size_t e)
{
    ChaiClusteredAttentionParams const& p = *c.p;
    size_t const bh = b * heads + h, d = p.head_dim;
    if (e < c.pastKeys)
        return static_cast<float const*>(past) + (bh * c.pastStride + e) * d;
    return static_cast<float const*>(cur) + (bh * p.seq_len + (e - c.pastKeys)) * d;
}

CHAI_CLONES void spanRow(void* ctx, size_t task)
{
    SpanCall const& c = *static_cast<SpanCall const*>(ctx);
    ChaiClusteredAttentionParams const& p = *c.p;
    size_t const S = p.seq_len, E = c.pastKeys + S, d = p.head_dim;
    size_t const s = task % S, b = task / (S * p.num_clusters);
    int const cl = static_cast<int>((task / S) % p.num_clusters);
    int64_t const i = c.queryIndex[b * S + s];
    int64_t const sinks = p.span_sinks ? p.span_sinks[cl] : 0, window = p.span_window ? p.span_window[cl] : 0;
    thread_local std::vector<float> w; // why thread_local: one allocation per pool thread, not per row
    w.resize(E);
    float const* q = static_cast<float const*>(p.query) + ((b * p.num_clusters + cl) * S + s) * d;
    float mx = -INFINITY;
    for (size_t e = 0; e < E; ++e)
    {
        int64_t const j = c.keyIndex[b * E + e];
        w[e] = -INFINITY;
        if (i < 0 || j < 0 || j > i || (window > 0 && j >= sinks && j <= i - window))
            continue;
        float const* k = row(c, p.past_key, p.key, p.num_k_heads, b, p.k_head_index[cl], e);
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (size_t x = 0; x < d; ++x)
            acc += q[x] * k[x];
        w[e] = acc * p.scale;
        mx = std::max(mx, w[e]);
    }
    float sum = 0.f;
    for (size_t e = 0; e < E; ++e)
    {
        w[e] = w[e] == -INFINITY ? 0.f : expNonPositive(w[e] - mx);
        sum += w[e];
    }
    float* out = static_cast<float*>(p.output) + (b * S + s) * static_cast<size_t>(p.num_heads) * d;
    for (int h = p.cluster_offsets[cl]; h < p.cluster_offsets[cl + 1]; ++h)
    {
        float* o = out + h * d;
#pragma omp simd
        for (size_t x = 0; x < d; ++x)
            o[x] = 0.f;
        if (mx == -INFINITY) // no attended key: zeros (the reference's masked-row rule)
            continue;
        for (size_t e = 0; e < E; ++e)
        {
            float const we = w[e];
            if (we == 0.f) // masked keys may hold anything (padding, empty rows): keep them out of the sum
                continue;
            float const* v = row(c, p.past_value, p.value, p.num_v_heads, b, p.v_head_index[h], e);
#pragma omp simd
            for (size_t x = 0; x < d; ++x)
                o[x] += we * v[x];
        }
        float const inv = 1.f / sum;
#pragma omp simd
        for (size_t x = 0; x < d; ++x)
            o[x] *= inv;
    }
}

// present_* after the call: the past rows (unless present is the past buffer itself), zeros past them, then the
// new rows: at P (full-length cache) or, for the tokens the ring keeps, at their ring rows.
void writeCache(SpanCall const& c, void* present, void const* past, void const* cur, int heads)
{
    ChaiClusteredAttentionParams const& p = *c.p;
    size_t const S = p.seq_len, d = p.head_dim, rowBytes = d * sizeof(float);
    size_t const copied = std::min(c.pastStride, c.presentRows);
    for (size_t b = 0; b < static_cast<size_t>(p.batch); ++b)
        for (int h = 0; h < heads; ++h)
        {
            size_t const bh = b * heads + h;
            float* dst = static_cast<float*>(present) + bh * c.presentRows * d;
            if (present != past)
            {
                if (copied > 0)
                    memcpy(dst, static_cast<float const*>(past) + bh * c.pastStride * d, copied * rowBytes);
                memset(dst + copied * d, 0, (c.presentRows - copied) * rowBytes);
            }
            for (size_t s = 0; s < S; ++s)
            {
                int64_t const r = c.queryIndex[b * S + s];
                size_t at = p.past_len + s; // full-length cache: every slot, padding included
                if (p.ring_window > 0)
                {
                    if (r < 0 || (r >= p.ring_sinks && r < c.realAfter[b] - p.ring_window))
                        continue; // padding, or dropped before the call ends
                    at = ringSlot(r, p.ring_sinks, p.ring_window);
                }
                memcpy(dst + at * d, static_cast<float const*>(cur) + (bh * S + s) * d, rowBytes);
            }
        }
}

} // namespace

int clusteredAttentionSpanCpu(ChaiClusteredAttentionParams const& p, ParallelFor parallelFor, void* runner)
{
    size_t const P = p.past_len, S = p.seq_len, N = static_cast<size_t>(p.ring_sinks) + p.ring_window;
    SpanCall c{&p, 0, 0, 0, {}, {}, {}};
    if (p.ring_window > 0)
    {
        if (p.share_buffer ? static_cast<size_t>(p.cache_len) < std::min(P + S, N)
                           : static_cast<size_t>(p.cache_len) != std::min(P, N))
            return CHAI_ERR_INVALID_ARGUMENT;
        c.pastKeys = c.pastStride = p.cache_len;
        c.presentRows = p.share_buffer ? p.cache_len : std::min(P + S, N);
    }
    else
    {
        if (p.share_buffer && P + S > static_cast<size_t>(p.cache_len))
            return CHAI_ERR_INVALID_ARGUMENT;
        c.pastKeys = P;
        c.pastStride = p.share_buffer ? p.cache_len : P;
        c.presentRows = p.share_buffer ? p.cache_len : P + S;
    }
    indices(c);
    parallelFor(runner, spanRow, static_cast<size_t>(p.batch) * p.num_clusters * S, &c);
    writeCache(c, p.present_key, p.past_key, p.key, p.num_k_heads);
    writeCache(c, p.present_value, p.past_value, p.value, p.num_v_heads);
    return CHAI_OK;
}

} // namespace chai
