// Prints the ClusteredAttention field declaration (clusteredAttentionConfig.h) as the plugin and the
// ONNX Runtime op see it, one line each:
//   plugin <name> <version> <namespace>
//   field <name> <ONNX attribute type> <required|optional>
//   valid <1|0> <what validate() says of a default config and of a small valid one>
// Needs only a C++17 compiler: g++ -std=c++17 -DCHAI_KERNEL_NO_CUDA -I plugins/tensorrt printFields.cpp
// tests/test_tensorrt_plugin.py builds it and compares the lines with chai_compile/fused_op.py.

#include "clusteredAttentionConfig.h"

#include <cstdio>

int main()
{
    using chai::ClusteredAttentionConfig;
    std::printf("plugin %s %s %s\n", chai::kPluginName, chai::kPluginVersion, chai::kPluginNamespace);
    ClusteredAttentionConfig const declared;
    ClusteredAttentionConfig::forEachField(declared, [](char const* name, auto const& value, bool required) {
        using T = std::decay_t<decltype(value)>;
        std::printf("field %s %s %s\n", name, chai::onnxTypeName(chai::fieldKind<T>()),
            required ? "required" : "optional");
    });
    std::printf("valid %d %s\n", declared.validate().empty() ? 1 : 0, declared.validate().c_str());
    ClusteredAttentionConfig small;
    small.num_heads = 4;
    small.num_clusters = 2;
    small.num_k_heads = 2;
    small.num_v_heads = 4;
    small.head_dim = 8;
    small.cluster_offsets = {0, 1, 4};
    small.k_head_index = {1, 0};
    small.v_head_index = {0, 1, 2, 3};
    small.scale = 0.35f;
    std::printf("valid %d %s\n", small.validate().empty() ? 1 : 0, small.validate().c_str());
    return 0;
}
