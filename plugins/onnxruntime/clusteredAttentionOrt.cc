// ONNX Runtime custom-op library for the CHAI `ClusteredAttention` node (domain ai.onnx.contrib): a CPU
// kernel (clusteredAttentionCpu.cc) and, built with CUDA, a CUDA kernel that is the TensorRT plugin's
// (../tensorrt/clusteredAttentionKernel.cu). Contract: chai_compile/fused_op.py and README.md here.
//
// Only ONNX Runtime's C API is used, through the OrtApi table the runtime hands to RegisterCustomOps:
// nothing links against libonnxruntime, and one build serves every runtime that offers the API version
// asked for (CHAI_ORT_API_VERSION). Every failure returns an OrtStatus with one line naming the node
// and the fix; nothing throws across the C boundary.

#include "clusteredAttentionConfig.h"
#include "clusteredAttentionCpu.h"
#include "onnxruntime_c_api.h"

#ifdef CHAI_ORT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#ifndef CHAI_ORT_API_VERSION
#define CHAI_ORT_API_VERSION 17 // KernelContext_ParallelFor (1.17) is the newest entry used
#endif

namespace
{

OrtApi const* gApi = nullptr;
constexpr char const* kDomain = "ai.onnx.contrib";
constexpr char const* kOpName = "ClusteredAttention";
enum In { kQuery, kKey, kValue, kPastKey, kPastValue, kMask, kNbIn };
enum Out { kOutput, kPresentKey, kPresentValue, kNbOut };

OrtStatus* fail(std::string const& node, std::string const& what)
{
    std::string const msg = "ClusteredAttention node '" + node + "': " + what;
    return gApi->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
}

// One reader per field kind of clusteredAttentionConfig.h. Each returns whether the attribute is present
// (absent optional fields keep their declared default), or the failure status in `st`.
bool readAttribute(OrtKernelInfo const* info, char const* name, int32_t& out, OrtStatus*& st)
{
    int64_t v = 0;
    if ((st = gApi->KernelInfoGetAttribute_int64(info, name, &v)))
        return false;
    out = static_cast<int32_t>(v);
    return true;
}

bool readAttribute(OrtKernelInfo const* info, char const* name, float& out, OrtStatus*& st)
{
    return !(st = gApi->KernelInfoGetAttribute_float(info, name, &out));
}

bool readAttribute(OrtKernelInfo const* info, char const* name, std::vector<int32_t>& out, OrtStatus*& st)
{
    size_t n = 0;
    if ((st = gApi->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)))
        return false;
    std::vector<int64_t> v(n);
    if (n > 0 && (st = gApi->KernelInfoGetAttributeArray_int64(info, name, v.data(), &n)))
        return false;
    out.assign(v.begin(), v.end());
    return true;
}

bool readAttribute(OrtKernelInfo const* info, char const* name, std::string& out, OrtStatus*& st)
{
    size_t n = 0;
    if ((st = gApi->KernelInfoGetAttribute_string(info, name, nullptr, &n)))
        return false;
    std::vector<char> v(n + 1, '\0');
    if ((st = gApi->KernelInfoGetAttribute_string(info, name, v.data(), &n)))
        return false;
    out = v.data();
    return true;
}

struct Kernel
{
    chai::ClusteredAttentionConfig config; // owns the span tables that `tables` points into
    ChaiClusteredAttentionParams tables{}; // layer constants; shapes and pointers are filled per call
    std::string node;
    bool cuda = false;
};

// The layer constants: every declared field read, then the plugin's own validation (one rule set).
OrtStatus* readTables(OrtKernelInfo const* info, Kernel& k)
{
    chai::ClusteredAttentionConfig& cfg = k.config;
    std::string missing;
    chai::ClusteredAttentionConfig::forEachField(cfg, [&](char const* name, auto& member, bool required) {
        OrtStatus* st = nullptr;
        if (!readAttribute(info, name, member, st) && required)
            missing += std::string(missing.empty() ? "" : ", ") + name;
        if (st)
            gApi->ReleaseStatus(st);
    });
    if (!missing.empty())
        return fail(k.node, "attribute " + missing + " is missing");
    std::string const err = cfg.validate();
    if (!err.empty())
        return fail(k.node, err);
    if (k.cuda && cfg.hasSpans())
        return fail(k.node, "span attributes (ring_window / span_window) have no CUDA kernel: run the graph on "
                            "the CPU execution provider, or export span layers with --attention portable");
    k.tables = cfg.toParams();
    return nullptr;
}

OrtStatus* ORT_API_CALL createKernel(OrtCustomOp const* op, OrtApi const*, OrtKernelInfo const* info, void** out);
OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx);

struct TensorView
{
    void* data = nullptr;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> dims;
};

OrtStatus* view(OrtValue const* v, TensorView& t)
{
    OrtTensorTypeAndShapeInfo* info = nullptr;
    OrtStatus* st = gApi->GetTensorTypeAndShape(v, &info);
    size_t rank = 0;
    if (!st && !(st = gApi->GetTensorElementType(info, &t.type)) && !(st = gApi->GetDimensionsCount(info, &rank)))
    {
        t.dims.resize(rank);
        st = gApi->GetDimensions(info, t.dims.data(), rank);
    }
    if (info)
        gApi->ReleaseTensorTypeAndShapeInfo(info);
    return st ? st : gApi->GetTensorMutableData(const_cast<OrtValue*>(v), &t.data);
}

std::string shapeText(std::vector<int64_t> const& dims)
{
    std::string s = "[";
    for (size_t i = 0; i < dims.size(); ++i)
        s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
}

// Shapes of the six inputs against the attributes: fills p's shapes, or says what disagrees.
OrtStatus* checkShapes(Kernel const& k, TensorView const* in, ChaiClusteredAttentionParams& p)
{
    static char const* const names[kNbIn] = {"query", "key", "value", "past_key", "past_value", "attention_mask"};
    int64_t const heads[5] = {p.num_clusters, p.num_k_heads, p.num_v_heads, p.num_k_heads, p.num_v_heads};
    static char const* const attr[5] = {"num_clusters", "num_k_heads", "num_v_heads", "num_k_heads", "num_v_heads"};
    for (int i = 0; i < kNbIn; ++i)
        if (in[i].dims.size() != (i == kMask ? 2u : 4u) || in[i].dims[0] != in[kQuery].dims[0])
            return fail(k.node, std::string(names[i]) + " has shape " + shapeText(in[i].dims) + ", expected rank "
                    + (i == kMask ? "2" : "4") + " with batch " + std::to_string(in[kQuery].dims[0]));
    for (int i = 0; i < 5; ++i)
    {
        if (in[i].dims[1] != heads[i])
            return fail(k.node, std::string(names[i]) + " has " + std::to_string(in[i].dims[1]) + " heads (shape "
                    + shapeText(in[i].dims) + ") but " + attr[i] + " is " + std::to_string(heads[i]));
        if (in[i].dims[3] != p.head_dim)
            return fail(k.node, std::string(names[i]) + " rows have " + std::to_string(in[i].dims[3])
                    + " values but head_dim is " + std::to_string(p.head_dim));
        if (i > 0 && in[i].type != in[kQuery].type)
            return fail(k.node, std::string(names[i]) + " has another element type than query");
    }
    int64_t const S = in[kQuery].dims[2], rows = in[kPastKey].dims[2], maskLen = in[kMask].dims[1];
    if (in[kKey].dims[2] != S || in[kValue].dims[2] != S || in[kPastValue].dims[2] != rows)
        return fail(k.node, "key/value hold another number of new tokens than query, or past_value another "
                            "length than past_key");
    bool const ring = p.ring_window > 0;
    int64_t const P = p.share_buffer || ring ? maskLen - S : rows, N = int64_t(p.ring_sinks) + p.ring_window;
    if (ring && (P < 0 || (p.share_buffer ? rows < std::min(P + S, N) : rows != std::min(P, N))))
        return fail(k.node, "past_key holds " + std::to_string(rows) + " rows but the ring of " + std::to_string(N)
                + " rows after " + std::to_string(std::max<int64_t>(P, 0)) + " past tokens needs "
                + (p.share_buffer ? "at least min(past + new, sinks + window) = " + std::to_string(std::min(P + S, N))
                                  : "min(past, sinks + window) = " + std::to_string(std::min(P, N)))
                + " (attention_mask covers past + new = " + std::to_string(maskLen) + " tokens)");
    if (!ring && (p.share_buffer ? (P < 0 || maskLen > rows) : maskLen != rows + S))
        return fail(k.node, "attention_mask covers " + std::to_string(maskLen) + " tokens but "
                + (p.share_buffer ? "the shared cache buffer holds " + std::to_string(rows)
                                  : "past + new = " + std::to_string(rows + S))
                + (p.share_buffer ? " rows (past_present_share_buffer=1: the buffer must hold past + new tokens)"
                                  : " (past_present_share_buffer=0: past_key holds exactly the past tokens)"));
    if (in[kMask].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 && in[kMask].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
        return fail(k.node, "attention_mask must be int32 or int64");
    p.batch = static_cast<int32_t>(in[kQuery].dims[0]);
    p.seq_len = static_cast<int32_t>(S);
    p.past_len = static_cast<int32_t>(P);
    p.cache_len = static_cast<int32_t>(rows);
    p.mask_dtype = in[kMask].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? CHAI_MASK_INT64 : CHAI_MASK_INT32;
    switch (in[kQuery].type)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: p.dtype = CHAI_DTYPE_FLOAT32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: p.dtype = CHAI_DTYPE_FLOAT16; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: p.dtype = CHAI_DTYPE_BFLOAT16; break;
    default: return fail(k.node, "query must be float32, float16 or bfloat16");
    }
    return nullptr;
}

struct Pool
{
    OrtKernelContext const* ctx;
};

void ortParallelFor(void* runner, void (*fn)(void*, size_t), size_t total, void* fnCtx)
{
    auto const* ctx = static_cast<Pool*>(runner)->ctx;
    if (total <= 1)
    {
        for (size_t i = 0; i < total; ++i)
            fn(fnCtx, i);
        return;
    }
    if (OrtStatus* st = gApi->KernelContext_ParallelFor(ctx, fn, total, 0, fnCtx))
    {
        gApi->ReleaseStatus(st); // no pool (e.g. a single-threaded session): run the rows here
        for (size_t i = 0; i < total; ++i)
            fn(fnCtx, i);
    }
}

#ifdef CHAI_ORT_WITH_CUDA
// The TensorRT plugin's kernel on ONNX Runtime's compute stream, with a workspace from ONNX Runtime's CUDA
// allocator. Freeing it right after the launch is safe: the arena hands the block out again only to work
// ordered after this launch on the same stream (ONNX Runtime runs a CUDA graph's nodes on one stream).
OrtStatus* computeCuda(Kernel const& k, OrtKernelContext* ctx, ChaiClusteredAttentionParams& p)
{
    void* stream = nullptr;
    if (OrtStatus* st = gApi->KernelContext_GetGPUComputeStream(ctx, &stream))
        return st;
    int dev = 0;
    cudaGetDevice(&dev);
    OrtMemoryInfo* mem = nullptr;
    OrtAllocator* alloc = nullptr;
    if (OrtStatus* st = gApi->CreateMemoryInfo("Cuda", OrtArenaAllocator, dev, OrtMemTypeDefault, &mem))
        return st;
    OrtStatus* st = gApi->KernelContext_GetAllocator(ctx, mem, &alloc);
    gApi->ReleaseMemoryInfo(mem);
    if (st)
        gApi->ReleaseStatus(st); // no allocator: run without the split-sequence path (workspace stays null)
    size_t const bytes = chaiClusteredAttentionWorkspaceSize(&p);
    p.workspace = alloc && bytes ? alloc->Alloc(alloc, bytes) : nullptr;
    p.workspace_bytes = p.workspace ? bytes : 0;
    int const rc = chaiClusteredAttentionEnqueue(&p, static_cast<cudaStream_t>(stream));
    if (alloc)
    {
        if (p.workspace)
            alloc->Free(alloc, p.workspace);
        gApi->ReleaseAllocator(alloc);
    }
    if (rc == CHAI_ERR_UNSUPPORTED)
        return fail(k.node, "batch x clusters x new tokens exceeds the CUDA grid (2^31 blocks)");
    if (rc == CHAI_ERR_CUDA)
        return fail(k.node, std::string("CUDA error: ") + cudaGetErrorString(cudaGetLastError()));
    return rc == CHAI_OK ? nullptr : fail(k.node, "CUDA kernel rejected the call (code " + std::to_string(rc) + ")");
}
#endif

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx)
{
    Kernel const& k = *static_cast<Kernel*>(kernel);
    TensorView in[kNbIn];
    for (int i = 0; i < kNbIn; ++i)
    {
        OrtValue const* v = nullptr;
        if (OrtStatus* st = gApi->KernelContext_GetInput(ctx, i, &v))
            return st;
        if (OrtStatus* st = view(v, in[i]))
            return st;
    }
    ChaiClusteredAttentionParams p = k.tables;
    if (OrtStatus* st = checkShapes(k, in, p))
        return st;
    int64_t const B = p.batch, S = p.seq_len, d = p.head_dim;
    int64_t const presentRows = p.share_buffer ? p.cache_len
        : p.ring_window > 0 ? std::min<int64_t>(p.past_len + S, int64_t(p.ring_sinks) + p.ring_window)
                            : p.past_len + S;
    int64_t const outDims[kNbOut][4] = {{B, S, int64_t(p.num_heads) * d, 0}, {B, p.num_k_heads, presentRows, d},
        {B, p.num_v_heads, presentRows, d}};
    void* outs[kNbOut] = {};
    for (int i = 0; i < kNbOut; ++i)
    {
        OrtValue* v = nullptr;
        if (OrtStatus* st = gApi->KernelContext_GetOutput(ctx, i, outDims[i], i == kOutput ? 3 : 4, &v))
            return st;
        if (OrtStatus* st = gApi->GetTensorMutableData(v, &outs[i]))
            return st;
    }
    p.query = in[kQuery].data, p.key = in[kKey].data, p.value = in[kValue].data;
    p.past_key = in[kPastKey].data, p.past_value = in[kPastValue].data, p.attention_mask = in[kMask].data;
    p.output = outs[kOutput], p.present_key = outs[kPresentKey], p.present_value = outs[kPresentValue];
    p.num_splits = 0;
#ifdef CHAI_ORT_WITH_CUDA
    if (k.cuda)
        return computeCuda(k, ctx, p);
#endif
    Pool pool{ctx};
    int const rc = chai::clusteredAttentionCpu(p, ortParallelFor, &pool);
    if (rc == CHAI_ERR_UNSUPPORTED)
        return fail(k.node, "the CPU kernel runs float32 only (export with --dtype fp32, or run on CUDA)");
    return rc == CHAI_OK ? nullptr : fail(k.node, "CPU kernel rejected the call (code " + std::to_string(rc) + ")");
}

OrtStatus* ORT_API_CALL createKernel(OrtCustomOp const* op, OrtApi const*, OrtKernelInfo const* info, void** out)
{
    auto* k = new Kernel();
    char name[256] = {};
    size_t size = sizeof name;
    if (OrtStatus* st = gApi->KernelInfo_GetNodeName(info, name, &size))
        gApi->ReleaseStatus(st); // a name longer than 255 characters: report the node without it
    k->node = name;
    char const* ep = op->GetExecutionProviderType(op);
    k->cuda = ep != nullptr && strcmp(ep, "CUDAExecutionProvider") == 0;
    if (OrtStatus* st = readTables(info, *k))
    {
        delete k;
        return st;
    }
    *out = k;
    return nullptr;
}

// One OrtCustomOp per (execution provider, float type): ONNX Runtime merges same-named ops into one schema.
struct OpDef : OrtCustomOp
{
    ONNXTensorElementDataType floatType;
    char const* ep; // nullptr: the CPU execution provider
};

OpDef makeOp(ONNXTensorElementDataType floatType, char const* ep)
{
    OpDef o{};
    o.version = CHAI_ORT_API_VERSION;
    o.floatType = floatType;
    o.ep = ep;
    o.GetName = [](OrtCustomOp const*) { return kOpName; };
    o.GetExecutionProviderType = [](OrtCustomOp const* op) { return static_cast<OpDef const*>(op)->ep; };
    o.GetInputTypeCount = [](OrtCustomOp const*) -> size_t { return kNbIn; };
    o.GetOutputTypeCount = [](OrtCustomOp const*) -> size_t { return kNbOut; };
    o.GetInputType = [](OrtCustomOp const* op, size_t i) {
        return i == kMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : static_cast<OpDef const*>(op)->floatType;
    };
    o.GetOutputType = [](OrtCustomOp const* op, size_t) { return static_cast<OpDef const*>(op)->floatType; };
    o.GetInputCharacteristic = [](OrtCustomOp const*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    o.GetOutputCharacteristic = [](OrtCustomOp const*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    o.GetInputMemoryType = [](OrtCustomOp const*, size_t) { return OrtMemTypeDefault; };
    o.GetVariadicInputMinArity = [](OrtCustomOp const*) { return 1; };
    o.GetVariadicInputHomogeneity = [](OrtCustomOp const*) { return 1; };
    o.GetVariadicOutputMinArity = [](OrtCustomOp const*) { return 1; };
    o.GetVariadicOutputHomogeneity = [](OrtCustomOp const*) { return 1; };
    o.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
    o.CreateKernelV2 = createKernel;
    o.KernelComputeV2 = compute;
    o.GetStartVersion = [](OrtCustomOp const*) { return 1; };
    o.GetEndVersion = [](OrtCustomOp const*) { return INT_MAX; };
    return o;
}

} // namespace

#if defined(_WIN32)
#define CHAI_ORT_EXPORT __declspec(dllexport)
#else
#define CHAI_ORT_EXPORT __attribute__((visibility("default")))
#endif

// The C API version this build asks for, so that a loader can tell what it needs before loading it.
extern "C" CHAI_ORT_EXPORT int ChaiOrtApiVersion(void)
{
    return CHAI_ORT_API_VERSION;
}

// The node attributes this build reads, comma-separated, from the one field list: the loader compares it with
// the package's (kernels/fused_op.py), so a library built from older sources, which would not read newer
// attributes (span layers' rings), is refused instead of running a graph it does not understand.
#define CHAI_FIELD_NAME(name, type, init, required) "," #name
extern "C" CHAI_ORT_EXPORT char const* ChaiOrtAttributes(void)
{
    static char const* const names = CHAI_CLUSTERED_ATTENTION_FIELDS(CHAI_FIELD_NAME);
    return names + 1; // past the leading comma
}
#undef CHAI_FIELD_NAME

extern "C" CHAI_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* base)
{
    OrtApi const* api = base->GetApi(CHAI_ORT_API_VERSION);
    if (api == nullptr) // an older runtime than this build asks for: say so through the oldest API table
    {
        char msg[400];
        snprintf(msg, sizeof msg,
            "the ClusteredAttention op library was built for ONNX Runtime C API version %d, which this ONNX Runtime "
            "(%s) does not offer; fix: rebuild it with -DCHAI_ORT_API_VERSION=<this runtime's API version>",
            CHAI_ORT_API_VERSION, base->GetVersionString());
        return base->GetApi(1)->CreateStatus(ORT_FAIL, msg);
    }
    gApi = api;
    // Static: ONNX Runtime keeps pointers to the ops and the domain for the life of every session made with
    // these options, so both live as long as the library (the domain is deliberately never released).
    static OpDef ops[] = {
        makeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, nullptr),
#ifdef CHAI_ORT_WITH_CUDA
        makeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "CUDAExecutionProvider"),
        makeOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "CUDAExecutionProvider"),
#endif
    };
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain))
        return st;
    for (OpDef const& op : ops)
        if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op))
            return st;
    return api->AddCustomOpDomain(options, domain);
}
