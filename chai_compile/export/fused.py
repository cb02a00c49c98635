"""The fused form: one `ClusteredAttention` node (chai_compile.fused_op contract) per clustered layer.

Path: a torch.library custom op `chai::clustered_attention` stands for the attention core in a variant
of the clustered forward; torch.onnx.export's custom_translation_table turns each call into a node in
domain ai.onnx.contrib with the contract's attributes (op_type = TensorRT plugin name, plus
`plugin_namespace`). ONNX Runtime runs the node through the compiled op library (plugins/onnxruntime, see
ort_ops) or, without it, an onnxruntime-extensions Python op that calls the contract's reference; either way
the fused graph is verified by the same decode loop as the portable one.

Heads are permuted at export so clusters are contiguous ranges (the contract); W_o's input columns are
permuted the same way, which is exact, so no un-permute op is left in the graph.
"""

from __future__ import annotations

import functools
import json
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import nn

from chai_compile import fused_op
from chai_compile.rewrite.clustered_attention import ClusteredAttention, _linear

_LIST_ATTRS = ("cluster_offsets", "k_head_index", "v_head_index")
_STR_SUFFIX = "__json"  # ORT python ops read only scalar attributes: lists travel as JSON strings there


@torch.library.custom_op("chai::clustered_attention", mutates_args=())
def clustered_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    attention_mask: torch.Tensor, num_heads: int, cluster_offsets: list[int], k_head_index: list[int],
    v_head_index: list[int], num_k_heads: int, num_v_heads: int, head_dim: int, scale: float, causal: int,
    past_present_share_buffer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager implementation: the contract's float64 reference, cast back to the query dtype."""
    attrs = fused_op.node_attributes(
        num_heads=num_heads, cluster_offsets=cluster_offsets, k_head_index=k_head_index,
        v_head_index=v_head_index, num_k_heads=num_k_heads, num_v_heads=num_v_heads, head_dim=head_dim,
        scale=scale, causal=causal, past_present_share_buffer=past_present_share_buffer)
    out, pk, pv = fused_op.clustered_attention_reference(query, key, value, past_key, past_value, attention_mask,
                                                         **attrs)
    return out.to(query.dtype), pk.clone(), pv.clone()


@clustered_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, num_heads, cluster_offsets, k_head_index,
      v_head_index, num_k_heads, num_v_heads, head_dim, scale, causal, past_present_share_buffer):
    b, _, s, d = query.shape
    if past_present_share_buffer:  # present_* are the buffers' shapes
        return query.new_empty(b, s, num_heads * d), torch.empty_like(past_key), torch.empty_like(past_value)
    return (query.new_empty(b, s, num_heads * d), torch.cat([past_key, key], dim=2),
            torch.cat([past_value, value], dim=2))


def _translate(query, key, value, past_key, past_value, attention_mask, num_heads, cluster_offsets, k_head_index,
               v_head_index, num_k_heads, num_v_heads, head_dim, scale, causal, past_present_share_buffer):
    """onnxscript translation: one node of the contract (attributes checked by fused_op.node_attributes)."""
    from onnxscript import values

    contrib = values.Opset(fused_op.DOMAIN, 1)
    attrs = fused_op.node_attributes(
        num_heads=num_heads, cluster_offsets=list(cluster_offsets), k_head_index=list(k_head_index),
        v_head_index=list(v_head_index), num_k_heads=num_k_heads, num_v_heads=num_v_heads, head_dim=head_dim,
        scale=scale, causal=causal, past_present_share_buffer=past_present_share_buffer)
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


class FusedClusteredAttention(ClusteredAttention):
    """ClusteredAttention whose static core is the custom op (set by `prepare_fused` via __class__)."""

    chai_mask: _MaskHolder
    chai_share_buffer: int = 0  # 1: the in-place cache contract (fused_op)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = self.adapter.call_inputs(args, kwargs)
        x = call.hidden_states
        lay = self.layout
        q = self._heads(self.q_proj(x), len(lay.reps))
        k = self._heads(self.k_proj(x), self.num_kept)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = self.adapter.position(q, k, call)
        layer = getattr(call.cache, "self_attention_cache", call.cache).layers[self.layer_idx]
        out, layer.keys, layer.values = torch.ops.chai.clustered_attention(
            q, k, v, layer.keys, layer.values, self.chai_mask.mask, self.num_heads, list(lay.cluster_offsets),
            list(lay.k_of_cluster), list(lay.v_head_index), self.num_kept, self.num_kv_heads, self.head_dim,
            float(self.scale), 1, self.chai_share_buffer)
        return self.o_proj(out), None


def _fuse_dense_layers(model: nn.Module) -> None:
    """Swap each dense layer's attention for a ClusteredAttention of one head per cluster (the identity
    mapping: same outputs to float rounding, same K cache heads), so that it too exports as a node."""
    from chai_compile.adapters import adapter_for
    from chai_compile.mapping import LayerMapping

    ad = adapter_for(model)
    layers = ad.decoder_layers()
    for i in range(ad.spec.num_layers):
        old = ad.attention(i)
        if isinstance(old, ClusteredAttention):
            continue
        new = ClusteredAttention(ad, i, LayerMapping(i, "dense"), membership="static")
        name = next(n for n, m in layers[i].named_children() if m is old)
        setattr(layers[i], name, new)


def prepare_fused(wrapper: nn.Module, copy: bool = True, kv_cache: str = "concat") -> tuple[nn.Module, dict[Any, Any]]:
    """The DecoderWrapper (a copy, or itself) with clustered layers running the custom op; plus the table.

    kv_cache="inplace" gives every node the shared-buffer contract, so every layer must be a node: dense
    layers become identity-clustered ones first (one head per cluster: the same function, _fuse_dense_layers).
    """
    from chai_compile.errors import ExportError

    if kv_cache not in fused_op.KV_CACHE_MODES:
        raise ExportError(f"--kv-cache must be one of {', '.join(fused_op.KV_CACHE_MODES)}", value=kv_cache)
    if copy:
        wrapper = deepcopy(wrapper)
    if kv_cache == "inplace":
        _fuse_dense_layers(wrapper.model)
        wrapper.inplace_cache = True
    holder = _MaskHolder()
    wrapper.before_call = holder
    found = False
    for mod in wrapper.modules():
        if isinstance(mod, ClusteredAttention):
            if mod.membership != "static":
                from chai_compile.errors import ExportError

                raise ExportError("the fused form needs static membership", value=mod.membership)
            mod.__class__ = FusedClusteredAttention
            mod.chai_mask = holder
            mod.chai_share_buffer = int(kv_cache == "inplace")
            h, d = mod.num_heads, mod.head_dim
            w = mod.o_proj.weight.detach()
            perm = torch.tensor(mod.layout.permutation)
            permuted = w.view(w.shape[0], h, d).index_select(1, perm).reshape(w.shape[0], h * d)
            mod.o_proj = _linear(permuted, mod.o_proj.bias)
            found = True
    if not found:
        raise ExportError("the fused form needs a CHAI-rewritten model (no clustered layer found)",
                          fix="pass --mapping, or use --attention portable")
    return wrapper, {torch.ops.chai.clustered_attention.default: _translate}


# ---- ONNX Runtime (onnxruntime-extensions Python op) ----------------------------------------------------
@functools.cache
def register_ort_op() -> None:
    """Register the Python implementation of the node with onnxruntime-extensions (once per process).

    Float32 only: a Python op is bound to one type signature; fp16 fused graphs are for TensorRT.
    """
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64
    attrs = {"num_heads": i64, "num_k_heads": i64, "num_v_heads": i64, "head_dim": i64, "causal": i64,
             "past_present_share_buffer": i64, "scale": PyCustomOpDef.dt_float}
    attrs.update({n + _STR_SUFFIX: PyCustomOpDef.dt_string for n in _LIST_ATTRS})

    @onnx_op(op_type=fused_op.OP_TYPE, domain=fused_op.DOMAIN, inputs=[f, f, f, f, f, i32], outputs=[f, f, f],
             attrs=attrs)
    def _clustered_attention(query, key, value, past_key, past_value, attention_mask, **kw):
        lists = {n: json.loads(kw.pop(n + _STR_SUFFIX)) for n in _LIST_ATTRS}
        t = [torch.from_numpy(np.asarray(a)) for a in (query, key, value, past_key, past_value, attention_mask)]
        out, pk, pv = clustered_attention(*t, kw["num_heads"], lists["cluster_offsets"], lists["k_head_index"],
                                          lists["v_head_index"], kw["num_k_heads"], kw["num_v_heads"],
                                          kw["head_dim"], kw["scale"], kw["causal"],
                                          kw.get("past_present_share_buffer", 0))
        return out.numpy(), pk.numpy(), pv.numpy()


def ort_ready_model(model: Any) -> bytes:
    """The fused graph with each list attribute also as a JSON string attribute (what the Python op reads).

    The file on disk keeps the contract unchanged; this copy lives only in the session. Its weights stay
    in the external data file (the session is told where, see ort_runner): only the graph is copied.
    `model` is the ModelProto loaded without its external data; it is changed in place.
    """
    import onnx

    for node in model.graph.node:
        if node.domain == fused_op.DOMAIN and node.op_type == fused_op.OP_TYPE:
            for a in list(node.attribute):
                if a.name in _LIST_ATTRS:
                    node.attribute.append(onnx.helper.make_attribute(a.name + _STR_SUFFIX, json.dumps(list(a.ints))))
    return model.SerializeToString()
