"""Graph hygiene and statistics: unused initializers out, checker in, weight bytes / op counts / file size."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx


def finalize_ir(model: Any, metadata: dict[str, str]) -> None:
    """On the exporter's onnx_ir model: drop unused nodes and initializers, attach metadata.

    Why here and not on the ModelProto: the IR knows each value's uses, so pruning is exact and does
    not need the weights loaded a second time (external data stays lazy).
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)  # also removes initializers nothing reads (the sliced-away Q/K rows)
    graph = model.graph
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        del graph.initializers[name]
    for k, v in metadata.items():
        model.metadata_props[k] = v


def check(path: Path) -> None:
    """onnx.checker on the path (handles external data and > 2 GB models)."""
    onnx.checker.check_model(str(path), full_check=False)


def graph_stats(path: Path) -> dict[str, Any]:
    """Weight bytes, initializer count, op-type counts, file sizes (graph and external data)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    weight = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        weight += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    files = {p.name: p.stat().st_size for p in path.parent.iterdir()
             if p.is_file() and (p == path or p.name.startswith(path.name))}
    return {
        "weight_bytes": weight,
        "initializers": len(model.graph.initializer),
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items())),
        "file_bytes": sum(files.values()),
        "files": files,
    }


def initializer_shapes(path: Path) -> dict[str, list[int]]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: list(i.dims) for i in model.graph.initializer}
