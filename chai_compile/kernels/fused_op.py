"""The fused ONNX `ClusteredAttention` node: its contract as constants, its attributes from a layer's
cluster layout, and its reference (the float64 one of kernels/reference.py, with the cache contract).

One node per layer replaces the attention core. Heads are already permuted at export so that cluster c
is the contiguous head range [cluster_offsets[c], cluster_offsets[c+1]) of `chai_compile.layout`. The
exporter, the TensorRT plugin (plugins/tensorrt, namespace "chai"), the ONNX Runtime custom op and the
tests all read this module; plugins/tensorrt/README.md states the same contract in prose. It imports
neither the rewrite nor the exporter: running a fused graph needs only this.

    P_c   = softmax(q_c K_{k_head_index[c]}^T * scale + mask)
    out_i = P_{cluster(i)} V_{v_head_index[i]}

Query row s sits at absolute position P+s and attends key j when attention_mask[b, j] == 1 and, with
causal=1, j <= P+s. A row with no attended key follows the reference's masked-row rule (zeros).

Two KV-cache contracts (attribute past_present_share_buffer):
  0, concat:   past_* hold exactly the P past tokens; present_* = concat(past_*, new) [B, H*, P+S, d].
  1, in place: past_* are preallocated buffers [B, H*, L, d] holding P = attention_mask.shape[1] - S valid
               rows; present_* have the same shape and equal past_* with rows [P, P+S) replaced by the new
               key/value (P+S <= L). Bound to one buffer (ONNX Runtime IO binding, as GroupQueryAttention's
               past_present_share_buffer) a decode step writes only the new token's K and V.

Span layers (attributes ring_sinks, ring_window, span_sinks, span_window; absent or zero: none of this).
A span layer exports as one node per head group of `rewrite.span.head_groups` (its unbounded KV heads, then
each bounded group), because one cache tensor holds one storage rule: the node's K and V caches are the
group's own tensors of export/cache_layout.py, and the output columns of the nodes are gathered back into
the layer's head order inside W_o (exact, as the cluster permutation).
  span_sinks, span_window [C]: cluster c's query row of real index i reads key j (real indices: a sequence's
               tokens counted without its padding) when 0 <= j <= i and (span_window[c] == 0 or
               j < span_sinks[c] or j > i - span_window[c]): the rewrite's span rule. With any span (or a
               ring) a padding query row reads nothing (zeros), and causal must be 1.
  ring_sinks, ring_window: ring_window = 0, the K/V caches are the full-length ones above. ring_window > 0,
               they are rings of at most N = ring_sinks + ring_window rows holding the first ring_sinks and
               the last ring_window real tokens, real token r in row slot(r) (kernels/span_ring.py, the one
               statement of the rule, which the rewrite's own cache follows too). P = attention_mask.shape[1]
               - S past slots; the rows' real indices follow from the mask's ones among them, so no index
               travels. Concat: past_* hold min(P, N) rows, present_* min(P+S, N): the past copied, then each
               new token that is still kept written at its slot (one row per decode step once full).
               In place: past_* and present_* are one buffer of L >= min(P+S, N) rows, only the kept new
               rows written. Every cluster needs a span inside the ring (span_window in [1, ring_window],
               span_sinks <= ring_sinks). Prefill with a past reads the ring rows and all S new rows before
               any is overwritten, each row masked by its own span.
Why per group and a ring: decode then reads and writes N rows per bounded head whatever the context, with
no index tensor and no gather, and the op keeps its six inputs and three outputs (TensorRT plugins have
fixed I/O). The CUDA kernel (TensorRT plugin, CUDA execution provider) has no span path: nodes with span
attributes are refused when the plugin or the CUDA kernel is created; the CPU op and the Python op run them.
"""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.choices import KVCacheMode
from chai_compile.kernels.fused_span import span_reference
from chai_compile.kernels.reference import clustered_attention
from chai_compile.layout import ClusterLayout, check_offsets

OP_TYPE = "ClusteredAttention"
DOMAIN = "ai.onnx.contrib"  # TensorRT's ONNX parser ignores the domain; onnxruntime-extensions uses it
PLUGIN_NAME = OP_TYPE  # TensorRT maps the node to the plugin by op_type == plugin name
PLUGIN_NAMESPACE = "chai"
PLUGIN_VERSION = "1"

# Ordered (name, ONNX attribute type). "ints" is a list of integers. Must match the field list declared
# in plugins/tensorrt/clusteredAttentionPlugin.h (tests/test_tensorrt_plugin.py checks it).
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("plugin_namespace", "string"),
    ("plugin_version", "string"),
    ("num_heads", "int"),
    ("num_clusters", "int"),
    ("num_k_heads", "int"),
    ("num_v_heads", "int"),
    ("head_dim", "int"),
    ("cluster_offsets", "ints"),
    ("k_head_index", "ints"),
    ("v_head_index", "ints"),
    ("scale", "float"),
    ("causal", "int"),
    ("past_present_share_buffer", "int"),
    ("ring_sinks", "int"),
    ("ring_window", "int"),
    ("span_sinks", "ints"),
    ("span_window", "ints"),
)
# Attributes a graph from before them may lack: the plugin and the op library take these defaults.
OPTIONAL_DEFAULTS: dict[str, Any] = {"past_present_share_buffer": 0, "ring_sinks": 0, "ring_window": 0,
                                     "span_sinks": (), "span_window": ()}
# past_present_share_buffer per KV-cache mode
SHARE_BUFFER: dict[KVCacheMode, int] = {KVCacheMode.CONCAT: 0, KVCacheMode.INPLACE: 1}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(name for name, _ in ATTRIBUTES)

# Inputs and outputs, in order, with their shapes (B batch, C clusters, S new tokens, P past tokens).
INPUTS: tuple[str, ...] = ("query", "key", "value", "past_key", "past_value", "attention_mask")
OUTPUTS: tuple[str, ...] = ("output", "present_key", "present_value")
INPUT_SHAPES: dict[str, str] = {
    "query": "[B, C, S, d]",
    "key": "[B, Hk, S, d]",
    "value": "[B, Hv, S, d]",
    "past_key": "[B, Hk, P, d]",  # in place: [B, Hk, L, d]
    "past_value": "[B, Hv, P, d]",  # in place: [B, Hv, L, d]
    "attention_mask": "[B, P+S]",
}
OUTPUT_SHAPES: dict[str, str] = {
    "output": "[B, S, H*d]",
    "present_key": "[B, Hk, P+S, d]",  # in place: [B, Hk, L, d]
    "present_value": "[B, Hv, P+S, d]",  # in place: [B, Hv, L, d]
}
# Float tensors share one type among these (the plugin's supportsFormatCombination enforces it).
FLOAT_TYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# attention_mask enters the node as int32: the exporter inserts Cast(to=INT32) after the model's int64
# mask. Why: int64 plugin I/O is not something every TensorRT release accepts, int32 is. The plugin
# and the reference also accept int64, but only int32 is part of the contract.
ATTENTION_MASK_TYPE = "int32"


def node_attributes(
    *,
    num_heads: int,
    cluster_offsets: list[int],
    k_head_index: list[int],
    v_head_index: list[int],
    num_k_heads: int,
    num_v_heads: int,
    head_dim: int,
    scale: float,
    causal: int = 1,
    past_present_share_buffer: int = 0,
    ring_sinks: int = 0,
    ring_window: int = 0,
    span_sinks: list[int] | None = None,
    span_window: list[int] | None = None,
) -> dict[str, Any]:
    """The attribute dict of one node, in contract order, checked for consistency. Spans default to none
    (zeros: every cluster attends all its keys), the caches to full length (ring_window 0)."""
    c = len(cluster_offsets) - 1
    attrs: dict[str, Any] = {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
        "num_heads": int(num_heads),
        "num_clusters": len(cluster_offsets) - 1,
        "num_k_heads": int(num_k_heads),
        "num_v_heads": int(num_v_heads),
        "head_dim": int(head_dim),
        "cluster_offsets": [int(x) for x in cluster_offsets],
        "k_head_index": [int(x) for x in k_head_index],
        "v_head_index": [int(x) for x in v_head_index],
        "scale": float(scale),
        "causal": int(causal),
        "past_present_share_buffer": int(past_present_share_buffer),
        "ring_sinks": int(ring_sinks),
        "ring_window": int(ring_window),
        "span_sinks": [int(x) for x in (span_sinks if span_sinks is not None else [0] * c)],
        "span_window": [int(x) for x in (span_window if span_window is not None else [0] * c)],
    }
    validate_attributes(attrs)
    return attrs


def layer_attributes(layout: ClusterLayout, *, head_dim: int, scale: float, kv_cache: KVCacheMode) -> dict[str, Any]:
    """The node attributes of one layer: its indices are the layout's, verbatim."""
    return node_attributes(
        num_heads=layout.num_heads, cluster_offsets=list(layout.cluster_offsets),
        k_head_index=list(layout.k_head_index), v_head_index=list(layout.v_head_index),
        num_k_heads=len(layout.kept_k_heads), num_v_heads=layout.num_kv_heads, head_dim=head_dim, scale=scale,
        causal=1, past_present_share_buffer=SHARE_BUFFER[KVCacheMode(kv_cache)])


def validate_attributes(attrs: dict[str, Any]) -> None:
    """Raise ValueError when the attributes cannot describe a layer (same rules as the plugin). Absent optional
    attributes (OPTIONAL_DEFAULTS) are filled in, as the plugin and the op library read them."""
    missing = [n for n in ATTRIBUTE_NAMES if n not in attrs and n not in OPTIONAL_DEFAULTS]
    if missing:
        raise ValueError(f"ClusteredAttention attributes missing: {missing}")
    attrs.update({n: v for n, v in OPTIONAL_DEFAULTS.items() if n not in attrs})
    h, c = int(attrs["num_heads"]), int(attrs["num_clusters"])
    if not 1 <= c <= h:
        raise ValueError(f"num_clusters must be in [1, num_heads={h}], got {c}")
    check_offsets(attrs["cluster_offsets"], h)
    if len(attrs["cluster_offsets"]) != c + 1:
        raise ValueError(f"cluster_offsets must hold num_clusters + 1 = {c + 1} values, got {attrs['cluster_offsets']}")
    if len(attrs["k_head_index"]) != c or not all(0 <= k < int(attrs["num_k_heads"]) for k in attrs["k_head_index"]):
        raise ValueError(f"k_head_index must hold {c} indices in [0, num_k_heads), got {attrs['k_head_index']}")
    if len(attrs["v_head_index"]) != h or not all(0 <= v < int(attrs["num_v_heads"]) for v in attrs["v_head_index"]):
        raise ValueError(f"v_head_index must hold {h} indices in [0, num_v_heads), got {attrs['v_head_index']}")
    for flag in ("causal", "past_present_share_buffer"):
        if int(attrs[flag]) not in (0, 1):
            raise ValueError(f"{flag} must be 0 or 1, got {attrs[flag]}")
    validate_span_attributes(attrs)


def validate_span_attributes(attrs: dict[str, Any]) -> None:
    """The span attributes' rules (the plugin's clusteredAttentionConfig.h states the same ones)."""
    c = int(attrs["num_clusters"])
    sinks, window = list(attrs["span_sinks"]), list(attrs["span_window"])
    if not sinks and not window:  # a graph from before spans: none
        sinks = window = [0] * c
    if len(sinks) != c or len(window) != c:
        raise ValueError(f"span_sinks and span_window must hold num_clusters = {c} values, got {sinks}, {window}")
    if any(w < 0 or sk < 0 or (w == 0 and sk) for sk, w in zip(sinks, window, strict=True)):
        raise ValueError(f"span_sinks/span_window must be >= 0, sinks 0 where the window is 0, got {sinks}, {window}")
    rs, rw = int(attrs["ring_sinks"]), int(attrs["ring_window"])
    if rs < 0 or rw < 0 or (rw == 0 and rs):
        raise ValueError(f"ring_sinks/ring_window must be >= 0, ring_sinks 0 without a ring, got {rs}, {rw}")
    if rw and not all(0 < w <= rw and sk <= rs for sk, w in zip(sinks, window, strict=True)):
        raise ValueError(f"with a ring of {rs} sinks + {rw} window rows every cluster needs a span inside it, "
                         f"got span_sinks {sinks}, span_window {window}")
    if (rw or any(window)) and int(attrs["causal"]) != 1:
        raise ValueError("span attributes need causal = 1 (spans count real tokens up to the query)")


def has_spans(attrs: dict[str, Any]) -> bool:
    """Whether the node takes the span path: a ring cache or a cluster with a span."""
    return bool(int(attrs.get("ring_window", 0)) or any(attrs.get("span_window", ())))


def clustered_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    **attrs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 reference of the node: returns (output [B,S,H*d] float64, present_key, present_value).

    present_* follow the attribute's cache contract (concatenation, or the buffer with the new rows written),
    in the inputs' dtype; the attention itself is kernels/reference.py's. Materialises [B, C, S, P+S]
    scores: keep shapes small.
    """
    validate_attributes(attrs)
    if has_spans(attrs):
        return span_reference(query, key, value, past_key, past_value, attention_mask, attrs)
    h = int(attrs["num_heads"])
    b, _, s, d = query.shape
    t = attention_mask.shape[1]
    if int(attrs["past_present_share_buffer"]):
        p = t - s
        if p < 0 or t > past_key.shape[2]:
            raise ValueError(f"attention_mask covers {t} tokens but the shared cache buffer holds {past_key.shape[2]}")
        present_key, present_value = past_key.clone(), past_value.clone()
        present_key[:, :, p:t] = key
        present_value[:, :, p:t] = value
    else:
        p = past_key.shape[2]
        present_key = torch.cat([past_key, key], dim=2)
        present_value = torch.cat([past_value, value], dim=2)
    allowed = (attention_mask != 0).to(query.device)[:, None, None, :]  # [B, 1, 1, T]
    if int(attrs["causal"]):
        rows = torch.arange(s, device=query.device)[:, None] + p
        cols = torch.arange(t, device=query.device)[None, :]
        allowed = allowed & (cols <= rows)[None, None]
    out = clustered_attention(query, present_key[:, :, :t], present_value[:, :, :t], allowed.expand(b, 1, s, t),
                              attrs["cluster_offsets"], attrs["k_head_index"], attrs["v_head_index"],
                              float(attrs["scale"]))  # [B, H, S, d]
    output = out.permute(0, 2, 1, 3).reshape(b, s, h * d)
    return output, present_key, present_value
