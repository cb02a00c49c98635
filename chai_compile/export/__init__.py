"""ONNX export of original and CHAI-rewritten decoders (portable standard ops or one fused node per layer).

`export_decoder` writes a graph with a KV cache (Optimum / onnxruntime-genai names); `OrtDecoder` runs it;
`chai-compile export` / `verify-artifact` drive both from the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562): `chai_compile.export.cli` must not import torch and onnx for `--help`.
_LAZY = {"MIN_OPSET": "onnx_export", "ExportResult": "onnx_export", "export_decoder": "onnx_export",
         "OrtDecoder": "ort_runner"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
