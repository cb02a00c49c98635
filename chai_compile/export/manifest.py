"""manifest.json of an export directory: versions, file hashes, graph inputs/outputs, stats, validation."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("chai-compile", "torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime",
                 "onnxruntime-gpu", "onnxruntime-extensions"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def io_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(vi: Any) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def build_manifest(out_dir: Path, graph: Path, **fields: Any) -> dict[str, Any]:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(Path(out_dir).iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format_version": FORMAT_VERSION, "graph": graph.name, "versions": versions(), "files": files,
            **io_signature(graph), **fields}
