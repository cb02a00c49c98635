// The ClusteredAttention node's attributes, declared once: the layer-constant struct, the TensorRT
// plugin's fields (creation, serialization, deserialization) and the ONNX Runtime op's attribute reads
// are all generated from CHAI_CLUSTERED_ATTENTION_FIELDS. No TensorRT or ONNX Runtime header is needed
// here, so tools/printFields.cpp builds with a plain C++ compiler and tests/test_tensorrt_plugin.py
// compares what it prints with chai_compile/fused_op.py ATTRIBUTES.
#pragma once

#include "clusteredAttentionKernel.h"

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace chai
{

constexpr char const* kPluginName = "ClusteredAttention";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "chai";

// X(name, C++ type, default, required), in the ONNX node's attribute order. The C++ type decides the ONNX
// attribute type and the TensorRT field type (fieldKind below). Optional fields take their default when
// absent: the identity strings, past_present_share_buffer (graphs and engines from before it = concat) and the
// span fields (before them: no span, full-length caches; an empty span list = every cluster unbounded).
#define CHAI_CLUSTERED_ATTENTION_FIELDS(X)                                                                             \
    X(plugin_namespace, std::string, kPluginNamespace, false)                                                          \
    X(plugin_version, std::string, kPluginVersion, false)                                                              \
    X(num_heads, int32_t, 0, true)                                                                                     \
    X(num_clusters, int32_t, 0, true)                                                                                  \
    X(num_k_heads, int32_t, 0, true)                                                                                   \
    X(num_v_heads, int32_t, 0, true)                                                                                   \
    X(head_dim, int32_t, 0, true)                                                                                      \
    X(cluster_offsets, std::vector<int32_t>, , true)                                                                   \
    X(k_head_index, std::vector<int32_t>, , true)                                                                      \
    X(v_head_index, std::vector<int32_t>, , true)                                                                      \
    X(scale, float, 0.f, true)                                                                                         \
    X(causal, int32_t, 1, true)                                                                                        \
    X(past_present_share_buffer, int32_t, 0, false)                                                                \
    X(ring_sinks, int32_t, 0, false)                                                                               \
    X(ring_window, int32_t, 0, false)                                                                              \
    X(span_sinks, std::vector<int32_t>, , false)                                                                   \
    X(span_window, std::vector<int32_t>, , false)

// How a field travels: ONNX attribute type string/int/ints/float = TensorRT kCHAR/kINT32/kINT32/kFLOAT32.
enum class FieldKind
{
    kString,
    kInt,
    kInts,
    kFloat,
};

template <typename T>
constexpr FieldKind fieldKind()
{
    if constexpr (std::is_same_v<T, std::string>)
        return FieldKind::kString;
    else if constexpr (std::is_same_v<T, int32_t>)
        return FieldKind::kInt;
    else if constexpr (std::is_same_v<T, std::vector<int32_t>>)
        return FieldKind::kInts;
    else
    {
        static_assert(std::is_same_v<T, float>, "a field is a string, int32, int32 list or float");
        return FieldKind::kFloat;
    }
}

inline char const* onnxTypeName(FieldKind k)
{
    switch (k)
    {
    case FieldKind::kString: return "string";
    case FieldKind::kInt: return "int";
    case FieldKind::kInts: return "ints";
    case FieldKind::kFloat: return "float";
    }
    return "?";
}

// Layer constants fixed at export, one member per declared field.
struct ClusteredAttentionConfig
{
#define CHAI_FIELD_MEMBER(name, type, init, required) type name{init};
    CHAI_CLUSTERED_ATTENTION_FIELDS(CHAI_FIELD_MEMBER)
#undef CHAI_FIELD_MEMBER

    // Calls f(name, member, required) for every field, in declaration order.
    template <typename Self, typename F>
    static void forEachField(Self& self, F&& f)
    {
#define CHAI_VISIT_FIELD(name, type, init, required) f(#name, self.name, required);
        CHAI_CLUSTERED_ATTENTION_FIELDS(CHAI_VISIT_FIELD)
#undef CHAI_VISIT_FIELD
    }

    // Empty when valid, else what is wrong ("; "-separated).
    std::string validate() const;
    // The span fields' rules (chai_compile/kernels/fused_op.py validate_span_attributes states the same).
    void validateSpans(std::ostringstream& err) const;
    // Copies the constants and tables into a kernel params struct (pointers and shapes left zero; the span
    // tables point into this config, which must outlive the params).
    ChaiClusteredAttentionParams toParams() const;
    // Whether the node takes the span path (a ring cache or a cluster with a span): the CPU kernel's only.
    bool hasSpans() const
    {
        return ring_window != 0 || std::any_of(span_window.begin(), span_window.end(), [](int32_t w) { return w != 0; });
    }
};

inline std::string ClusteredAttentionConfig::validate() const
{
    std::ostringstream err;
    if (plugin_namespace != kPluginNamespace || plugin_version != kPluginVersion)
        err << "plugin_namespace/plugin_version must be " << kPluginNamespace << "/" << kPluginVersion << ", got "
            << plugin_namespace << "/" << plugin_version << "; ";
    if (num_heads < 1 || num_heads > CHAI_MAX_HEADS)
        err << "num_heads must be in [1, " << CHAI_MAX_HEADS << "], got " << num_heads << "; ";
    if (num_clusters < 1 || num_clusters > num_heads)
        err << "num_clusters must be in [1, num_heads], got " << num_clusters << "; ";
    if (num_k_heads < 1 || num_v_heads < 1)
        err << "num_k_heads and num_v_heads must be >= 1; ";
    if (head_dim < 1 || head_dim > 256)
        err << "head_dim must be in [1, 256], got " << head_dim << "; ";
    if (static_cast<int32_t>(cluster_offsets.size()) != num_clusters + 1)
        err << "cluster_offsets needs num_clusters+1 entries, got " << cluster_offsets.size() << "; ";
    else
    {
        if (cluster_offsets.front() != 0 || cluster_offsets.back() != num_heads)
            err << "cluster_offsets must run from 0 to num_heads; ";
        for (size_t c = 0; c + 1 < cluster_offsets.size(); ++c)
            if (cluster_offsets[c + 1] <= cluster_offsets[c])
            {
                err << "cluster_offsets must be strictly increasing; ";
                break;
            }
    }
    if (static_cast<int32_t>(k_head_index.size()) != num_clusters)
        err << "k_head_index needs num_clusters entries, got " << k_head_index.size() << "; ";
    for (int32_t k : k_head_index)
        if (k < 0 || k >= num_k_heads)
        {
            err << "k_head_index entry " << k << " outside [0, num_k_heads); ";
            break;
        }
    if (static_cast<int32_t>(v_head_index.size()) != num_heads)
        err << "v_head_index needs num_heads entries, got " << v_head_index.size() << "; ";
    for (int32_t v : v_head_index)
        if (v < 0 || v >= num_v_heads)
        {
            err << "v_head_index entry " << v << " outside [0, num_v_heads); ";
            break;
        }
    if (causal != 0 && causal != 1)
        err << "causal must be 0 or 1, got " << causal << "; ";
    if (past_present_share_buffer != 0 && past_present_share_buffer != 1)
        err << "past_present_share_buffer must be 0 or 1, got " << past_present_share_buffer << "; ";
    validateSpans(err);
    std::string text = err.str();
    return text.empty() ? text : text.substr(0, text.size() - 2);
}

inline void ClusteredAttentionConfig::validateSpans(std::ostringstream& err) const
{
    bool const none = span_sinks.empty() && span_window.empty();
    if (!none
        && (static_cast<int32_t>(span_sinks.size()) != num_clusters
            || static_cast<int32_t>(span_window.size()) != num_clusters))
    {
        err << "span_sinks and span_window need num_clusters entries (or none), got " << span_sinks.size() << " and "
            << span_window.size() << "; ";
        return;
    }
    bool inRing = true;
    for (size_t c = 0; c < span_window.size(); ++c)
    {
        if (span_window[c] < 0 || span_sinks[c] < 0 || (span_window[c] == 0 && span_sinks[c] != 0))
        {
            err << "span_sinks/span_window must be >= 0, sinks 0 where the window is 0 (cluster " << c << ": "
                << span_sinks[c] << ", " << span_window[c] << "); ";
            return;
        }
        inRing = inRing && span_window[c] > 0 && span_window[c] <= ring_window && span_sinks[c] <= ring_sinks;
    }
    if (ring_sinks < 0 || ring_window < 0 || (ring_window == 0 && ring_sinks != 0))
        err << "ring_sinks/ring_window must be >= 0, ring_sinks 0 without a ring, got " << ring_sinks << ", "
            << ring_window << "; ";
    else if (ring_window > 0 && (none || !inRing))
        err << "with a ring of " << ring_sinks << " sinks + " << ring_window
            << " window rows every cluster needs a span inside it; ";
    if (hasSpans() && causal != 1)
        err << "span attributes need causal = 1; ";
}

inline ChaiClusteredAttentionParams ClusteredAttentionConfig::toParams() const
{
    ChaiClusteredAttentionParams p{};
    p.num_heads = num_heads;
    p.num_clusters = num_clusters;
    p.num_k_heads = num_k_heads;
    p.num_v_heads = num_v_heads;
    p.head_dim = head_dim;
    p.scale = scale;
    p.causal = causal;
    p.share_buffer = past_present_share_buffer;
    std::copy(cluster_offsets.begin(), cluster_offsets.end(), p.cluster_offsets);
    std::copy(k_head_index.begin(), k_head_index.end(), p.k_head_index);
    std::copy(v_head_index.begin(), v_head_index.end(), p.v_head_index);
    p.ring_sinks = ring_sinks;
    p.ring_window = ring_window;
    bool const spans = hasSpans();
    p.span_sinks = spans ? span_sinks.data() : nullptr;
    p.span_window = spans ? span_window.data() : nullptr;
    return p;
}

} // namespace chai
