"""The fused form: one `ClusteredAttention` node (chai_compile.kernels.fused_op contract) per clustered layer.

Path: a torch.library custom op `chai::clustered_attention` stands for the attention core; each static
rewritten layer of the model the export owns (a copy, unless the caller gave it up) is replaced, through
its parent, by a `FusedClusteredAttention` built from it; torch.onnx.export's custom_translation_table
turns each call into a node in domain ai.onnx.contrib with the attributes of the layer's cluster layout
(op_type = TensorRT plugin name, plus `plugin_namespace`). ONNX Runtime runs the node through the compiled
op library (plugins/onnxruntime, see ort_ops) or, without it, the onnxruntime-extensions Python op of
ort_python_op; either way the fused graph is verified by the same decode loop as the portable one.
Span layers become one node per head group with ring caches (fused_span.py); shared layers and the layers
whose probabilities they reuse stay portable inside the fused graph, as dense layers do.

Heads are permuted at export so clusters are contiguous ranges (the layout); W_o's input columns are
permuted the same way, which is exact, so no un-permute op is left in the graph.
"""

from __future__ import annotations

import functools
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from chai_compile.choices import KVCacheMode, LayerKind
from chai_compile.errors import ExportError
from chai_compile.kernels import fused_op
from chai_compile.layout import layer_layout
from chai_compile.rewrite.base import ClusteredAttention, owned_linear
from chai_compile.rewrite.static import StaticClusteredAttention, positioned_qkv


@torch.library.custom_op("chai::clustered_attention", mutates_args=())
def clustered_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    attention_mask: torch.Tensor, num_heads: int, cluster_offsets: list[int], k_head_index: list[int],
    v_head_index: list[int], num_k_heads: int, num_v_heads: int, head_dim: int, scale: float, causal: int,
    past_present_share_buffer: int, ring_sinks: int, ring_window: int, span_sinks: list[int], span_window: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager implementation: the contract's float64 reference, cast back to the query dtype."""
    attrs = fused_op.node_attributes(
        num_heads=num_heads, cluster_offsets=cluster_offsets, k_head_index=k_head_index,
        v_head_index=v_head_index, num_k_heads=num_k_heads, num_v_heads=num_v_heads, head_dim=head_dim,
        scale=scale, causal=causal, past_present_share_buffer=past_present_share_buffer, ring_sinks=ring_sinks,
        ring_window=ring_window, span_sinks=span_sinks, span_window=span_window)
    out, pk, pv = fused_op.clustered_attention_reference(query, key, value, past_key, past_value, attention_mask,
                                                         **attrs)
    return out.to(query.dtype), pk.clone(), pv.clone()


@clustered_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, num_heads, cluster_offsets, k_head_index,
      v_head_index, num_k_heads, num_v_heads, head_dim, scale, causal, past_present_share_buffer, ring_sinks,
      ring_window, span_sinks, span_window):
    b, _, s, d = query.shape
    if past_present_share_buffer:  # present_* are the buffers' shapes
        return query.new_empty(b, s, num_heads * d), torch.empty_like(past_key), torch.empty_like(past_value)
    if ring_window:  # a ring: min(past + new, sinks + window) rows, the mask's length being past + new
        rows = torch.sym_min(attention_mask.shape[1], ring_sinks + ring_window)
        return (query.new_empty(b, s, num_heads * d), past_key.new_empty(b, past_key.shape[1], rows, d),
                past_value.new_empty(b, past_value.shape[1], rows, d))
    return (query.new_empty(b, s, num_heads * d), torch.cat([past_key, key], dim=2),
            torch.cat([past_value, value], dim=2))


def _translate(query, key, value, past_key, past_value, attention_mask, num_heads, cluster_offsets, k_head_index,
               v_head_index, num_k_heads, num_v_heads, head_dim, scale, causal, past_present_share_buffer, ring_sinks,
               ring_window, span_sinks, span_window):
    """onnxscript translation: one node of the contract (attributes checked by fused_op.node_attributes)."""
    from onnxscript import values

    contrib = values.Opset(fused_op.DOMAIN, 1)
    attrs = fused_op.node_attributes(
        num_heads=num_heads, cluster_offsets=list(cluster_offsets), k_head_index=list(k_head_index),
        v_head_index=list(v_head_index), num_k_heads=num_k_heads, num_v_heads=num_v_heads, head_dim=head_dim,
        scale=scale, causal=causal, past_present_share_buffer=past_present_share_buffer, ring_sinks=ring_sinks,
        ring_window=ring_window, span_sinks=list(span_sinks), span_window=list(span_window))
    # values.Op, not getattr(contrib, ...): the domain has no registered onnx schema to look up.
    node = values.Op(contrib, fused_op.OP_TYPE, _op_schema())
    return node(query, key, value, past_key, past_value, attention_mask, **attrs)


@functools.cache
def _op_schema() -> Any:
    """An onnx OpSchema of the contract: the exporter's tracer needs one to know the output count and types."""
    from onnx import defs

    fp = defs.OpSchema.FormalParameter
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    attr_types = {"string": defs.OpSchema.AttrType.STRING, "int": defs.OpSchema.AttrType.INT,
                  "ints": defs.OpSchema.AttrType.INTS, "float": defs.OpSchema.AttrType.FLOAT}
    return defs.OpSchema(
        fused_op.OP_TYPE, fused_op.DOMAIN, 1,
        inputs=[fp(n, "M" if n == "attention_mask" else "T") for n in fused_op.INPUTS],
        outputs=[fp(n, "T") for n in fused_op.OUTPUTS],
        type_constraints=[("T", types, "float tensors"), ("M", ["tensor(int32)"], "mask")],
        attributes=[defs.OpSchema.Attribute(n, attr_types[t], "") for n, t in fused_op.ATTRIBUTES],
    )


class _MaskHolder:
    """The wrapper's 2D mask as int32 (the node's contract), shared by every fused layer of one call.

    Why a holder: transformers hands attention modules a 4D mask it built; the node wants the 2D one.
    """

    mask: torch.Tensor | None = None

    def __call__(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.to(torch.int32)


def take_over(fused: nn.Module, layer: ClusteredAttention) -> None:
    """What a fused layer takes from the rewritten layer it replaces (the export owns the model): the adapter
    and layer index, the original forward (what adapter_for() reads on a rewritten model) and the Q/K/V
    projections (what positioned_qkv reads)."""
    fused.adapter, fused.layer_idx = layer.adapter, layer.layer_idx
    fused.original_forward = layer.original_forward
    fused.q_proj, fused.k_proj, fused.v_proj, fused.q_scale = layer.q_proj, layer.k_proj, layer.v_proj, layer.q_scale


class FusedClusteredAttention(nn.Module):
    """A static rewritten layer whose attention core is the contract's node; built from that layer.

    Takes over its Q/K/V projections (the export owns the model they belong to) and holds W_o with its
    input columns in the layout's permuted order, which the node's output is in."""

    def __init__(self, layer: StaticClusteredAttention, mask: _MaskHolder, kv_cache: KVCacheMode) -> None:
        super().__init__()
        take_over(self, layer)
        self.num_clusters, self.num_kept, self.num_kv_heads = layer.num_clusters, layer.num_kept, layer.num_kv_heads
        h, d = layer.num_heads, layer.head_dim
        self.head_dim = d
        w = layer.o_proj.weight.detach()
        perm = torch.tensor(layer.layout.permutation, device=w.device)
        self.o_proj = owned_linear(w.view(w.shape[0], h, d).index_select(1, perm).reshape(w.shape[0], h * d),
                                   layer.o_proj.bias)
        self.mask = mask
        self.attributes = fused_op.layer_attributes(layer.layout, head_dim=d, scale=layer.scale, kv_cache=kv_cache)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = self.adapter.call_inputs(args, kwargs)
        q, k, v = positioned_qkv(self, call)
        # The node returns the present cache (concatenated, or the written buffer): it replaces the layer's
        # tensors in the DecoderWrapper's own DynamicCache, whose update() would concatenate a second time.
        layer = getattr(call.cache, "self_attention_cache", call.cache).layers[self.layer_idx]
        out, layer.keys, layer.values = run_node(q, k, v, layer.keys, layer.values, self.mask.mask, self.attributes)
        return self.o_proj(out), None


def run_node(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
             mask: torch.Tensor, a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op (one node of the graph) with the attributes `a` of fused_op.node_attributes."""
    return torch.ops.chai.clustered_attention(
        q, k, v, past_key, past_value, mask, a["num_heads"], a["cluster_offsets"], a["k_head_index"],
        a["v_head_index"], a["num_k_heads"], a["num_v_heads"], a["head_dim"], a["scale"], a["causal"],
        a["past_present_share_buffer"], a["ring_sinks"], a["ring_window"], a["span_sinks"], a["span_window"])


def _static_dense_layers(model: nn.Module) -> None:
    """Replace each dense layer's attention by a static ClusteredAttention of one head per cluster (the
    identity layout: same outputs to float rounding, same K cache heads), so that it too exports as a node."""
    from chai_compile.adapters import adapter_for
    from chai_compile.mapping import LayerMapping

    ad = adapter_for(model)
    spec = ad.spec
    for i in range(spec.num_layers):
        old = ad.attention(i)
        if isinstance(old, ClusteredAttention):
            continue
        layout = layer_layout(LayerMapping(i, LayerKind.DENSE), spec.num_heads, spec.num_kv_heads)
        _replace(model, old, StaticClusteredAttention(ad, i, layout))


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Set `new` where `old` sits under `root` (on its parent, by name)."""
    name = next(n for n, m in root.named_modules() if m is old)
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, new)


def prepare_fused(wrapper: nn.Module, copy: bool = True, kv_cache: str = KVCacheMode.CONCAT
                  ) -> tuple[nn.Module, dict[Any, Any]]:
    """The DecoderWrapper (a copy, or itself) with static and span layers running the custom op; plus the table.

    Shared layers, and the layers whose probabilities they reuse (a node hands out no probabilities), stay
    in the portable form inside the fused graph, as dense layers do. kv_cache="inplace" gives every node
    the shared-buffer contract, so every layer must be a node: dense layers become identity-clustered ones
    first (one head per cluster: the same function), span layers' nodes take their bounded caches as ring
    buffers, and shared layers are refused (onnx_export.refuse_unexportable)."""
    from chai_compile.export.fused_span import FusedSpanAttention
    from chai_compile.rewrite.shared import SharedAttention
    from chai_compile.rewrite.span import SpanAttention

    if kv_cache not in KVCacheMode.values():
        raise ExportError(f"--kv-cache must be one of {', '.join(KVCacheMode.values())}", value=kv_cache)
    mode = KVCacheMode(kv_cache)
    if copy:
        wrapper = deepcopy(wrapper)  # the export's own model: its modules are replaced below
    if mode == KVCacheMode.INPLACE:
        _static_dense_layers(wrapper.model)
        wrapper.inplace_cache = True
    holder = _MaskHolder()
    wrapper.before_call = holder
    every = [m for m in wrapper.modules() if isinstance(m, ClusteredAttention)]
    sources = {m.source for m in every if isinstance(m, SharedAttention)}
    layers = [m for m in every if not isinstance(m, SharedAttention) and m.layer_idx not in sources]
    if not layers:
        raise ExportError("the fused form found no clustered or span layer to fuse (shared layers and their "
                          "sources stay portable)", value=len(every),
                          fix="use --attention portable, or a plan with clustered or span layers")
    for layer in layers:  # all checked before any is replaced
        if not isinstance(layer, StaticClusteredAttention | SpanAttention):
            raise ExportError("the fused form needs static membership", value=str(layer.membership))
    for layer in layers:
        fused = FusedSpanAttention(layer, holder, mode) if isinstance(layer, SpanAttention) else \
            FusedClusteredAttention(layer, holder, mode)
        _replace(wrapper, layer, fused)
    return wrapper, {torch.ops.chai.clustered_attention.default: _translate}
