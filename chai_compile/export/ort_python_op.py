"""The fused node in ONNX Runtime without the compiled op library: an onnxruntime-extensions Python op
that runs the contract's reference (chai_compile.kernels.fused_op). Imports neither the rewrite nor the
exporter, so running a fused graph stays on the runtime side of the stages."""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from chai_compile.kernels import fused_op

_LIST_ATTRS = ("cluster_offsets", "k_head_index", "v_head_index", "span_sinks", "span_window")
_STR_SUFFIX = "__json"  # ORT python ops read only scalar attributes: lists travel as JSON strings there


@functools.cache
def register_ort_op() -> None:
    """Register the Python implementation of the node with onnxruntime-extensions (once per process).

    Float32 only: a Python op is bound to one type signature; fp16 fused graphs are for TensorRT.
    """
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64
    attrs = {"num_heads": i64, "num_k_heads": i64, "num_v_heads": i64, "head_dim": i64, "causal": i64,
             "past_present_share_buffer": i64, "ring_sinks": i64, "ring_window": i64, "scale": PyCustomOpDef.dt_float}
    attrs.update({n + _STR_SUFFIX: PyCustomOpDef.dt_string for n in _LIST_ATTRS})

    @onnx_op(op_type=fused_op.OP_TYPE, domain=fused_op.DOMAIN, inputs=[f, f, f, f, f, i32], outputs=[f, f, f],
             attrs=attrs)
    def _clustered_attention(query, key, value, past_key, past_value, attention_mask, **kw):
        kw = {n.removesuffix(_STR_SUFFIX): json.loads(v) if n.endswith(_STR_SUFFIX) else v for n, v in kw.items()}
        kw = {**fused_op.OPTIONAL_DEFAULTS, **kw}  # a graph from before an optional attribute lacks it
        query, *rest = (torch.from_numpy(np.asarray(a)) for a in
                        (query, key, value, past_key, past_value, attention_mask))
        out, pk, pv = fused_op.clustered_attention_reference(query, *rest, **fused_op.node_attributes(**kw))
        return out.to(query.dtype).numpy(), pk.numpy(), pv.numpy()


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
