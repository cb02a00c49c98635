// CPU smoke test of libchai_trt_plugin.so through its exported getCreators, the way TensorRT loads it:
// creator identity and fields, createPlugin, capabilities, output types, format combinations,
// workspace, serialize -> recreate round trip, clone, and rejection of bad tables. Needs no GPU and
// no TensorRT library (only the headers). Usage: chai_plugin_smoke /path/to/libchai_trt_plugin.so
// Prints "SMOKE OK" and exits 0 when every check holds.

#include "NvInferRuntime.h"

#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool ok, char const* what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok)
        ++gFailures;
}

struct Fields
{
    int32_t h = 8, c = 3, hk = 3, hv = 8, d = 64, causal = 1, share = 0;
    std::vector<int32_t> offsets{0, 3, 5, 8};
    std::vector<int32_t> kidx{0, 1, 2};
    std::vector<int32_t> vidx{0, 1, 2, 3, 4, 5, 6, 7};
    float scale = 0.125f;
    std::vector<PluginField> list;
    PluginFieldCollection fc{};

    PluginFieldCollection const* make()
    {
        list = {
            PluginField("plugin_namespace", "chai", PluginFieldType::kCHAR, 5),
            PluginField("plugin_version", "1", PluginFieldType::kCHAR, 2),
            PluginField("num_heads", &h, PluginFieldType::kINT32, 1),
            PluginField("num_clusters", &c, PluginFieldType::kINT32, 1),
            PluginField("num_k_heads", &hk, PluginFieldType::kINT32, 1),
            PluginField("num_v_heads", &hv, PluginFieldType::kINT32, 1),
            PluginField("head_dim", &d, PluginFieldType::kINT32, 1),
            PluginField("cluster_offsets", offsets.data(), PluginFieldType::kINT32, static_cast<int32_t>(offsets.size())),
            PluginField("k_head_index", kidx.data(), PluginFieldType::kINT32, static_cast<int32_t>(kidx.size())),
            PluginField("v_head_index", vidx.data(), PluginFieldType::kINT32, static_cast<int32_t>(vidx.size())),
            PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
            PluginField("causal", &causal, PluginFieldType::kINT32, 1),
            PluginField("past_present_share_buffer", &share, PluginFieldType::kINT32, 1),
        };
        fc.nbFields = static_cast<int32_t>(list.size());
        fc.fields = list.data();
        return &fc;
    }
};

// Bytes of a serialized field collection, to compare two plugins' serializations.
std::string flatten(PluginFieldCollection const* fc)
{
    std::string out;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        size_t const elt = f.type == PluginFieldType::kCHAR ? 1 : 4;
        out += f.name;
        out += ':';
        out.append(static_cast<char const*>(f.data), elt * static_cast<size_t>(f.length));
        out += ';';
    }
    return out;
}

char const* typeName(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kCHAR: return "kCHAR";
    case PluginFieldType::kINT32: return "kINT32";
    case PluginFieldType::kFLOAT32: return "kFLOAT32";
    default: return "other";
    }
}

DynamicPluginTensorDesc desc(DataType type, int32_t rank)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = rank;
    for (int32_t i = 0; i < rank; ++i)
        d.desc.dims.d[i] = -1;
    return d;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s libchai_trt_plugin.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    check(getCreators != nullptr, "getCreators exported");
    check(dlsym(lib, "setLoggerFinder") != nullptr, "setLoggerFinder exported");
    if (getCreators == nullptr)
        return 1;
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 1 && creators != nullptr && creators[0] != nullptr, "one creator");
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0, "creator kind is PLUGIN CREATOR_V3ONE");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "ClusteredAttention") == 0, "creator name");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version");
    check(std::strcmp(creator->getPluginNamespace(), "chai") == 0, "creator namespace");
    PluginFieldCollection const* declared = creator->getFieldNames();
    check(declared != nullptr && declared->nbFields == 17, "17 declared fields");
    // The test compares these lines with chai_compile/fused_op.py ATTRIBUTES.
    for (int32_t i = 0; declared != nullptr && i < declared->nbFields; ++i)
        std::printf("field %s %s\n", declared->fields[i].name, typeName(declared->fields[i].type));

    Fields fields;
    IPluginV3* plugin = creator->createPlugin("layer0", fields.make(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin with valid fields");
    if (plugin == nullptr)
        return 1;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, "core/build/runtime capabilities");
    check(std::strcmp(core->getPluginName(), "ClusteredAttention") == 0, "plugin name");
    check(std::strcmp(core->getPluginNamespace(), "chai") == 0, "plugin namespace");
    check(build->getNbOutputs() == 3, "3 outputs");
    // The in-place contract is declared as I/O aliasing (build capability V2); concat aliases nothing.
    auto* build2 = static_cast<IPluginV3OneBuildV2*>(build);
    check(build2->getAliasedInput(1) == -1 && build2->getAliasedInput(2) == -1, "concat: present not aliased");
    {
        Fields inPlace;
        inPlace.share = 1;
        IPluginV3* p2 = creator->createPlugin("layer1", inPlace.make(), TensorRTPhase::kBUILD);
        auto* b2 = p2 ? static_cast<IPluginV3OneBuildV2*>(p2->getCapabilityInterface(PluginCapabilityType::kBUILD))
                      : nullptr;
        check(b2 && b2->getAliasedInput(0) == -1 && b2->getAliasedInput(1) == 3 && b2->getAliasedInput(2) == 4,
            "in place: present_key/present_value alias past_key/past_value");
        delete p2;
    }

    DataType inTypes[6] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF,
        DataType::kINT32};
    DataType outTypes[3] = {};
    check(build->getOutputDataTypes(outTypes, 3, inTypes, 6) == 0 && outTypes[0] == DataType::kHALF
            && outTypes[1] == DataType::kHALF && outTypes[2] == DataType::kHALF,
        "output types follow the inputs");

    std::vector<DynamicPluginTensorDesc> io;
    for (int32_t i = 0; i < 5; ++i)
        io.push_back(desc(DataType::kBF16, 4));
    io.push_back(desc(DataType::kINT32, 2));
    io.push_back(desc(DataType::kBF16, 3));
    io.push_back(desc(DataType::kBF16, 4));
    io.push_back(desc(DataType::kBF16, 4));
    bool allOk = true;
    for (int32_t pos = 0; pos < 9; ++pos)
        allOk = allOk && build->supportsFormatCombination(pos, io.data(), 6, 3);
    check(allOk, "bf16 + int32 mask accepted");
    io[5].desc.type = DataType::kINT64;
    check(build->supportsFormatCombination(5, io.data(), 6, 3), "int64 mask accepted");
    io[5].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(5, io.data(), 6, 3), "float mask refused");
    io[2].desc.type = DataType::kHALF;
    check(!build->supportsFormatCombination(2, io.data(), 6, 3), "mixed float types refused");
    io[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, io.data(), 6, 3), "int8 query refused");
    io[0].desc.type = DataType::kFLOAT;
    io[0].desc.format = TensorFormat::kHWC8;
    check(!build->supportsFormatCombination(0, io.data(), 6, 3), "non-linear format refused");

    check(build->getWorkspaceSize(nullptr, 6, nullptr, 3) > 0, "workspace > 0");

    PluginFieldCollection const* serialized = runtime->getFieldsToSerialize();
    bool sameFields = declared != nullptr && serialized->nbFields == declared->nbFields;
    for (int32_t i = 0; sameFields && i < serialized->nbFields; ++i)
        sameFields = std::strcmp(serialized->fields[i].name, declared->fields[i].name) == 0
            && serialized->fields[i].type == declared->fields[i].type;
    check(sameFields, "serialized fields are the declared fields, in order and of the declared types");
    std::string const first = flatten(serialized);
    IPluginV3* again = creator->createPlugin("layer0", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
    check(again != nullptr, "recreate from serialized fields");
    if (again != nullptr)
    {
        auto* rt2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(flatten(rt2->getFieldsToSerialize()) == first, "serialization round trip is identical");
        delete again;
    }
    IPluginV3* copy = plugin->clone();
    check(copy != nullptr, "clone");
    if (copy != nullptr)
    {
        auto* rt3 = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(flatten(rt3->getFieldsToSerialize()) == first, "clone serializes the same");
        delete copy;
    }

    Fields bad;
    bad.offsets = {0, 5, 3, 8};
    check(creator->createPlugin("bad", bad.make(), TensorRTPhase::kBUILD) == nullptr, "non-increasing offsets refused");
    Fields badK;
    badK.kidx = {0, 1, 7};
    check(creator->createPlugin("bad", badK.make(), TensorRTPhase::kBUILD) == nullptr, "k_head_index out of range refused");
    Fields badNs;
    badNs.make();
    badNs.list[0] = PluginField("plugin_namespace", "other", PluginFieldType::kCHAR, 6);
    check(creator->createPlugin("bad", &badNs.fc, TensorRTPhase::kBUILD) == nullptr, "wrong namespace refused");

    Fields noScale;
    noScale.make();
    noScale.fc.nbFields -= 3; // drops scale, causal and the optional past_present_share_buffer
    check(creator->createPlugin("bad", &noScale.fc, TensorRTPhase::kBUILD) == nullptr, "missing scale refused");
    Fields span; // a span node (ring cache, a span per cluster): the CUDA kernel has no span path
    span.make();
    int32_t ringSinks = 2, ringWindow = 4;
    std::vector<int32_t> spanSinks{1, 0, 2}, spanWindow{3, 4, 2};
    span.list.push_back(PluginField("ring_sinks", &ringSinks, PluginFieldType::kINT32, 1));
    span.list.push_back(PluginField("ring_window", &ringWindow, PluginFieldType::kINT32, 1));
    span.list.push_back(PluginField("span_sinks", spanSinks.data(), PluginFieldType::kINT32, 3));
    span.list.push_back(PluginField("span_window", spanWindow.data(), PluginFieldType::kINT32, 3));
    span.fc.nbFields = static_cast<int32_t>(span.list.size());
    span.fc.fields = span.list.data();
    check(creator->createPlugin("span", &span.fc, TensorRTPhase::kBUILD) == nullptr, "span attributes refused");
    Fields old;
    old.make();
    old.fc.nbFields -= 1; // engines from before past_present_share_buffer: concat
    IPluginV3* concat = creator->createPlugin("old", &old.fc, TensorRTPhase::kRUNTIME);
    check(concat != nullptr, "past_present_share_buffer is optional");
    delete concat;

    delete plugin;
    std::printf(gFailures == 0 ? "SMOKE OK\n" : "SMOKE FAILED (%d)\n", gFailures);
    return gFailures == 0 ? 0 : 1;
}
