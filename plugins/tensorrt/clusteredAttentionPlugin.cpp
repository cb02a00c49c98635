// TensorRT IPluginV3 "ClusteredAttention" (namespace "chai"): shape/type logic, serialization and the
// creator. All arithmetic is in clusteredAttentionKernel.cu, reached through chaiClusteredAttentionEnqueue.

#include "clusteredAttentionPlugin.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>

using namespace nvinfer1;

namespace
{

ILoggerFinder* gLoggerFinder = nullptr;

// Errors go to TensorRT's logger once TensorRT has handed us its finder, else to stderr.
void logError(std::string const& msg)
{
    std::string const text = std::string("[chai ClusteredAttention] ") + msg;
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
        logger->log(ILogger::Severity::kERROR, text.c_str());
    else
        std::fprintf(stderr, "%s\n", text.c_str());
}

bool isFloatType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

int32_t toChaiDType(DataType t)
{
    switch (t)
    {
    case DataType::kHALF: return CHAI_DTYPE_FLOAT16;
    case DataType::kBF16: return CHAI_DTYPE_BFLOAT16;
    default: return CHAI_DTYPE_FLOAT32;
    }
}

// Reads an integer field that the ONNX parser may hand over as INT32 or INT64.
bool readInts(PluginField const& f, std::vector<int32_t>& out)
{
    out.clear();
    if (f.data == nullptr && f.length > 0)
        return false;
    if (f.type == PluginFieldType::kINT32)
    {
        auto const* v = static_cast<int32_t const*>(f.data);
        out.assign(v, v + f.length);
        return true;
    }
    if (f.type == PluginFieldType::kINT64)
    {
        auto const* v = static_cast<int64_t const*>(f.data);
        for (int32_t i = 0; i < f.length; ++i)
            out.push_back(static_cast<int32_t>(v[i]));
        return true;
    }
    return false;
}

bool readScalarInt(PluginField const& f, int32_t& out)
{
    std::vector<int32_t> v;
    if (!readInts(f, v) || v.size() != 1)
        return false;
    out = v[0];
    return true;
}

bool readFloat(PluginField const& f, float& out)
{
    if (f.data == nullptr || f.length != 1)
        return false;
    if (f.type == PluginFieldType::kFLOAT32)
        out = *static_cast<float const*>(f.data);
    else if (f.type == PluginFieldType::kFLOAT64)
        out = static_cast<float>(*static_cast<double const*>(f.data));
    else
        return false;
    return true;
}

bool readString(PluginField const& f, std::string& out)
{
    if (f.data == nullptr || f.type != PluginFieldType::kCHAR)
        return false;
    auto const* s = static_cast<char const*>(f.data);
    out.assign(s, strnlen(s, static_cast<size_t>(f.length)));
    return true;
}

// One reader per field kind (chai::fieldKind): the creator reads every declared field through these.
bool readField(PluginField const& f, std::string& out)
{
    return readString(f, out);
}

bool readField(PluginField const& f, int32_t& out)
{
    return readScalarInt(f, out);
}

bool readField(PluginField const& f, std::vector<int32_t>& out)
{
    return readInts(f, out);
}

bool readField(PluginField const& f, float& out)
{
    return readFloat(f, out);
}

template <typename T>
PluginFieldType pluginFieldType(T const&)
{
    constexpr chai::FieldKind kind = chai::fieldKind<T>();
    if constexpr (kind == chai::FieldKind::kString)
        return PluginFieldType::kCHAR;
    else if constexpr (kind == chai::FieldKind::kFloat)
        return PluginFieldType::kFLOAT32;
    else
        return PluginFieldType::kINT32;
}

// A field pointing into the plugin's config (which outlives the serialized collection); strings keep their NUL.
PluginField toPluginField(char const* name, std::string const& v)
{
    return PluginField(name, v.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(v.size() + 1));
}

PluginField toPluginField(char const* name, std::vector<int32_t> const& v)
{
    return PluginField(name, v.data(), PluginFieldType::kINT32, static_cast<int32_t>(v.size()));
}

template <typename T>
PluginField toPluginField(char const* name, T const& v)
{
    return PluginField(name, &v, pluginFieldType(v), 1);
}

} // namespace

namespace chai
{

// ---------------------------------------------------------------------------------------------------
// ClusteredAttentionPlugin

ClusteredAttentionPlugin::ClusteredAttentionPlugin(ClusteredAttentionConfig config)
    : mConfig(std::move(config))
{
}

IPluginCapability* ClusteredAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* ClusteredAttentionPlugin::clone() noexcept
{
    try
    {
        return new ClusteredAttentionPlugin(mConfig);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

char const* ClusteredAttentionPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* ClusteredAttentionPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* ClusteredAttentionPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t ClusteredAttentionPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t ClusteredAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        return -1;
    // Static checks of the dimensions that the attributes fix (-1 = dynamic, checked at run time by the kernel).
    auto expect = [&](int32_t io, int32_t axis, int32_t want, char const* what) {
        int64_t const got = in[io].desc.dims.d[axis];
        if (got >= 0 && got != want)
        {
            logError(std::string(what) + " is " + std::to_string(got) + ", the attributes say " + std::to_string(want));
            return false;
        }
        return true;
    };
    for (int32_t io = 0; io < kAttentionMask; ++io)
        if (in[io].desc.dims.nbDims != 4)
        {
            logError("query/key/value/past_key/past_value must be rank 4");
            return -1;
        }
    if (in[kAttentionMask].desc.dims.nbDims != 2)
    {
        logError("attention_mask must be rank 2 [B, P+S]");
        return -1;
    }
    bool ok = expect(kQuery, 1, mConfig.num_clusters, "query dim 1 (clusters)")
        && expect(kKey, 1, mConfig.num_k_heads, "key dim 1 (K heads)")
        && expect(kValue, 1, mConfig.num_v_heads, "value dim 1 (V heads)")
        && expect(kPastKey, 1, mConfig.num_k_heads, "past_key dim 1 (K heads)")
        && expect(kPastValue, 1, mConfig.num_v_heads, "past_value dim 1 (V heads)");
    for (int32_t io = 0; io < kAttentionMask && ok; ++io)
        ok = expect(io, 3, mConfig.head_dim, "head dimension");
    return ok ? 0 : -1;
}

int32_t ClusteredAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs)
        return -1;
    outputTypes[kOutput] = inputTypes[kQuery];
    outputTypes[kPresentKey] = inputTypes[kKey];
    outputTypes[kPresentValue] = inputTypes[kValue];
    return 0;
}

int32_t ClusteredAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        return -1;
    DimsExprs const& q = inputs[kQuery]; // [B, C, S, d]
    // output [B, S, H*d]
    outputs[kOutput].nbDims = 3;
    outputs[kOutput].d[0] = q.d[0];
    outputs[kOutput].d[1] = q.d[2];
    outputs[kOutput].d[2] = exprBuilder.constant(static_cast<int64_t>(mConfig.num_heads) * mConfig.head_dim);
    // present_* [B, H*, P+S, d]; in place: the past buffer's shape [B, H*, L, d]
    for (int32_t o : {static_cast<int32_t>(kPresentKey), static_cast<int32_t>(kPresentValue)})
    {
        DimsExprs const& past = inputs[o == kPresentKey ? kPastKey : kPastValue];
        DimsExprs const& cur = inputs[o == kPresentKey ? kKey : kValue];
        outputs[o].nbDims = 4;
        outputs[o].d[0] = cur.d[0];
        outputs[o].d[1] = cur.d[1];
        outputs[o].d[2] = mConfig.past_present_share_buffer
            ? past.d[2]
            : exprBuilder.operation(DimensionOperation::kSUM, *past.d[2], *cur.d[2]);
        outputs[o].d[3] = cur.d[3];
    }
    return 0;
}

bool ClusteredAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
        return false;
    if (pos == kAttentionMask)
        return desc.type == DataType::kINT32 || desc.type == DataType::kINT64;
    // Every float tensor shares the query's type (pos 0 decides among fp32/fp16/bf16).
    if (pos == kQuery)
        return isFloatType(desc.type);
    return desc.type == inOut[kQuery].desc.type;
}

size_t ClusteredAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // Independent of B, S and P: the kernel caps split slots so that this bound always suffices.
    ChaiClusteredAttentionParams const p = mConfig.toParams();
    return chaiClusteredAttentionWorkspaceSize(&p);
}

int32_t ClusteredAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        return -1;
    int64_t const total = in[kPastKey].dims.d[2] + in[kKey].dims.d[2];
    int64_t const maskLen = in[kAttentionMask].dims.d[1];
    if (mConfig.past_present_share_buffer)
    {
        if (maskLen < in[kKey].dims.d[2] || maskLen > in[kPastKey].dims.d[2])
        {
            logError("attention_mask length " + std::to_string(maskLen) + " does not fit the shared cache buffer of "
                + std::to_string(in[kPastKey].dims.d[2]) + " rows (it must cover past + new tokens)");
            return -1;
        }
    }
    else if (maskLen != total)
    {
        logError("attention_mask length " + std::to_string(in[kAttentionMask].dims.d[1]) + " != past + new length "
            + std::to_string(total));
        return -1;
    }
    return 0;
}

int32_t ClusteredAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    ChaiClusteredAttentionParams p = mConfig.toParams();
    Dims const& q = inputDesc[kQuery].dims;
    p.batch = static_cast<int32_t>(q.d[0]);
    p.seq_len = static_cast<int32_t>(q.d[2]);
    int32_t const rows = static_cast<int32_t>(inputDesc[kPastKey].dims.d[2]);
    // In place, P is what the mask covers beyond the new tokens; the buffers hold `rows` >= P+S rows.
    p.past_len = mConfig.past_present_share_buffer
        ? static_cast<int32_t>(inputDesc[kAttentionMask].dims.d[1]) - p.seq_len
        : rows;
    p.cache_len = rows;
    p.dtype = toChaiDType(inputDesc[kQuery].type);
    p.mask_dtype = inputDesc[kAttentionMask].type == DataType::kINT64 ? CHAI_MASK_INT64 : CHAI_MASK_INT32;
    p.query = inputs[kQuery];
    p.key = inputs[kKey];
    p.value = inputs[kValue];
    p.past_key = inputs[kPastKey];
    p.past_value = inputs[kPastValue];
    p.attention_mask = inputs[kAttentionMask];
    p.output = outputs[kOutput];
    p.present_key = outputs[kPresentKey];
    p.present_value = outputs[kPresentValue];
    p.workspace = workspace;
    p.workspace_bytes = chaiClusteredAttentionWorkspaceSize(&p);
    p.num_splits = 0;
    if (p.batch == 0 || p.seq_len == 0)
        return 0; // empty batch or no new tokens: nothing to write
    int const status = chaiClusteredAttentionEnqueue(&p, stream);
    if (status != CHAI_OK)
        logError("chaiClusteredAttentionEnqueue failed with status " + std::to_string(status));
    return status;
}

int32_t ClusteredAttentionPlugin::getAliasedInput(int32_t outputIndex) noexcept
{
    if (!mConfig.past_present_share_buffer)
        return -1;
    if (outputIndex == kPresentKey)
        return kPastKey;
    return outputIndex == kPresentValue ? kPastValue : -1;
}

IPluginV3* ClusteredAttentionPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* ClusteredAttentionPlugin::getFieldsToSerialize() noexcept
{
    mSerialFields.clear();
    ClusteredAttentionConfig::forEachField(mConfig, [this](char const* name, auto const& value, bool) {
        mSerialFields.push_back(toPluginField(name, value));
    });
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

// ---------------------------------------------------------------------------------------------------
// ClusteredAttentionPluginCreator

ClusteredAttentionPluginCreator::ClusteredAttentionPluginCreator()
{
    ClusteredAttentionConfig const declared;
    ClusteredAttentionConfig::forEachField(declared, [this](char const* name, auto const& value, bool) {
        mFields.emplace_back(name, nullptr, pluginFieldType(value), 0);
    });
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* ClusteredAttentionPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* ClusteredAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* ClusteredAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* ClusteredAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* ClusteredAttentionPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        if (fc == nullptr)
        {
            logError("createPlugin got no fields");
            return nullptr;
        }
        ClusteredAttentionConfig cfg;
        std::string bad;
        std::vector<std::string> seen;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            std::string const n = f.name != nullptr ? f.name : "";
            // Unknown fields are ignored so that newer exporters can add optional attributes.
            ClusteredAttentionConfig::forEachField(cfg, [&](char const* name, auto& member, bool) {
                if (n != name)
                    return;
                seen.push_back(n);
                if (!readField(f, member))
                    bad += n + " ";
            });
        }
        ClusteredAttentionConfig::forEachField(cfg, [&](char const* name, auto const&, bool required) {
            if (required && std::find(seen.begin(), seen.end(), name) == seen.end())
                bad += std::string(name) + " (missing) ";
        });
        if (!bad.empty())
        {
            logError("unreadable, wrong or missing fields: " + bad);
            return nullptr;
        }
        std::string const err = cfg.validate();
        if (!err.empty())
        {
            logError(err);
            return nullptr;
        }
        if (cfg.hasSpans())
        {
            logError("span attributes (ring_window / span_window) have no CUDA kernel: run span layers with ONNX "
                     "Runtime's CPU op, or export them in the portable form");
            return nullptr;
        }
        return new ClusteredAttentionPlugin(std::move(cfg));
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace chai

// ---------------------------------------------------------------------------------------------------
// Library entry points looked up by IPluginRegistry::loadLibrary and trtexec --dynamicPlugins.

extern "C" CHAI_API void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

extern "C" CHAI_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static chai::ClusteredAttentionPluginCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
