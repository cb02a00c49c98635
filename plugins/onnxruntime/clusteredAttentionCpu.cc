// CPU kernel of CHAI clustered attention, float32. Per (batch, cluster, query row): the cluster's query
// against its one K head and a two-pass softmax; then P.V for every head of the cluster (decode spreads
// these over the pool per head). K is read once per cluster and V once per distinct V head of a cluster. Hot loops are vectorised by the
// compiler (omp simd) and cloned per ISA (target_clones) so one binary runs everywhere at full width.

#include "clusteredAttentionCpu.h"
#include "clusteredAttentionCpuMath.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace chai
{
namespace
{

template <typename M>
bool attends(void const* mask, size_t i)
{
    return static_cast<M const*>(mask)[i] != 0;
}

struct Row
{
    size_t b, kend; // batch index, keys [0, kend) considered
    int c, s;       // cluster, query row
};

Row rowOf(ChaiClusteredAttentionParams const& p, size_t row)
{
    int const S = p.seq_len, C = p.num_clusters;
    Row r{};
    r.s = static_cast<int>(row % S);
    r.c = static_cast<int>((row / S) % C);
    r.b = row / (static_cast<size_t>(S) * C);
    size_t const T = static_cast<size_t>(p.past_len) + S;
    r.kend = p.causal ? std::min(T, static_cast<size_t>(p.past_len) + r.s + 1) : T;
    return r;
}

size_t cacheRows(ChaiClusteredAttentionParams const& p)
{
    return p.share_buffer ? static_cast<size_t>(p.cache_len) : static_cast<size_t>(p.past_len) + p.seq_len;
}

// Softmax weights of one query row of one cluster, unnormalised, into w[0, kend); returns 1/sum (0 when no
// key is attended: the row's outputs are then zeros).
CHAI_CLONES float weights(ChaiClusteredAttentionParams const& p, size_t row, Row const& r, float* w)
{
    int const d = p.head_dim;
    size_t const T = static_cast<size_t>(p.past_len) + p.seq_len;
    float const* q = static_cast<float const*>(p.query) + row * d;
    float const* K = static_cast<float const*>(p.present_key)
        + (r.b * p.num_k_heads + p.k_head_index[r.c]) * cacheRows(p) * d;
    bool const wide = p.mask_dtype == CHAI_MASK_INT64;
    float mx = -INFINITY;
    for (size_t j = 0; j < r.kend; ++j)
    {
        bool const on = wide ? attends<int64_t>(p.attention_mask, r.b * T + j)
                             : attends<int32_t>(p.attention_mask, r.b * T + j);
        float acc = 0.f;
        float const* k = K + j * d;
#pragma omp simd reduction(+ : acc)
        for (int e = 0; e < d; ++e)
            acc += q[e] * k[e];
        w[j] = on ? acc * p.scale : -INFINITY;
        mx = std::max(mx, w[j]);
    }
    if (mx == -INFINITY)
        return 0.f;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < r.kend; ++j)
    {
        float const e = expNonPositive(w[j] - mx); // -inf - mx clamps to exp(-87) ~ 1e-38, then:
        w[j] = w[j] == -INFINITY ? 0.f : e;
        sum += w[j];
    }
    return 1.f / sum;
}

// out[0, d) = inv * sum_j w[j] V_h[j] for head h of batch b.
CHAI_CLONES void weightedSum(ChaiClusteredAttentionParams const& p, size_t b, int h, float const* w, size_t kend,
    float inv, float* out)
{
    int const d = p.head_dim;
    float const* V = static_cast<float const*>(p.present_value)
        + (b * p.num_v_heads + p.v_head_index[h]) * cacheRows(p) * d;
#pragma omp simd
    for (int e = 0; e < d; ++e)
        out[e] = 0.f;
    if (inv == 0.f)
        return;
    for (size_t j = 0; j < kend; ++j)
    {
        float const wj = w[j];
        if (wj == 0.f) // masked keys may hold anything (padding): keep them out of the sum
            continue;
        float const* v = V + j * d;
#pragma omp simd
        for (int e = 0; e < d; ++e)
            out[e] += wj * v[e];
    }
#pragma omp simd
    for (int e = 0; e < d; ++e)
        out[e] *= inv;
}

// An earlier head of h's cluster that reads the same V head (its output is h's: same P, same V), else -1.
// Why: grouped-query clusters often hold several heads of one KV group; their P.V is computed once.
int sameAsEarlier(ChaiClusteredAttentionParams const& p, int c, int h)
{
    for (int e = p.cluster_offsets[c]; e < h; ++e)
        if (p.v_head_index[e] == p.v_head_index[h])
            return e;
    return -1;
}

float* outputRow(ChaiClusteredAttentionParams const& p, size_t b, int s)
{
    return static_cast<float*>(p.output) + (b * p.seq_len + s) * static_cast<size_t>(p.num_heads) * p.head_dim;
}

// General path: one task per (batch, cluster, query row): weights, then P.V for each head of the cluster.
struct RowTask
{
    ChaiClusteredAttentionParams const* p;
};

void rowTask(void* ctx, size_t row)
{
    ChaiClusteredAttentionParams const& p = *static_cast<RowTask*>(ctx)->p;
    thread_local std::vector<float> w; // why thread_local: one allocation per pool thread, not per row
    w.resize(static_cast<size_t>(p.past_len) + p.seq_len);
    Row const r = rowOf(p, row);
    float const inv = weights(p, row, r, w.data());
    float* out = outputRow(p, r.b, r.s);
    size_t const d = p.head_dim;
    for (int h = p.cluster_offsets[r.c]; h < p.cluster_offsets[r.c + 1]; ++h)
    {
        int const same = sameAsEarlier(p, r.c, h);
        if (same >= 0)
            memcpy(out + h * d, out + same * d, d * sizeof(float));
        else
            weightedSum(p, r.b, h, w.data(), r.kend, inv, out + h * d);
    }
}

// Decode (S == 1): B*C rows give few tasks (3-5 per sequence on SmolLM2), too few to share out the P.V work,
// which is most of it. So: phase 1, one task per (batch, cluster) writes its weights to a shared buffer;
// phase 2, one task per (batch, head) does that head's P.V.
struct DecodeTask
{
    ChaiClusteredAttentionParams const* p;
    float* w;   // [B*C, T] weights
    float* inv; // [B*C]
    int const* clusterOf;
};

void decodeWeightsTask(void* ctx, size_t row)
{
    DecodeTask const& t = *static_cast<DecodeTask*>(ctx);
    size_t const T = static_cast<size_t>(t.p->past_len) + 1;
    t.inv[row] = weights(*t.p, row, rowOf(*t.p, row), t.w + row * T);
}

void decodeHeadTask(void* ctx, size_t i)
{
    DecodeTask const& t = *static_cast<DecodeTask*>(ctx);
    ChaiClusteredAttentionParams const& p = *t.p;
    size_t const b = i / p.num_heads;
    int const h = static_cast<int>(i % p.num_heads), c = t.clusterOf[h];
    if (sameAsEarlier(p, c, h) >= 0)
        return; // copied after this phase
    size_t const row = b * p.num_clusters + c, T = static_cast<size_t>(p.past_len) + 1;
    weightedSum(p, b, h, t.w + row * T, rowOf(p, row).kend, t.inv[row], outputRow(p, b, 0) + h * size_t(p.head_dim));
}

void decode(ChaiClusteredAttentionParams const& p, ParallelFor parallelFor, void* runner)
{
    size_t const T = static_cast<size_t>(p.past_len) + 1, rows = static_cast<size_t>(p.batch) * p.num_clusters;
    std::vector<float> w(rows * T), inv(rows);
    std::vector<int> clusterOf(p.num_heads);
    for (int c = 0; c < p.num_clusters; ++c)
        for (int h = p.cluster_offsets[c]; h < p.cluster_offsets[c + 1]; ++h)
            clusterOf[h] = c;
    DecodeTask task{&p, w.data(), inv.data(), clusterOf.data()};
    parallelFor(runner, decodeWeightsTask, rows, &task);
    parallelFor(runner, decodeHeadTask, static_cast<size_t>(p.batch) * p.num_heads, &task);
    size_t const d = p.head_dim;
    for (size_t b = 0; b < static_cast<size_t>(p.batch); ++b)
        for (int h = 0; h < p.num_heads; ++h)
        {
            int const same = sameAsEarlier(p, clusterOf[h], h);
            if (same >= 0)
                memcpy(outputRow(p, b, 0) + h * d, outputRow(p, b, 0) + same * d, d * sizeof(float));
        }
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
    if (p.ring_window > 0 || p.span_sinks != nullptr)
        return clusteredAttentionSpanCpu(p, parallelFor, runner);
    if (p.share_buffer && static_cast<long long>(p.past_len) + p.seq_len > p.cache_len)
        return CHAI_ERR_INVALID_ARGUMENT;
    size_t const T = static_cast<size_t>(p.past_len) + p.seq_len;
    size_t const presentRows = p.share_buffer ? static_cast<size_t>(p.cache_len) : T;
    size_t const pastRows = p.share_buffer ? presentRows : static_cast<size_t>(p.past_len);
    writeCache(p.present_key, p.past_key, p.key, static_cast<size_t>(p.batch) * p.num_k_heads, p.past_len, p.seq_len,
        pastRows, presentRows, p.head_dim);
    writeCache(p.present_value, p.past_value, p.value, static_cast<size_t>(p.batch) * p.num_v_heads, p.past_len,
        p.seq_len, pastRows, presentRows, p.head_dim);
    if (p.seq_len == 1)
    {
        decode(p, parallelFor, runner);
        return CHAI_OK;
    }
    RowTask task{&p};
    parallelFor(runner, rowTask, static_cast<size_t>(p.batch) * p.num_clusters * p.seq_len, &task);
    return CHAI_OK;
}

} // namespace chai
