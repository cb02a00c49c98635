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
"""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.choices import KVCacheMode
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
)
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
) -> dict[str, Any]:
    """The attribute dict of one node, in contract order, checked for consistency."""
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
    """Raise ValueError when the attributes cannot describe a layer (same rules as the plugin)."""
    missing = [n for n in ATTRIBUTE_NAMES if n not in attrs]
    if missing:
        raise ValueError(f"ClusteredAttention attributes missing: {missing}")
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
