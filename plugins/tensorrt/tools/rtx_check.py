"""GPU-machine check with TensorRT-RTX: does its ONNX parser accept (1) a portable clustered-attention graph
(Gather/MatMul/Softmax) and (2) one fused ClusteredAttention node mapped to the chai plugin; can it build
engines; can it run them here. Prints one line per step: ACCEPTED / REFUSED with TensorRT's message.

Usage: python rtx_check.py PLUGIN_LIB OUT_DIR
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from chai_compile.export.tensorrt import build_engine, symbolic_profile  # noqa: E402
from chai_compile.kernels import fused_op  # noqa: E402

H, C, HK, HV, D = 8, 3, 3, 8, 64
OFFSETS = [0, 3, 5, 8]
K_IDX = [0, 1, 2]
V_IDX = list(range(H))
CLUSTER = [0, 0, 0, 1, 1, 2, 2, 2]


def import_rtx():
    try:
        import tensorrt_rtx as trt  # type: ignore[import-not-found]
    except ImportError:
        import tensorrt_rtx_bindings as trt  # type: ignore[import-not-found]
    return trt


def portable_graph(path: Path) -> None:
    """q [B,C,S,d], k [B,Hk,T,d], v [B,Hv,T,d], additive mask [B,1,S,T] -> out [B,H,S,d] with standard ops."""
    f = TensorProto.FLOAT
    inits = [
        helper.make_tensor("scale", f, [], [D**-0.5]),
        helper.make_tensor("cluster_of_head", TensorProto.INT64, [H], CLUSTER),
        helper.make_tensor("v_idx", TensorProto.INT64, [H], V_IDX),
        helper.make_tensor("k_idx", TensorProto.INT64, [C], K_IDX),
    ]
    nodes = [
        helper.make_node("Gather", ["key", "k_idx"], ["k_sel"], axis=1),
        helper.make_node("Transpose", ["k_sel"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["query", "k_t"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["qk_s"]),
        helper.make_node("Add", ["qk_s", "mask"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("Gather", ["probs", "cluster_of_head"], ["probs_h"], axis=1),
        helper.make_node("Gather", ["value", "v_idx"], ["v_sel"], axis=1),
        helper.make_node("MatMul", ["probs_h", "v_sel"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "portable_clustered_attention",
        [
            helper.make_tensor_value_info("query", f, ["B", C, "S", D]),
            helper.make_tensor_value_info("key", f, ["B", HK, "T", D]),
            helper.make_tensor_value_info("value", f, ["B", HV, "T", D]),
            helper.make_tensor_value_info("mask", f, ["B", 1, "S", "T"]),
        ],
        [helper.make_tensor_value_info("output", f, ["B", H, "S", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def fused_graph(path: Path, mask_type: int, float_type: int = TensorProto.FLOAT) -> None:
    attrs = fused_op.node_attributes(
        num_heads=H, cluster_offsets=OFFSETS, k_head_index=K_IDX, v_head_index=V_IDX,
        num_k_heads=HK, num_v_heads=HV, head_dim=D, scale=D**-0.5,
    )  # fmt: skip
    node = helper.make_node(fused_op.OP_TYPE, list(fused_op.INPUTS), list(fused_op.OUTPUTS), domain=fused_op.DOMAIN)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    f = float_type
    graph = helper.make_graph(
        [node],
        "fused_clustered_attention",
        [
            helper.make_tensor_value_info("query", f, ["B", C, "S", D]),
            helper.make_tensor_value_info("key", f, ["B", HK, "S", D]),
            helper.make_tensor_value_info("value", f, ["B", HV, "S", D]),
            helper.make_tensor_value_info("past_key", f, ["B", HK, "P", D]),
            helper.make_tensor_value_info("past_value", f, ["B", HV, "P", D]),
            helper.make_tensor_value_info("attention_mask", mask_type, ["B", "T"]),
        ],
        [
            helper.make_tensor_value_info("output", f, ["B", "S", H * D]),
            helper.make_tensor_value_info("present_key", f, ["B", HK, "T", D]),
            helper.make_tensor_value_info("present_value", f, ["B", HV, "T", D]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(fused_op.DOMAIN, 1)]
    )
    onnx.save(model, path)


def listed(reg) -> list:
    creators = list(getattr(reg, "all_creators", [])) + list(getattr(reg, "plugin_creator_list", []))
    found = [(c.name, c.plugin_version, c.plugin_namespace) for c in creators if "Clustered" in c.name]
    if not found:
        raise RuntimeError("ClusteredAttention not in registry.all_creators")
    return found


def step(name: str, fn) -> object:
    try:
        result = fn()
    except Exception as exc:  # report everything: this script is a probe
        print(f"REFUSED {name}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=2)
        return None
    print(f"ACCEPTED {name}: {result}", flush=True)
    return result


def try_run(trt, engine_path: Path, plugin_lib: str | None) -> str:
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if plugin_lib:
        runtime.get_plugin_registry().load_library(plugin_lib)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine returned None")
    ctx = engine.create_execution_context()
    if ctx is None:
        raise RuntimeError("create_execution_context returned None")
    return f"engine deserialized, {engine.num_io_tensors} IO tensors, context created"


def main() -> None:
    plugin_lib, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    trt = step("import tensorrt_rtx", import_rtx)
    if trt is None:
        return
    print("tensorrt_rtx version", getattr(trt, "__version__", "?"), flush=True)

    if os.environ.get("CHAI_RTX_CHILD"):
        return fused_cases(trt, plugin_lib, out)
    portable = out / "portable.onnx"
    portable_graph(portable)
    ranges = {"B": (1, 2, 4), "S": (1, 1, 64), "T": (1, 128, 1024)}

    prof = symbolic_profile(
        {"query": ["B", C, "S", D], "key": ["B", HK, "T", D], "value": ["B", HV, "T", D], "mask": ["B", 1, "S", "T"]},
        ranges,
    )
    built = step(
        "portable graph: parse + build", lambda: build_engine(portable, None, out / "portable", [prof], trt=trt)
    )
    if built is not None:
        step("portable graph: deserialize + context on this GPU", lambda: try_run(trt, built.engine, None))

    reg = trt.get_plugin_registry()
    if step("load_library(libchai_trt_plugin.so)", lambda: reg.load_library(plugin_lib)) is not None:
        step("registry lists ClusteredAttention", lambda: listed(reg))
        step(
            "registry get_creator(ClusteredAttention, 1, chai)",
            lambda: reg.get_creator("ClusteredAttention", "1", "chai"),
        )

    fused_cases(trt, plugin_lib, out)


def fused_cases(trt, plugin_lib: str, out: Path) -> None:
    fprof = symbolic_profile(
        {
            "query": ["B", C, "S", D], "key": ["B", HK, "S", D], "value": ["B", HV, "S", D],
            "past_key": ["B", HK, "P", D], "past_value": ["B", HV, "P", D], "attention_mask": ["B", "P+S"],
        },
        {"B": (1, 2, 4), "S": (1, 1, 16), "P": (0, 127, 1023)},
    )  # fmt: skip
    cases = {
        "fused node fp32, int32 mask": (TensorProto.INT32, TensorProto.FLOAT),
        "fused node fp32, int64 mask": (TensorProto.INT64, TensorProto.FLOAT),
        "fused node fp16, int32 mask": (TensorProto.INT32, TensorProto.FLOAT16),
    }
    child = os.environ.get("CHAI_RTX_CHILD")
    if child is None:
        # Each fused case in its own process: a crash inside TensorRT must not end the probe.
        for label in cases:
            env = {**os.environ, "CHAI_RTX_CHILD": label}
            run = subprocess.run(
                [sys.executable, __file__, plugin_lib, str(out)], env=env, capture_output=True, text=True
            )
            print(run.stdout + run.stderr, flush=True)
            if run.returncode != 0:
                print(f"REFUSED {label}: the process died with code {run.returncode}", flush=True)
        return
    mtype, ftype = cases[child]
    path = out / (child.replace(" ", "_").replace(",", "") + ".onnx")
    fused_graph(path, mtype, ftype)
    res = step(f"{child}: parse + build", lambda: build_engine(path, plugin_lib, out / path.stem, [fprof], trt=trt))
    if res is not None:
        step(f"{child}: deserialize + context on this GPU", lambda: try_run(trt, res.engine, plugin_lib))


if __name__ == "__main__":
    np.random.seed(0)
    main()
