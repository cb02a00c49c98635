// CHAI clustered attention: CUDA kernels and the C entry point the TensorRT plugin's enqueue calls.
// See clusteredAttentionKernel.h for the semantics and the argument layout.
//
// Plan of one call (a split-K "flash-decoding" kernel; prefill runs the same kernel, one block per row):
//   1. Concat contract (or in place with distinct buffers): the past rows are copied into present_* with
//      cudaMemcpy2DAsync. The S new rows are NOT copied there: the attention kernel's blocks write them
//      (a grid-stride copy at their start) and read key/value rows >= P straight from the `key`/`value`
//      inputs, so no block depends on another block's write and the in-place step is a single launch.
//   2. Attention grid: x = (batch, cluster, query row, V-head chunk), y = split of the key range.
//      Each block scores its cluster's one query against its one K head over 64-key tiles (groups of
//      lanes per key, 16-byte loads, shuffle reductions), keeps an online softmax in fp32 (log2
//      domain), and accumulates P.V for the cluster's DISTINCT V heads: members of a cluster that read
//      the same V head share one accumulation, written to each of them at the end. A K row is read
//      once per (cluster, split) and a V row once per (split, V head), the CHAI byte floor; the only
//      exception is a cluster with more distinct V heads than one block holds (16 at d=128 in
//      fp16/bf16), whose K rows are then read once per chunk of heads.
//   3. With more than one split, a merge kernel combines the per-split (max, sum, accumulator) triples
//      from the workspace (size: chaiClusteredAttentionWorkspaceSize, the only place it is computed).

#include "clusteredAttentionKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include <type_traits>

namespace
{

constexpr int kThreads = 256;
constexpr int kTile = 64;            // most keys per online-softmax step
constexpr int kPrefetch = 4;         // V rows one thread loads per step, all issued before the scores
constexpr int kMaxSplits = 256;      // bounds the merge kernel's weight table
constexpr int kMaxSplitRows = 1024;  // cap on (query rows x splits): bounds the workspace
constexpr int kMinTilesPerSplit = 2; // a split shorter than this costs more in merging than it saves
constexpr int kBlocksPerSm = 3;      // resident blocks per SM (caps registers at 80: no spills); splits aim at this
constexpr int kMergeThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// VEC elements = one 16-byte load (8 half/bf16, 4 float) on the vector path, 1 on the fallback path.
template <typename T, bool kVec>
__host__ __device__ constexpr int vecOf()
{
    return kVec ? 16 / static_cast<int>(sizeof(T)) : 1;
}

// One VEC-element piece as loaded from memory (16 bytes, or one element): loads are issued into these raw
// registers first and converted later, so four pieces in flight cost 16 registers, not 32 floats.
template <typename T, int VEC>
using Raw = std::conditional_t<VEC == 1, T, uint4>;

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> loadRaw(T const* ptr)
{
    return *reinterpret_cast<Raw<T, VEC> const*>(ptr);
}

template <typename T, int VEC>
__device__ __forceinline__ void toFloat(Raw<T, VEC> const& raw, float (&out)[VEC])
{
    if constexpr (VEC == 1)
    {
        if constexpr (std::is_same_v<T, float>)
            out[0] = raw;
        else if constexpr (std::is_same_v<T, __half>)
            out[0] = __half2float(raw);
        else
            out[0] = __bfloat162float(raw);
    }
    else if constexpr (std::is_same_v<T, float>)
        out[0] = __uint_as_float(raw.x), out[1] = __uint_as_float(raw.y), out[2] = __uint_as_float(raw.z),
        out[3] = __uint_as_float(raw.w);
    else
    {
        uint32_t const w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            float2 f;
            if constexpr (std::is_same_v<T, __half>)
                f = __half22float2(*reinterpret_cast<__half2 const*>(&w[i]));
            else
                f = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&w[i]));
            out[2 * i] = f.x, out[2 * i + 1] = f.y;
        }
    }
}

template <typename T>
__device__ __forceinline__ T fromFloat(float x)
{
    if constexpr (std::is_same_v<T, float>)
        return x;
    else if constexpr (std::is_same_v<T, __half>)
        return __float2half_rn(x);
    else
        return __float2bfloat16_rn(x);
}

template <typename T, int VEC>
__device__ __forceinline__ void storeVec(T* ptr, float const (&in)[VEC])
{
    if constexpr (VEC * sizeof(T) == 16)
    {
        uint4 raw; // packed in registers, stored as one 16-byte write
        T* packed = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int x = 0; x < VEC; ++x)
            packed[x] = fromFloat<T>(in[x]);
        *reinterpret_cast<uint4*>(ptr) = raw;
    }
    else
        *ptr = fromFloat<T>(in[0]);
}

__host__ __device__ __forceinline__ size_t cacheRows(ChaiClusteredAttentionParams const& p)
{
    return p.share_buffer ? static_cast<size_t>(p.cache_len) : static_cast<size_t>(p.past_len + p.seq_len);
}

// The distinct V heads of cluster c in first-occurrence order (uniq[0..n)); every thread of the block calls
// it and gets n. flag is scratch of CHAI_MAX_HEADS ints. Clusters are small, so O(g^2) over a block is cheap.
__device__ int distinctVHeads(ChaiClusteredAttentionParams const& p, int c, int* uniq, int* flag)
{
    int const h0 = p.cluster_offsets[c];
    int const g = p.cluster_offsets[c + 1] - h0;
    for (int i = threadIdx.x; i < g; i += blockDim.x)
    {
        int const v = p.v_head_index[h0 + i];
        int first = 1;
        for (int j = 0; j < i && first; ++j)
            first = p.v_head_index[h0 + j] != v;
        flag[i] = first;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g; i += blockDim.x)
        if (flag[i])
        {
            int rank = 0;
            for (int j = 0; j < i; ++j)
                rank += flag[j];
            uniq[rank] = p.v_head_index[h0 + i];
        }
    int n = 0;
    for (int j = 0; j < g; ++j)
        n += flag[j];
    __syncthreads();
    return n;
}

// Workspace for splits > 1: [rows*splits][2] (max, sum) then [rows*splits][maxUnique][d] accumulators.
struct SplitScratch
{
    float* ml;
    float* acc;
};

__host__ __device__ __forceinline__ SplitScratch splitScratch(void* ws, size_t slots)
{
    float* base = static_cast<float*>(ws);
    return {base, base + 2 * slots};
}

struct Grid
{
    int rows;       // B*C*S query rows
    int chunks;     // V-head chunks per row (blocks sharing one row's scores)
    int splits;     // key-range splits per row
    int splitKeys;  // keys per split (a multiple of kTile unless forced)
    int maxUnique;  // most distinct V heads in one cluster (workspace stride)
};

// Scores are kept in the log2 domain (q is pre-multiplied by scale*log2(e)) so exp2f does the softmax.
template <typename T, typename M, bool kVec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    clusteredAttentionKernel(__grid_constant__ const ChaiClusteredAttentionParams p, Grid const grid)
{
    constexpr int VEC = vecOf<T, kVec>();
    __shared__ float q_s[256];
    __shared__ float s_s[kTile];           // raw scores of the tile
    __shared__ float p_s[kTile];           // probabilities of the tile
    __shared__ float red_s[kThreads * VEC]; // per-key-slice partial accumulators, summed at the end
    __shared__ int uniq_s[CHAI_MAX_HEADS];
    __shared__ int flag_s[CHAI_MAX_HEADS];

    int const d = p.head_dim;
    int const S = p.seq_len;
    int const P = p.past_len;
    int const C = p.num_clusters;
    int const T_ = P + S;
    size_t const Tc = cacheRows(p);
    int const tid = threadIdx.x;

    // The new rows into present_* (their only writer): a grid-stride copy of VEC-element pieces.
    {
        int const ppr = d / VEC; // pieces per row
        size_t const kPieces = static_cast<size_t>(p.batch) * p.num_k_heads * S * ppr;
        size_t const total = kPieces + static_cast<size_t>(p.batch) * p.num_v_heads * S * ppr;
        size_t const stride = static_cast<size_t>(gridDim.x) * gridDim.y * kThreads;
        for (size_t i = (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kThreads + tid; i < total;
             i += stride)
        {
            bool const isK = i < kPieces;
            size_t const j = isK ? i : i - kPieces;
            size_t const bh = j / (static_cast<size_t>(S) * ppr);
            size_t const r = j % (static_cast<size_t>(S) * ppr);
            T const* src = static_cast<T const*>(isK ? p.key : p.value) + j * VEC;
            T* dst = static_cast<T*>(isK ? p.present_key : p.present_value) + (bh * Tc + P) * d + r * VEC;
            if constexpr (VEC * sizeof(T) == 16)
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4 const*>(src);
            else
                *dst = *src;
        }
    }

    int const chunk = blockIdx.x % grid.chunks;
    int const row = blockIdx.x / grid.chunks; // (b*C + c)*S + s
    int const s = row % S;
    int const c = (row / S) % C;
    int const b = row / (S * C);
    int const split = blockIdx.y;

    int const nu = distinctVHeads(p, c, uniq_s, flag_s);
    int const ppH = d / VEC;               // VEC pieces per head row
    int const hpb = kThreads / ppH;        // V heads one block accumulates
    int const u0 = chunk * hpb;
    if (u0 >= nu)
        return; // uniform: this cluster has fewer chunks than the widest one
    int const hb = min(hpb, nu - u0);
    int const pieces = hb * ppH;           // (head, piece) pairs of this block
    int const slices = kThreads / pieces;  // threads sharing one pair, each over every slices-th key
    int const slice = tid / pieces;
    int const pc = tid % pieces;
    bool const pvThread = slice < slices;

    int const kend = p.causal ? min(T_, P + s + 1) : T_;
    int const t0 = split * grid.splitKeys;
    int const t1 = min(kend, t0 + grid.splitKeys);

    T const* q = static_cast<T const*>(p.query) + (static_cast<size_t>(b * C + c) * S + s) * d;
    float const qscale = p.scale * kLog2e;
    for (int e = tid; e < d; e += kThreads)
    {
        float v[1];
        toFloat<T, 1>(q[e], v);
        q_s[e] = v[0] * qscale;
    }
    __syncthreads();

    int const kh = p.k_head_index[c];
    T const* kPast = static_cast<T const*>(p.present_key) + static_cast<size_t>(b * p.num_k_heads + kh) * Tc * d;
    T const* kNew = static_cast<T const*>(p.key) + static_cast<size_t>(b * p.num_k_heads + kh) * S * d;
    int const vh = pvThread ? uniq_s[u0 + pc / ppH] : 0;
    int const vOff = (pc % ppH) * VEC;
    T const* vPast = static_cast<T const*>(p.present_value) + static_cast<size_t>(b * p.num_v_heads + vh) * Tc * d + vOff;
    T const* vNew = static_cast<T const*>(p.value) + static_cast<size_t>(b * p.num_v_heads + vh) * S * d + vOff;
    M const* mask = static_cast<M const*>(p.attention_mask) + static_cast<size_t>(b) * T_;

    // Score groups: lanesPerKey lanes (a power of two <= 32, never straddling a warp) share one key row.
    int lanesPerKey = 1;
    while (lanesPerKey < ppH && lanesPerKey < 32)
        lanesPerKey *= 2;
    int const groups = kThreads / lanesPerKey;
    int const group = tid / lanesPerKey;
    int const gl = tid % lanesPerKey;
    int const lane = tid % 32;

    float acc[VEC] = {};
    float m = -INFINITY; // running max (log2 domain), identical in every thread
    float l = 0.f;       // running sum of exp2(score - m), identical in every thread
    // A step covers at most kPrefetch keys per P.V thread, so that all of its V loads can be issued up front.
    int const tileKeys = min(kTile, kPrefetch * slices);
    for (int t = t0; t < t1; t += tileKeys)
    {
        int const n = min(tileKeys, t1 - t);
        // The step's mask and V rows do not depend on its scores: issue those loads first, so that their latency
        // overlaps the K loads and the step waits for memory about once.
        bool const att0 = lane < n && mask[t + lane] != 0;
        bool const att1 = lane + 32 < n && mask[t + lane + 32] != 0;
        Raw<T, VEC> rawV[kPrefetch];
#pragma unroll
        for (int u = 0; u < kPrefetch; ++u)
        {
            int const j = t + slice + u * slices;
            if (pvThread && j < t + n)
                rawV[u] = loadRaw<T, VEC>(j < P ? vPast + static_cast<size_t>(j) * d : vNew + static_cast<size_t>(j - P) * d);
        }
        // Scores: four keys in flight per group; the loop bounds are block-uniform so shuffles never diverge.
        for (int base = 0; base < n; base += 4 * groups)
        {
            float dot[4] = {0.f, 0.f, 0.f, 0.f};
            for (int e = gl * VEC; e < d; e += lanesPerKey * VEC)
            {
                Raw<T, VEC> raw[4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                {
                    int const j = t + base + u * groups + group;
                    if (j < t + n)
                        raw[u] = loadRaw<T, VEC>((j < P ? kPast + static_cast<size_t>(j) * d
                                                        : kNew + static_cast<size_t>(j - P) * d) + e);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (base + u * groups + group < n)
                    {
                        float kv[VEC];
                        toFloat<T, VEC>(raw[u], kv);
#pragma unroll
                        for (int x = 0; x < VEC; ++x)
                            dot[u] += q_s[e + x] * kv[x];
                    }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
            {
                for (int off = lanesPerKey / 2; off > 0; off >>= 1)
                    dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], off);
                int const kk = base + u * groups + group;
                if (gl == 0 && kk < n)
                    s_s[kk] = dot[u];
            }
        }
        __syncthreads();
        // Every warp derives the same tile max and sum (same values, same order): no broadcast needed.
        float const s0 = att0 ? s_s[lane] : -INFINITY;
        float const s1 = att1 ? s_s[lane + 32] : -INFINITY;
        float mx = fmaxf(s0, s1);
        for (int off = 16; off > 0; off >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float const mNew = fmaxf(m, mx);
        float const alpha = mNew == -INFINITY ? 1.f : exp2f(m - mNew);
        float const e0 = s0 == -INFINITY ? 0.f : exp2f(s0 - mNew);
        float const e1 = s1 == -INFINITY ? 0.f : exp2f(s1 - mNew);
        float sum = e0 + e1;
        for (int off = 16; off > 0; off >>= 1)
            sum += __shfl_xor_sync(0xffffffffu, sum, off);
        l = l * alpha + sum;
        m = mNew;
        if (tid < 32)
        {
            p_s[lane] = e0;
            p_s[lane + 32] = e1;
        }
        __syncthreads();
        // P.V over the distinct V heads: thread (slice, pc) owns VEC dims of one head, keys slice, slice+slices...
        if (pvThread && mx != -INFINITY)
        {
#pragma unroll
            for (int x = 0; x < VEC; ++x)
                acc[x] *= alpha;
#pragma unroll
            for (int u = 0; u < kPrefetch; ++u)
            {
                int const kk = slice + u * slices;
                if (kk < n)
                {
                    float vv[VEC];
                    toFloat<T, VEC>(rawV[u], vv);
                    float const pk = p_s[kk];
#pragma unroll
                    for (int x = 0; x < VEC; ++x)
                        acc[x] += pk * vv[x];
                }
            }
        }
    }

    // Sum the key slices of each (head, piece), then write: the output (one split) or the workspace slot.
    if (pvThread)
#pragma unroll
        for (int x = 0; x < VEC; ++x)
            red_s[(slice * pieces + pc) * VEC + x] = acc[x];
    __syncthreads();
    if (tid >= pieces)
        return;
    float sum[VEC] = {};
    for (int sl = 0; sl < slices; ++sl)
#pragma unroll
        for (int x = 0; x < VEC; ++x)
            sum[x] += red_s[(sl * pieces + pc) * VEC + x];
    int const u = u0 + pc / ppH;
    if (grid.splits == 1)
    {
        float const inv = l > 0.f ? 1.f / l : 0.f; // rows with no attended key give zeros
#pragma unroll
        for (int x = 0; x < VEC; ++x)
            sum[x] *= inv;
        int const h0 = p.cluster_offsets[c];
        T* out = static_cast<T*>(p.output) + (static_cast<size_t>(b) * S + s) * p.num_heads * d + vOff;
        for (int h = h0; h < p.cluster_offsets[c + 1]; ++h)
            if (p.v_head_index[h] == uniq_s[u])
                storeVec<T, VEC>(out + static_cast<size_t>(h) * d, sum);
        return;
    }
    size_t const slot = static_cast<size_t>(row) * grid.splits + split;
    SplitScratch const ws = splitScratch(p.workspace, static_cast<size_t>(grid.rows) * grid.splits);
    if (chunk == 0 && tid == 0)
    {
        ws.ml[2 * slot] = m;
        ws.ml[2 * slot + 1] = l;
    }
    float* dst = ws.acc + (slot * grid.maxUnique + u) * d + vOff;
#pragma unroll
    for (int x = 0; x < VEC; ++x)
        dst[x] = sum[x];
}

// Merges the splits of one query row: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i, written to
// every head of the cluster that reads the V head. Grid: x = query row, y = kMergeThreads-element slices of
// the row's (distinct V head, dim) accumulators, one element per thread.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    mergeSplitsKernel(__grid_constant__ const ChaiClusteredAttentionParams p, Grid const grid)
{
    __shared__ float m_s[kMaxSplits];
    __shared__ float w_s[kMaxSplits];
    __shared__ int uniq_s[CHAI_MAX_HEADS];
    __shared__ int flag_s[CHAI_MAX_HEADS];
    int const d = p.head_dim;
    int const S = p.seq_len;
    int const row = blockIdx.x;
    int const s = row % S;
    int const c = (row / S) % p.num_clusters;
    int const b = row / (S * p.num_clusters);
    int const nu = distinctVHeads(p, c, uniq_s, flag_s);
    int const e = blockIdx.y * kMergeThreads + threadIdx.x;
    if (static_cast<int>(blockIdx.y) * kMergeThreads >= nu * d)
        return; // uniform: this cluster has fewer heads than the widest one
    SplitScratch const ws = splitScratch(p.workspace, static_cast<size_t>(grid.rows) * grid.splits);
    size_t const first = static_cast<size_t>(row) * grid.splits;

    for (int i = threadIdx.x; i < grid.splits; i += kMergeThreads)
        m_s[i] = ws.ml[2 * (first + i)];
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < grid.splits; ++i)
        M = fmaxf(M, m_s[i]);
    for (int i = threadIdx.x; i < grid.splits; i += kMergeThreads)
        w_s[i] = m_s[i] == -INFINITY ? 0.f : exp2f(m_s[i] - M); // empty splits (no attended key) weigh 0
    __syncthreads();
    float L = 0.f;
    for (int i = 0; i < grid.splits; ++i)
        L += w_s[i] * ws.ml[2 * (first + i) + 1];
    if (e >= nu * d)
        return;
    int const u = e / d;
    float a = 0.f;
#pragma unroll 8
    for (int i = 0; i < grid.splits; ++i)
        a += w_s[i] * ws.acc[((first + i) * grid.maxUnique + u) * d + e % d]; // empty splits hold zeros
    T const val = fromFloat<T>(L > 0.f ? a / L : 0.f);
    T* out = static_cast<T*>(p.output) + (static_cast<size_t>(b) * S + s) * p.num_heads * d + e % d;
    for (int h = p.cluster_offsets[c]; h < p.cluster_offsets[c + 1]; ++h)
        if (p.v_head_index[h] == uniq_s[u])
            out[static_cast<size_t>(h) * d] = val;
}

int maxDistinctVHeads(ChaiClusteredAttentionParams const& p)
{
    int best = 0;
    for (int c = 0; c < p.num_clusters; ++c)
    {
        int n = 0;
        for (int i = p.cluster_offsets[c]; i < p.cluster_offsets[c + 1]; ++i)
        {
            bool first = true;
            for (int j = p.cluster_offsets[c]; j < i && first; ++j)
                first = p.v_head_index[j] != p.v_head_index[i];
            n += first;
        }
        best = n > best ? n : best;
    }
    return best;
}

bool validTables(ChaiClusteredAttentionParams const& p)
{
    if (p.num_heads < 1 || p.num_heads > CHAI_MAX_HEADS || p.num_clusters < 1 || p.num_clusters > p.num_heads
        || p.num_k_heads < 1 || p.num_v_heads < 1 || p.head_dim < 1 || p.head_dim > 256)
        return false;
    if (p.cluster_offsets[0] != 0 || p.cluster_offsets[p.num_clusters] != p.num_heads)
        return false;
    for (int c = 0; c < p.num_clusters; ++c)
    {
        if (p.cluster_offsets[c + 1] <= p.cluster_offsets[c])
            return false;
        if (p.k_head_index[c] < 0 || p.k_head_index[c] >= p.num_k_heads)
            return false;
    }
    for (int h = 0; h < p.num_heads; ++h)
        if (p.v_head_index[h] < 0 || p.v_head_index[h] >= p.num_v_heads)
            return false;
    return true;
}

size_t bytesPerSlot(ChaiClusteredAttentionParams const& p)
{
    return (2 + static_cast<size_t>(maxDistinctVHeads(p)) * p.head_dim) * sizeof(float);
}

// Past rows into present_* when they are different buffers (concat: P rows; in place: the whole buffer).
cudaError_t copyPast(void* present, void const* past, int rowsBH, size_t pastRows, size_t presentRows,
    size_t rowBytes, cudaStream_t stream)
{
    if (pastRows == 0 || present == past || past == nullptr)
        return cudaSuccess;
    return cudaMemcpy2DAsync(present, presentRows * rowBytes, past, pastRows * rowBytes, pastRows * rowBytes, rowsBH,
        cudaMemcpyDeviceToDevice, stream);
}

// Splits of the key range: enough blocks for kBlocksPerSm per SM, whole tiles, at least kMinTilesPerSplit
// tiles each, within the workspace. num_splits > 1 forces a count (tests).
void chooseSplits(ChaiClusteredAttentionParams const& p, Grid& grid)
{
    int const T_ = p.past_len + p.seq_len;
    grid.splits = 1;
    grid.splitKeys = T_;
    if (p.num_splits == 1 || p.workspace == nullptr)
        return;
    int splits = p.num_splits;
    int const tiles = (T_ + kTile - 1) / kTile;
    if (splits <= 1)
    {
        int dev = 0;
        int sms = 132;
        if (cudaGetDevice(&dev) == cudaSuccess)
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        long long const blocks = static_cast<long long>(grid.rows) * grid.chunks;
        long long const want = (static_cast<long long>(kBlocksPerSm) * sms + blocks - 1) / blocks;
        splits = static_cast<int>(want < tiles / kMinTilesPerSplit ? want : tiles / kMinTilesPerSplit);
    }
    splits = min(min(splits, kMaxSplits), kMaxSplitRows / grid.rows);
    if (splits <= 1 || static_cast<size_t>(grid.rows) * splits * bytesPerSlot(p) > p.workspace_bytes)
        return;
    // Whole tiles per split when choosing (a ragged last tile only at the end); forced counts split evenly.
    int const keys = p.num_splits > 1 ? (T_ + splits - 1) / splits : ((tiles + splits - 1) / splits) * kTile;
    grid.splitKeys = keys;
    grid.splits = (T_ + keys - 1) / keys;
}

bool aligned16(void const* ptr)
{
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <typename T, typename M>
int launch(ChaiClusteredAttentionParams const& p, Grid grid, cudaStream_t stream)
{
    // 16-byte loads when every row starts 16-byte aligned: d a multiple of VEC and aligned base pointers.
    constexpr int kVecElems = 16 / sizeof(T);
    bool const vec = p.head_dim % kVecElems == 0 && aligned16(p.key) && aligned16(p.value)
        && aligned16(p.present_key) && aligned16(p.present_value) && aligned16(p.output);
    int const ppH = vec ? p.head_dim / kVecElems : p.head_dim;
    int const hpb = kThreads / ppH;
    grid.chunks = (grid.maxUnique + hpb - 1) / hpb;
    chooseSplits(p, grid);
    long long const bx = static_cast<long long>(grid.rows) * grid.chunks;
    if (bx > 0x7fffffffLL)
        return CHAI_ERR_UNSUPPORTED;
    auto kernel = vec ? clusteredAttentionKernel<T, M, true> : clusteredAttentionKernel<T, M, false>;
    kernel<<<dim3(static_cast<unsigned>(bx), grid.splits), kThreads, 0, stream>>>(p, grid);
    if (grid.splits > 1)
    {
        dim3 const mergeGrid(grid.rows, (grid.maxUnique * p.head_dim + kMergeThreads - 1) / kMergeThreads);
        mergeSplitsKernel<T><<<mergeGrid, kMergeThreads, 0, stream>>>(p, grid);
    }
    return cudaGetLastError() == cudaSuccess ? CHAI_OK : CHAI_ERR_CUDA;
}

template <typename T>
int launchForMask(ChaiClusteredAttentionParams const& p, Grid const& grid, cudaStream_t stream)
{
    if (p.mask_dtype == CHAI_MASK_INT64)
        return launch<T, int64_t>(p, grid, stream);
    return launch<T, int32_t>(p, grid, stream);
}

} // namespace

extern "C" CHAI_API size_t chaiClusteredAttentionParamsSize(void)
{
    return sizeof(ChaiClusteredAttentionParams);
}

extern "C" CHAI_API size_t chaiClusteredAttentionWorkspaceSize(ChaiClusteredAttentionParams const* params)
{
    if (params == nullptr || !validTables(*params))
        return 0;
    return kMaxSplitRows * bytesPerSlot(*params);
}

extern "C" CHAI_API int chaiClusteredAttentionEnqueue(ChaiClusteredAttentionParams const* params, cudaStream_t stream)
{
    if (params == nullptr)
        return CHAI_ERR_INVALID_ARGUMENT;
    ChaiClusteredAttentionParams const& p = *params;
    if (!validTables(p) || p.batch < 1 || p.seq_len < 1 || p.past_len < 0)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (p.ring_window != 0 || p.span_sinks != nullptr || p.span_window != nullptr)
        return CHAI_ERR_INVALID_ARGUMENT; // no span path here: the plugin and the ORT op refuse such nodes first
    if (p.share_buffer && static_cast<long long>(p.past_len) + p.seq_len > p.cache_len)
        return CHAI_ERR_INVALID_ARGUMENT; // the new rows would fall outside the buffer
    if (p.dtype != CHAI_DTYPE_FLOAT32 && p.dtype != CHAI_DTYPE_FLOAT16 && p.dtype != CHAI_DTYPE_BFLOAT16)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (p.mask_dtype != CHAI_MASK_INT32 && p.mask_dtype != CHAI_MASK_INT64)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (!p.query || !p.key || !p.value || !p.attention_mask || !p.output || !p.present_key || !p.present_value
        || (p.past_len > 0 && (!p.past_key || !p.past_value)))
        return CHAI_ERR_INVALID_ARGUMENT;

    size_t const rowBytes = static_cast<size_t>(p.head_dim) * (p.dtype == CHAI_DTYPE_FLOAT32 ? 4 : 2);
    size_t const presentRows = cacheRows(p);
    size_t const pastRows = p.share_buffer ? presentRows : static_cast<size_t>(p.past_len);
    if (copyPast(p.present_key, p.past_key, p.batch * p.num_k_heads, pastRows, presentRows, rowBytes, stream)
            != cudaSuccess
        || copyPast(p.present_value, p.past_value, p.batch * p.num_v_heads, pastRows, presentRows, rowBytes, stream)
            != cudaSuccess)
        return CHAI_ERR_CUDA;

    long long const rows = static_cast<long long>(p.batch) * p.num_clusters * p.seq_len;
    if (rows > 0x7fffffffLL)
        return CHAI_ERR_UNSUPPORTED;
    Grid grid{};
    grid.rows = static_cast<int>(rows);
    grid.maxUnique = maxDistinctVHeads(p);
    switch (p.dtype)
    {
    case CHAI_DTYPE_FLOAT16: return launchForMask<__half>(p, grid, stream);
    case CHAI_DTYPE_BFLOAT16: return launchForMask<__nv_bfloat16>(p, grid, stream);
    default: return launchForMask<float>(p, grid, stream);
    }
}
