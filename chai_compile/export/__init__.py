"""ONNX export of original and CHAI-rewritten decoders (portable standard ops or one fused node per layer).

`export_decoder` writes a graph with a KV cache (Optimum / onnxruntime-genai names); `OrtDecoder` runs it;
`chai-compile export` / `verify-artifact` drive both from the command line.
"""

from chai_compile.export.onnx_export import MIN_OPSET, ExportResult, export_decoder
from chai_compile.export.ort_runner import OrtDecoder

__all__ = ["MIN_OPSET", "ExportResult", "OrtDecoder", "export_decoder"]
