// CUDA C entry point for CHAI clustered attention (the kernel the TensorRT plugin's enqueue calls).
//
// Semantics (heads already permuted at export so cluster c is the head range
// [cluster_offsets[c], cluster_offsets[c+1])):
//
//     present_key   = concat(past_key, key)     on the sequence axis   [B, Hk, P+S, d]
//     present_value = concat(past_value, value)                        [B, Hv, P+S, d]
//   or, with share_buffer = 1 (the in-place cache contract, as ONNX Runtime's GroupQueryAttention with
//   past_present_share_buffer): past_* and present_* are [B, H*, cache_len, d] buffers, P = valid past
//   rows, and the call writes only rows [P, P+S) of present_* (copying the whole buffer first only when
//   present_* is not the same buffer as past_*).
//     P_c   = softmax(q_c K_{k_head_index[c]}^T * scale + mask)        (fp32 accumulation)
//     out_i = P_{cluster(i)} V_{v_head_index[i]}                        output [B, S, H*d]
//
// Query row s sits at absolute position P+s; it attends key j when attention_mask[b, j] != 0 and,
// with causal=1, j <= P+s. A row with no attended key outputs zeros.
//
// The cluster tables travel by value inside the params struct (and on into the kernel as a
// __grid_constant__ argument): no device allocation, nothing to upload, CUDA-graph capturable.
#pragma once

// CPU-only users of the params struct (the ONNX Runtime library's CPU kernel) build without the CUDA
// toolkit: they need only the stream type's name, defined here exactly as CUDA's driver_types.h does.
#ifdef CHAI_KERNEL_NO_CUDA
typedef struct CUstream_st* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define CHAI_API __declspec(dllexport)
#else
#define CHAI_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Upper bound on query heads per layer (sizes the by-value tables; 256 keeps the struct < 4 KiB).
#define CHAI_MAX_HEADS 256

// Element type of query/key/value/past/present/output (all the same).
enum ChaiDType
{
    CHAI_DTYPE_FLOAT32 = 0,
    CHAI_DTYPE_FLOAT16 = 1,
    CHAI_DTYPE_BFLOAT16 = 2,
};

// Element type of attention_mask.
enum ChaiMaskType
{
    CHAI_MASK_INT32 = 0,
    CHAI_MASK_INT64 = 1,
};

// Return codes of chaiClusteredAttentionEnqueue.
enum ChaiStatus
{
    CHAI_OK = 0,
    CHAI_ERR_INVALID_ARGUMENT = 1, // shapes, tables or dtypes are inconsistent
    CHAI_ERR_UNSUPPORTED = 2,      // batch * clusters * new tokens exceeds the CUDA grid
    CHAI_ERR_CUDA = 3,             // a CUDA launch or copy failed (cudaGetLastError has the detail)
};

typedef struct ChaiClusteredAttentionParams
{
    // Shapes. batch=B, seq_len=S (new tokens), past_len=P (cached tokens, may be 0).
    int32_t batch;
    int32_t seq_len;
    int32_t past_len;
    int32_t cache_len;    // rows of the past/present buffers with share_buffer = 1 (>= P+S); else ignored
    int32_t share_buffer; // 1: in-place contract (present_* are [B, H*, cache_len, d]); 0: concat contract
    int32_t num_heads;    // H: query heads after permutation (output has H*d columns)
    int32_t num_clusters; // C: one query and one K head per cluster
    int32_t num_k_heads;  // Hk: kept K heads
    int32_t num_v_heads;  // Hv: V heads
    int32_t head_dim;     // d (1..256)
    float scale;          // multiplies q.k (usually 1/sqrt(d))
    int32_t causal;       // 1: query s attends keys j <= P+s; 0: all unmasked keys
    int32_t dtype;        // enum ChaiDType
    int32_t mask_dtype;   // enum ChaiMaskType
    // Tables (host values, copied by value into the kernel).
    int32_t cluster_offsets[CHAI_MAX_HEADS + 1]; // C+1 entries, 0 = first, H = last, strictly increasing
    int32_t k_head_index[CHAI_MAX_HEADS];        // C entries in [0, Hk)
    int32_t v_head_index[CHAI_MAX_HEADS];        // H entries in [0, Hv)
    // Device pointers, contiguous row-major.
    void const* query;          // [B, C, S, d]
    void const* key;            // [B, Hk, S, d]
    void const* value;          // [B, Hv, S, d]
    void const* past_key;       // [B, Hk, P, d] (share_buffer: [B, Hk, cache_len, d]); may be null when P == 0
    void const* past_value;     // [B, Hv, P, d] (share_buffer: [B, Hv, cache_len, d]); may be null when P == 0
    void const* attention_mask; // [B, P+S]        (1 = attend, 0 = padding)
    void* output;               // [B, S, H*d]
    void* present_key;          // [B, Hk, P+S, d] (share_buffer: [B, Hk, cache_len, d], may equal past_key)
    void* present_value;        // [B, Hv, P+S, d] (share_buffer: [B, Hv, cache_len, d], may equal past_value)
    // Scratch for the split-sequence (flash-decoding) path. May be null: then no split is made.
    void* workspace;
    size_t workspace_bytes;
    // 0 = choose from the shapes and the SM count; 1 = no split; n > 1 = force n splits (tests).
    int32_t num_splits;
    // Span path (chai_compile/kernels/fused_op.py): the CPU kernel's only; the CUDA kernel refuses it.
    // ring_window > 0: past/present are rings of at most ring_sinks + ring_window rows (cache_len = the past
    // tensor's rows, past_len = P slots of the mask). span_* are host pointers to C entries each, or null
    // when no cluster has a span (not copied: the caller's tables must outlive the call).
    int32_t ring_sinks;
    int32_t ring_window;
    int32_t const* span_sinks;
    int32_t const* span_window;
} ChaiClusteredAttentionParams;

// Bytes of workspace that enqueue can use for these head/cluster tables, whatever B, S and P are.
CHAI_API size_t chaiClusteredAttentionWorkspaceSize(ChaiClusteredAttentionParams const* params);

// sizeof(ChaiClusteredAttentionParams), so that ctypes/FFI callers can check their struct layout.
CHAI_API size_t chaiClusteredAttentionParamsSize(void);

// Writes present_key, present_value and output on `stream`. Returns a ChaiStatus.
CHAI_API int chaiClusteredAttentionEnqueue(ChaiClusteredAttentionParams const* params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
