"""Build a TensorRT engine from a fused ONNX model (ClusteredAttention nodes) and the chai plugin library.

`build_engine` parses the ONNX with TensorRT's ONNX parser after loading the plugin library into the
plugin registry (the parser maps each ClusteredAttention node to the "chai" plugin of that name), adds
one optimization profile per entry of `profiles`, builds, and writes the engine, a copy of the plugin
library, the mapping (optional) and a manifest side by side. `export --format tensorrt` calls it.

Profiles are given per network input as (min, opt, max) shapes, or symbolically with
`symbolic_profile`, e.g. {"past_key_values.0.key": ["batch", 2, "past", 64]} and ranges
{"batch": (1, 1, 8), "past": (0, 512, 4095)}; "past+sequence" style sums are allowed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from chai_compile.choices import ExportFormat
from chai_compile.errors import ExportError

Shape = tuple[int, ...]
ProfileShapes = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

INSTALL_FIX = "pip install tensorrt-cu13 (TensorRT >= 10.14, CUDA 13; tensorrt-cu12 for CUDA 12)"
ENGINE_NAME = "model.engine"
MANIFEST_NAME = "tensorrt_manifest.json"


@dataclass
class EngineBuild:
    """What build_engine wrote."""

    engine: Path
    plugin_lib: Path | None
    manifest: Path
    mapping: Path | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or ExportError with the install command."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ExportError("TensorRT is not installed", fix=INSTALL_FIX) from exc
    return tensorrt


def _dim(expr: int | str, ranges: Mapping[str, tuple[int, int, int]], which: int) -> int:
    if isinstance(expr, int):
        return expr
    total = 0
    for term in expr.replace(" ", "").split("+"):
        if term.lstrip("-").isdigit():
            total += int(term)
        elif term in ranges:
            total += int(ranges[term][which])
        else:
            raise ExportError("unknown symbolic dimension in a profile", value=term, fix=f"one of {list(ranges)}")
    return total


def symbolic_profile(
    shapes: Mapping[str, Sequence[int | str]], ranges: Mapping[str, tuple[int, int, int]]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes from symbolic input shapes and per-symbol (min, opt, max) ranges."""
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, dims in shapes.items():
        out[name] = tuple(tuple(_dim(d, ranges, i) for d in dims) for i in range(3))  # type: ignore[assignment]
    return out


def _check_profile(name: str, shapes: tuple[Shape, Shape, Shape]) -> None:
    lo, opt, hi = shapes
    if not (len(lo) == len(opt) == len(hi)) or any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi, strict=True)):
        raise ExportError(
            f"profile for input {name} must satisfy min <= opt <= max per dimension", value=shapes, fix="fix the ranges"
        )


def build_engine(
    onnx_path: str | Path,
    plugin_lib: str | Path | None,
    out_dir: str | Path,
    profiles: Sequence[ProfileShapes],
    *,
    fp16: bool = False,
    bf16: bool = False,
    strongly_typed: bool = False,
    workspace_bytes: int | None = None,
    mapping_path: str | Path | None = None,
    trt: ModuleType | None = None,
) -> EngineBuild:
    """Parse `onnx_path`, build with one optimization profile per entry of `profiles`, write artifacts.

    `trt` overrides the TensorRT module (e.g. tensorrt_rtx, whose Python API matches for these calls).
    """
    trt = trt or import_tensorrt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ExportError("ONNX file not found", value=str(onnx_path), fix="export the fused ONNX first")
    if not profiles:
        raise ExportError("at least one optimization profile is needed", fix="pass profiles=[{input: (min, opt, max)}]")
    out_dir.mkdir(parents=True, exist_ok=True)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin_lib is not None:
        plugin_lib = Path(plugin_lib)
        if not plugin_lib.is_file():
            raise ExportError("plugin library not found", value=str(plugin_lib), fix="build plugins/tensorrt (cmake)")
        if builder.get_plugin_registry().load_library(str(plugin_lib)) is None:
            raise ExportError("TensorRT could not load the plugin library", value=str(plugin_lib))

    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError("TensorRT's ONNX parser refused the model", value=errors, fix="see docs/tensorrt.md")

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag, wanted in (("FP16", fp16), ("BF16", bf16)):
        if wanted and not strongly_typed and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = {t.name for t in inputs if any(d < 0 for d in t.shape)}
    for shapes in profiles:
        missing = sorted(dynamic - set(shapes))
        if missing:
            raise ExportError("dynamic inputs without profile shapes", value=missing, fix="add them to every profile")
        profile = builder.create_optimization_profile()
        for name, triple in shapes.items():
            _check_profile(name, triple)
            profile.set_shape(name, *triple)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT engine build failed", value=str(onnx_path), fix="rerun with a verbose logger")

    engine_path = out_dir / ENGINE_NAME
    engine_path.write_bytes(bytes(serialized))
    lib_copy = None
    if plugin_lib is not None:
        lib_copy = out_dir / Path(plugin_lib).name
        if lib_copy.resolve() != Path(plugin_lib).resolve():
            shutil.copy2(plugin_lib, lib_copy)
    mapping_copy = None
    if mapping_path is not None:
        mapping_copy = out_dir / Path(mapping_path).name
        shutil.copy2(mapping_path, mapping_copy)

    result = EngineBuild(
        engine=engine_path,
        plugin_lib=lib_copy,
        manifest=out_dir / MANIFEST_NAME,
        mapping=mapping_copy,
        inputs=[t.name for t in inputs],
        outputs=[network.get_output(i).name for i in range(network.num_outputs)],
    )
    manifest: dict[str, Any] = {
        "format": ExportFormat.TENSORRT,
        "tensorrt_module": trt.__name__,
        "tensorrt_version": getattr(trt, "__version__", "unknown"),
        "engine": engine_path.name,
        "engine_sha256": hashlib.sha256(engine_path.read_bytes()).hexdigest(),
        "plugin_library": lib_copy.name if lib_copy else None,
        "mapping": mapping_copy.name if mapping_copy else None,
        "source_onnx": str(onnx_path),
        "precision": {"fp16": fp16, "bf16": bf16, "strongly_typed": strongly_typed},
        "inputs": result.inputs,
        "outputs": result.outputs,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
    }
    result.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return result
