// CPU kernel of CHAI clustered attention (float32), on the same params struct as the CUDA kernel
// (../tensorrt/clusteredAttentionKernel.h) so that both bindings fill one description of a call.
#pragma once

#include "clusteredAttentionKernel.h"

#include <stddef.h>

namespace chai
{

// Runs fn(ctx, i) for i in [0, total), possibly in parallel (ONNX Runtime's intra-op pool in the op).
using ParallelFor = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* ctx);

// Writes present_* (concat, or only the new rows with share_buffer) then output. Pointers are host
// pointers; dtype must be CHAI_DTYPE_FLOAT32. Returns a ChaiStatus.
int clusteredAttentionCpu(ChaiClusteredAttentionParams const& p, ParallelFor parallelFor, void* runner);

// The span path (ring_window > 0 or span tables set; clusteredAttentionSpanCpu.cc): attention over the past
// rows and the new ones with real-token indices and per-cluster spans, then the caches written.
int clusteredAttentionSpanCpu(ChaiClusteredAttentionParams const& p, ParallelFor parallelFor, void* runner);

} // namespace chai
