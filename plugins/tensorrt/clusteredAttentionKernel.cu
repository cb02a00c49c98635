// CHAI clustered attention: CUDA kernels and the C entry point the TensorRT plugin's enqueue calls.
// See clusteredAttentionKernel.h for the semantics and the argument layout.
//
// Plan of one call:
//   1. present_key/present_value = concat(past, new) with two strided copies each (cudaMemcpy2DAsync); with
//      share_buffer only the S new rows are written (and past rows copied only when the buffers differ).
//   2. One block per (batch, cluster, query row, split): the cluster's single query against its single
//      K head, an online softmax over 64-key chunks in fp32, and P.V for every head of the cluster
//      (each with its own V head). K is read once per cluster, V once per head: the CHAI byte floor.
//   3. Decode (S == 1) splits the key range over blocks (flash-decoding) so that small batches still
//      fill the GPU; a second kernel merges the per-split (max, sum, accumulator) triples.
// Prefill (S > 1) runs one block per query row over its causal key range: correct, not tiled for
// speed (each row re-reads K); the decode path is the one tuned here.

#include "clusteredAttentionKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

namespace
{

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;              // keys per online-softmax step (must be <= kThreads)
constexpr int kMaxSplitRows = 2048;     // cap on (query rows x splits): bounds the workspace
constexpr int kMinKeysPerSplit = 128;   // below this a split costs more in merging than it saves
constexpr int kBlocksPerSm = 4;         // decode splits until about this many blocks per SM
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float toFloat(float x)
{
    return x;
}
__device__ __forceinline__ float toFloat(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float toFloat(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float x);
template <>
__device__ __forceinline__ float fromFloat<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

// Loads VEC consecutive elements as floats. VEC == 4 needs 8-byte (16-bit types) or 16-byte (fp32) alignment.
template <int VEC>
__device__ __forceinline__ void loadVec(float const* p, float* out)
{
    if constexpr (VEC == 4)
    {
        float4 const v = *reinterpret_cast<float4 const*>(p);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    }
    else
        out[0] = p[0];
}
template <int VEC>
__device__ __forceinline__ void loadVec(__half const* p, float* out)
{
    if constexpr (VEC == 4)
    {
        uint2 const raw = *reinterpret_cast<uint2 const*>(p);
        float2 const a = __half22float2(*reinterpret_cast<__half2 const*>(&raw.x));
        float2 const b = __half22float2(*reinterpret_cast<__half2 const*>(&raw.y));
        out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
    }
    else
        out[0] = __half2float(p[0]);
}
template <int VEC>
__device__ __forceinline__ void loadVec(__nv_bfloat16 const* p, float* out)
{
    if constexpr (VEC == 4)
    {
        uint2 const raw = *reinterpret_cast<uint2 const*>(p);
        float2 const a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&raw.x));
        float2 const b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&raw.y));
        out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
    }
    else
        out[0] = __bfloat162float(p[0]);
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__host__ __device__ __forceinline__ size_t cacheRows(ChaiClusteredAttentionParams const& p)
{
    return p.share_buffer ? static_cast<size_t>(p.cache_len) : static_cast<size_t>(p.past_len + p.seq_len);
}

// Workspace layout for splits > 1: [rows*splits][2] (max, sum) then [rows*splits][gmax*d] accumulators.
struct SplitScratch
{
    float* ml;
    float* acc;
};

__device__ __forceinline__ SplitScratch splitScratch(void* ws, int rows, int splits)
{
    float* base = static_cast<float*>(ws);
    return {base, base + 2 * static_cast<size_t>(rows) * splits};
}

// Scores are kept in the log2 domain (q is pre-multiplied by scale*log2(e)) so exp2f does the softmax.
template <typename T, typename M, int VEC>
__global__ void __launch_bounds__(kThreads)
    clusteredAttentionKernel(__grid_constant__ const ChaiClusteredAttentionParams p, int splits, int gmax)
{
    extern __shared__ float smem[];
    int const d = p.head_dim;
    int const S = p.seq_len;
    int const C = p.num_clusters;
    int const T_ = p.past_len + S;
    size_t const Tc = cacheRows(p); // row pitch of present_* (T_ with the concat contract)
    int const row = blockIdx.x; // ((b*C + c)*S + s)
    int const s = row % S;
    int const c = (row / S) % C;
    int const b = row / (S * C);
    int const split = blockIdx.y;
    int const tid = threadIdx.x;
    int const warp = tid / 32;
    int const lane = tid % 32;

    int const h0 = p.cluster_offsets[c];
    int const g = p.cluster_offsets[c + 1] - h0;
    int const kend = p.causal ? min(T_, p.past_len + s + 1) : T_;
    int const span = (kend + splits - 1) / splits;
    int const t0 = split * span;
    int const t1 = min(kend, t0 + span);

    float* q_s = smem;        // [d]
    float* p_s = q_s + d;     // [kChunk] scores, then probabilities
    float* acc_s = p_s + kChunk; // [g*d] fp32 accumulators, element e owned by thread e % kThreads

    T const* q = static_cast<T const*>(p.query) + (static_cast<size_t>(b * C + c) * S + s) * d;
    float const qscale = p.scale * kLog2e;
    for (int e = tid; e < d; e += kThreads)
        q_s[e] = toFloat(q[e]) * qscale;
    for (int e = tid; e < g * d; e += kThreads)
        acc_s[e] = 0.f; // zeroed before the first __syncthreads, so ownership does not matter here
    __syncthreads();

    T const* K = static_cast<T const*>(p.present_key)
        + static_cast<size_t>(b * p.num_k_heads + p.k_head_index[c]) * Tc * d;
    T const* Vbase = static_cast<T const*>(p.present_value);
    M const* mask = static_cast<M const*>(p.attention_mask) + static_cast<size_t>(b) * T_;

    float m = -INFINITY; // running max (log2 domain), identical in every thread
    float l = 0.f;       // running sum of exp2(score - m)
    for (int t = t0; t < t1; t += kChunk)
    {
        int const n = min(kChunk, t1 - t);
        // Scores: one warp per key, four keys in flight per warp, lanes split the head dimension into
        // VEC-wide pieces (one coalesced K row read per key).
        for (int kk0 = warp * 4; kk0 < n; kk0 += kWarps * 4)
        {
            float dot[4] = {0.f, 0.f, 0.f, 0.f};
            for (int e = lane * VEC; e < d; e += 32 * VEC)
            {
#pragma unroll
                for (int u = 0; u < 4; ++u)
                {
                    if (kk0 + u < n)
                    {
                        float kv[VEC];
                        loadVec<VEC>(K + static_cast<size_t>(t + kk0 + u) * d + e, kv);
#pragma unroll
                        for (int x = 0; x < VEC; ++x)
                            dot[u] += q_s[e + x] * kv[x];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
            {
                float const sum = warpSum(dot[u]);
                int const j = t + kk0 + u;
                if (lane == 0 && kk0 + u < n)
                    p_s[kk0 + u] = mask[j] != 0 ? sum : -INFINITY;
            }
        }
        __syncthreads();
        float cmax = -INFINITY;
        for (int kk = 0; kk < n; ++kk)
            cmax = fmaxf(cmax, p_s[kk]);
        float const m_new = fmaxf(m, cmax);
        __syncthreads(); // every thread has read the raw scores before they are overwritten
        if (m_new == -INFINITY)
            continue; // nothing attended yet (uniform across the block)
        float const alpha = exp2f(m - m_new); // 0 on the first attended chunk
        if (tid < n)
            p_s[tid] = exp2f(p_s[tid] - m_new);
        __syncthreads();
        float csum = 0.f;
        for (int kk = 0; kk < n; ++kk)
            csum += p_s[kk];
        l = l * alpha + csum;
        // P.V for every head of the cluster: threads walk (head, VEC dims) pieces, V rows read coalesced.
        for (int e = tid * VEC; e < g * d; e += kThreads * VEC)
        {
            int const hi = e / d;
            int const dd = e - hi * d;
            T const* v = Vbase + (static_cast<size_t>(b * p.num_v_heads + p.v_head_index[h0 + hi]) * Tc + t) * d + dd;
            float a[VEC];
#pragma unroll
            for (int x = 0; x < VEC; ++x)
                a[x] = acc_s[e + x] * alpha;
#pragma unroll 8
            for (int kk = 0; kk < n; ++kk)
            {
                float vv[VEC];
                loadVec<VEC>(v + static_cast<size_t>(kk) * d, vv);
                float const pk = p_s[kk];
#pragma unroll
                for (int x = 0; x < VEC; ++x)
                    a[x] += pk * vv[x];
            }
#pragma unroll
            for (int x = 0; x < VEC; ++x)
                acc_s[e + x] = a[x];
        }
        m = m_new;
        __syncthreads(); // p_s is refilled by the next chunk
    }

    if (splits == 1)
    {
        float const inv = l > 0.f ? 1.f / l : 0.f; // rows with no attended key give zeros
        T* out = static_cast<T*>(p.output) + (static_cast<size_t>(b) * S + s) * p.num_heads * d;
        for (int e = tid * VEC; e < g * d; e += kThreads * VEC)
            for (int x = 0; x < VEC; ++x)
                out[static_cast<size_t>(h0) * d + e + x] = fromFloat<T>(acc_s[e + x] * inv);
    }
    else
    {
        SplitScratch const ws = splitScratch(p.workspace, gridDim.x, splits);
        size_t const slot = static_cast<size_t>(row) * splits + split;
        if (tid == 0)
        {
            ws.ml[2 * slot] = m;
            ws.ml[2 * slot + 1] = l;
        }
        for (int e = tid * VEC; e < g * d; e += kThreads * VEC)
            for (int x = 0; x < VEC; ++x)
                ws.acc[slot * gmax * d + e + x] = acc_s[e + x];
    }
}

// Merges the splits of one query row: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combineSplitsKernel(__grid_constant__ const ChaiClusteredAttentionParams p, int splits, int gmax)
{
    int const d = p.head_dim;
    int const S = p.seq_len;
    int const C = p.num_clusters;
    int const row = blockIdx.x;
    int const s = row % S;
    int const c = (row / S) % C;
    int const b = row / (S * C);
    int const h0 = p.cluster_offsets[c];
    int const g = p.cluster_offsets[c + 1] - h0;
    SplitScratch const ws = splitScratch(p.workspace, gridDim.x, splits);
    size_t const first = static_cast<size_t>(row) * splits;

    float M = -INFINITY;
    for (int i = 0; i < splits; ++i)
        M = fmaxf(M, ws.ml[2 * (first + i)]);
    float L = 0.f;
    if (M != -INFINITY)
        for (int i = 0; i < splits; ++i)
        {
            float const mi = ws.ml[2 * (first + i)];
            L += mi == -INFINITY ? 0.f : ws.ml[2 * (first + i) + 1] * exp2f(mi - M);
        }
    float const inv = L > 0.f ? 1.f / L : 0.f;
    T* out = static_cast<T*>(p.output) + (static_cast<size_t>(b) * S + s) * p.num_heads * d;
    for (int e = threadIdx.x; e < g * d; e += kThreads)
    {
        float a = 0.f;
        if (M != -INFINITY)
            for (int i = 0; i < splits; ++i)
            {
                float const mi = ws.ml[2 * (first + i)];
                if (mi != -INFINITY)
                    a += exp2f(mi - M) * ws.acc[(first + i) * gmax * d + e];
            }
        out[static_cast<size_t>(h0) * d + e] = fromFloat<T>(a * inv);
    }
}

int maxClusterSize(ChaiClusteredAttentionParams const& p)
{
    int gmax = 0;
    for (int c = 0; c < p.num_clusters; ++c)
        gmax = max(gmax, p.cluster_offsets[c + 1] - p.cluster_offsets[c]);
    return gmax;
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

// present[b, h] = past[b, h] (all pastRows rows; skipped when they are the same buffer), then rows [P, P+S) =
// cur[b, h]. Row counts: past pastRows, present presentRows (concat: P and P+S; shared: cache_len both).
cudaError_t writeCache(void* present, void const* past, void const* cur, int rowsBH, int P, int S, size_t pastRows,
    size_t presentRows, size_t rowElems, size_t elt, cudaStream_t stream)
{
    size_t const rowBytes = rowElems * elt;
    size_t const pitch = presentRows * rowBytes;
    if (pastRows > 0 && present != past)
    {
        cudaError_t const err = cudaMemcpy2DAsync(present, pitch, past, pastRows * rowBytes, pastRows * rowBytes, rowsBH,
            cudaMemcpyDeviceToDevice, stream);
        if (err != cudaSuccess)
            return err;
    }
    return cudaMemcpy2DAsync(static_cast<char*>(present) + P * rowBytes, pitch, cur, S * rowBytes, S * rowBytes,
        rowsBH, cudaMemcpyDeviceToDevice, stream);
}

int chooseSplits(ChaiClusteredAttentionParams const& p, int rows, size_t neededPerSlot)
{
    if (p.num_splits == 1 || p.workspace == nullptr)
        return 1;
    int const T_ = p.past_len + p.seq_len;
    int const cap = kMaxSplitRows / rows;
    int splits;
    if (p.num_splits > 1)
        splits = p.num_splits;
    else
    {
        if (p.seq_len != 1)
            return 1; // prefill already has B*C*S blocks
        int dev = 0;
        int sms = 132;
        if (cudaGetDevice(&dev) == cudaSuccess)
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        splits = (kBlocksPerSm * sms + rows - 1) / rows;
        splits = min(splits, (T_ + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
    }
    splits = min(splits, cap);
    if (splits <= 1)
        return 1;
    if (static_cast<size_t>(rows) * splits * neededPerSlot > p.workspace_bytes)
        return 1;
    return splits;
}

bool aligned(void const* ptr, size_t bytes)
{
    return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <typename T, typename M>
int launch(ChaiClusteredAttentionParams const& p, int rows, int splits, int gmax, size_t smem, cudaStream_t stream)
{
    // Four-wide loads when every row starts 4-element aligned (d % 4 == 0 and aligned base pointers).
    size_t const vecBytes = 4 * sizeof(T);
    bool const vec4 = p.head_dim % 4 == 0 && aligned(p.present_key, vecBytes) && aligned(p.present_value, vecBytes);
    auto kernel = vec4 ? clusteredAttentionKernel<T, M, 4> : clusteredAttentionKernel<T, M, 1>;
    if (smem > 48 * 1024
        && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))
            != cudaSuccess)
        return CHAI_ERR_CUDA;
    kernel<<<dim3(rows, splits), kThreads, smem, stream>>>(p, splits, gmax);
    if (splits > 1)
        combineSplitsKernel<T><<<rows, kThreads, 0, stream>>>(p, splits, gmax);
    return cudaGetLastError() == cudaSuccess ? CHAI_OK : CHAI_ERR_CUDA;
}

template <typename T>
int launchForMask(ChaiClusteredAttentionParams const& p, int rows, int splits, int gmax, size_t smem,
    cudaStream_t stream)
{
    if (p.mask_dtype == CHAI_MASK_INT64)
        return launch<T, int64_t>(p, rows, splits, gmax, smem, stream);
    return launch<T, int32_t>(p, rows, splits, gmax, smem, stream);
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
    size_t const perSlot = (2 + static_cast<size_t>(maxClusterSize(*params)) * params->head_dim) * sizeof(float);
    return kMaxSplitRows * perSlot;
}

extern "C" CHAI_API int chaiClusteredAttentionEnqueue(ChaiClusteredAttentionParams const* params, cudaStream_t stream)
{
    if (params == nullptr)
        return CHAI_ERR_INVALID_ARGUMENT;
    ChaiClusteredAttentionParams const& p = *params;
    if (!validTables(p) || p.batch < 1 || p.seq_len < 1 || p.past_len < 0)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (p.share_buffer && static_cast<long long>(p.past_len) + p.seq_len > p.cache_len)
        return CHAI_ERR_INVALID_ARGUMENT; // the new rows would fall outside the buffer
    if (p.dtype != CHAI_DTYPE_FLOAT32 && p.dtype != CHAI_DTYPE_FLOAT16 && p.dtype != CHAI_DTYPE_BFLOAT16)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (p.mask_dtype != CHAI_MASK_INT32 && p.mask_dtype != CHAI_MASK_INT64)
        return CHAI_ERR_INVALID_ARGUMENT;
    if (!p.query || !p.key || !p.value || !p.attention_mask || !p.output || !p.present_key || !p.present_value
        || (p.past_len > 0 && (!p.past_key || !p.past_value)))
        return CHAI_ERR_INVALID_ARGUMENT;

    size_t const elt = p.dtype == CHAI_DTYPE_FLOAT32 ? 4 : 2;
    size_t const presentRows = cacheRows(p);
    size_t const pastRows = p.share_buffer ? presentRows : static_cast<size_t>(p.past_len);
    if (writeCache(p.present_key, p.past_key, p.key, p.batch * p.num_k_heads, p.past_len, p.seq_len, pastRows,
            presentRows, p.head_dim, elt, stream)
            != cudaSuccess
        || writeCache(p.present_value, p.past_value, p.value, p.batch * p.num_v_heads, p.past_len, p.seq_len, pastRows,
               presentRows, p.head_dim, elt, stream)
            != cudaSuccess)
        return CHAI_ERR_CUDA;

    int const gmax = maxClusterSize(p);
    size_t const smem = (static_cast<size_t>(p.head_dim) + kChunk + static_cast<size_t>(gmax) * p.head_dim) * sizeof(float);
    int dev = 0;
    int smemOptin = 48 * 1024;
    if (cudaGetDevice(&dev) == cudaSuccess)
        cudaDeviceGetAttribute(&smemOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem > static_cast<size_t>(smemOptin))
        return CHAI_ERR_UNSUPPORTED;

    long long const rowsLL = static_cast<long long>(p.batch) * p.num_clusters * p.seq_len;
    if (rowsLL > 0x7fffffffLL)
        return CHAI_ERR_UNSUPPORTED;
    int const rows = static_cast<int>(rowsLL);
    size_t const perSlot = (2 + static_cast<size_t>(gmax) * p.head_dim) * sizeof(float);
    int const splits = chooseSplits(p, rows, perSlot);

    switch (p.dtype)
    {
    case CHAI_DTYPE_FLOAT16: return launchForMask<__half>(p, rows, splits, gmax, smem, stream);
    case CHAI_DTYPE_BFLOAT16: return launchForMask<__nv_bfloat16>(p, rows, splits, gmax, smem, stream);
    default: return launchForMask<float>(p, rows, splits, gmax, smem, stream);
    }
}
