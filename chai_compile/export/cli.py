"""`chai-compile export` and `chai-compile verify-artifact`."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from chai_compile.choices import GREEDY_STEPS, AttentionForm, DType, ExportFormat, KVCacheMode, LayerKind
from chai_compile.cli_parse import choice_option, dtype_option
from chai_compile.errors import ExportError, UsageError, ValidationFailed
from chai_compile.fileio import claim_output_dir
from chai_compile.placement_options import device_map_options, parsed

# The dtypes an export writes (ONNX Runtime's CPU kernels and TensorRT's builder flags), in both spellings.
EXPORT_DTYPES = ("float32", "fp32", "float16", "fp16")


def exportable_kinds(attention: str, kv_cache: str = KVCacheMode.CONCAT, fmt: str = ExportFormat.ONNX
                     ) -> tuple[LayerKind, ...]:
    """Layer kinds an export carries out: the portable graph every kind (a shared layer is P.V with a K cache of
    zero heads, a span layer masks its scores and keeps bounded caches as their own tensors); the fused graph
    too with the concat cache (span layers as nodes with ring caches, shared layers and their sources left
    portable). With the in-place cache every layer is a node: no shared layer. The TensorRT plugin has no span
    path, and engines are built from graphs of nodes and dense layers only."""
    if attention == AttentionForm.PORTABLE or (kv_cache == KVCacheMode.CONCAT and fmt == ExportFormat.ONNX):
        return tuple(LayerKind)
    if fmt == ExportFormat.ONNX:
        return (LayerKind.DENSE, LayerKind.CLUSTERED, LayerKind.SPAN)
    return (LayerKind.DENSE, LayerKind.CLUSTERED)


def load_source(model: str, mapping: Any, placed: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(tokenizer, PyTorch model rewritten in place with the ClusterMapping, if any)."""
    from chai_compile.loading import load_model
    from chai_compile.rewrite import apply_mapping

    loaded = load_model(model, **(placed or {}))
    if mapping is None:
        return loaded.tokenizer, loaded.model
    if placed and placed.get("device_map"):  # spread over devices: offloaded layers stay offloaded
        from chai_compile.rewrite.dispatched import rewrite_in_place

        rewrite_in_place(loaded.model, mapping)
        return loaded.tokenizer, loaded.model
    # check_model inside apply_mapping raises FingerprintMismatchError for another model's mapping
    return loaded.tokenizer, apply_mapping(loaded.model, mapping)


def run_export(model: str, mapping_path: str | None, no_mapping: bool, fmt: str, attention: str, dtype: str,
               opset: int, out: str, overwrite: bool, steps: int = GREEDY_STEPS, log: Any = print,
               kv_cache: str = KVCacheMode.CONCAT, placed: dict[str, Any] | None = None) -> dict[str, Any]:
    from chai_compile.export import clean, manifest, onnx_export, runtime_files, validate
    from chai_compile.export.ort_runner import OrtDecoder
    from chai_compile.fileio import write_json

    try:  # callers other than the command line hand over plain strings, in either dtype spelling
        fmt, attention = ExportFormat.parse(fmt, "--format"), AttentionForm.parse(attention, "--attention")
        dtype, kv_cache = DType.parse(dtype), KVCacheMode.parse(kv_cache, "--kv-cache")
    except ValueError as e:
        raise UsageError(str(e), fix="see `chai-compile export --help`") from None
    if dtype not in (DType.FLOAT32, DType.FLOAT16):
        raise UsageError("export writes float32 or float16 graphs", value=str(dtype), fix="pass --dtype float16")

    if not no_mapping and not mapping_path:
        raise ExportError("--mapping is required", fix="pass --mapping MAPPING.json, or --no-mapping for the original")
    if fmt == ExportFormat.TENSORRT:
        attention = AttentionForm.FUSED  # the engine needs the plugin node
        from chai_compile.export.tensorrt import import_tensorrt

        import_tensorrt()  # one-line ExportError when TensorRT is missing, before any work
        if not plugin_library().is_file():
            raise ExportError("the ClusteredAttention plugin library is not built", value=str(plugin_library()),
                              fix="cmake -S plugins/tensorrt -B plugins/tensorrt/build && cmake --build "
                                  "plugins/tensorrt/build, or set CHAI_TRT_PLUGIN to the .so")
    onnx_export.check_opset(attention, opset)
    if no_mapping and attention == AttentionForm.FUSED:
        raise ExportError("the fused form needs a mapping", fix="pass --mapping, or use --attention portable")
    if kv_cache == KVCacheMode.INPLACE and attention != AttentionForm.FUSED:
        raise ExportError("the in-place KV cache needs the fused form", value=attention, fix="add --attention fused")
    streamed = bool(placed and placed.get("device_map"))
    if streamed and (dtype != DType.FLOAT32 or fmt != ExportFormat.ONNX):
        raise ExportError("--device-map exports float32 ONNX only", value=f"{dtype}/{fmt}",
                          fix="drop --dtype/--format, or --device-map")
    with claim_output_dir(out, overwrite) as claim:  # locked and checked before loading anything
        from chai_compile.mapping import ClusterMapping

        mapping = None if no_mapping else ClusterMapping.read(mapping_path)  # read first: a bad file fails fast
        if mapping is not None:  # before the model loads: a plan the form cannot express fails fast
            inplace = " with the in-place KV cache" if kv_cache == KVCacheMode.INPLACE else ""
            what = "the TensorRT export" if fmt == ExportFormat.TENSORRT else f"the {attention} export{inplace}"
            mapping.require_supported(what, exportable_kinds(attention, kv_cache, fmt),
                                      fix="export the portable form (--attention portable, --kv-cache concat), "
                                          "which carries out every layer kind")
        tokenizer, source = load_source(model, mapping, placed)
        log("running the PyTorch model for the validation reference")
        reference = validate.reference(source, tokenizer, steps)
        release_memory()  # the reference's activations
        cache = onnx_export.cache_spec(source)
        side_files = runtime_files.runtime_files(source, tokenizer, cache, dtype)  # before the export empties it
        if dtype == DType.FLOAT16:
            source.half()  # the reference above stays fp32, as the fp16 tolerance assumes
        meta = onnx_export.provenance_metadata(mapping, source=model, attention=attention, dtype=dtype, opset=opset,
                                               cache=cache, kv_cache=kv_cache)
        with claim.stage() as stage:
            log(f"exporting {model} ({'CHAI ' + attention if mapping else 'original'}, {dtype}, opset {opset})")
            if streamed:  # weights streamed from wherever accelerate keeps them (export/streaming.py)
                from chai_compile.export.streaming import export_streamed

                res = export_streamed(source, mapping, stage, attention=attention, opset=opset, metadata=meta,
                                      kv_cache=kv_cache)
            else:
                res = onnx_export.export_decoder(source, stage, attention=attention, opset=opset, metadata=meta,
                                                 in_place=True, kv_cache=kv_cache)
            del source
            release_memory()  # the PyTorch weights, before ONNX Runtime maps the graph's
            clean.check(res.path)
            stats = clean.graph_stats(res.path)
            if mapping is not None:
                write_json(stage / "mapping.json", json.loads(mapping.to_json()))
                if mapping.weights is not None:  # the refit weights travel with the plan they belong to
                    weights = Path(mapping.source_dir or ".") / mapping.weights.file
                    shutil.copyfile(weights, stage / mapping.weights.file)
            runtime_files.write_runtime_files(stage, side_files)
            if attention == AttentionForm.FUSED and dtype != DType.FLOAT32 and not _has_cuda_provider():
                # the op's CPU kernel is float32 only; with onnxruntime-gpu the CUDA kernel validates the graph
                report = {"passed": None, "skipped": "float16 fused nodes run on ONNX Runtime's CUDA execution "
                                                     "provider only (onnxruntime-gpu), which this install lacks"}
            else:
                report = validate.compare(reference, OrtDecoder(stage), tokenizer, dtype=dtype)
            log(f"validation: {json.dumps({k: v for k, v in report.items() if k != 'greedy_text'})}")
            if report["passed"] is False:
                raise ValidationFailed(
                    f"exported graph disagrees with PyTorch: max abs diff {report['max_abs_diff_past0']:.3g} / "
                    f"{report['max_abs_diff_past']:.3g} (tolerance {report['atol']}), greedy identical: "
                    f"{report['greedy_identical']}")
            if fmt == ExportFormat.TENSORRT:
                _build_engine(res, stage, dtype)
            man = manifest.build_manifest(
                stage, res.path, source_model=model, attention=attention if mapping else "original", dtype=dtype,
                opset=opset, external_data=res.external_data, cache=res.cache.to_dict(),
                runtime_files=sorted(side_files), export_s=round(res.export_s, 2), kv_cache=kv_cache, stats=stats,
                validation=report,
                mapping=mapping.summary() if mapping else None,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            man = manifest.seal(man)
            write_json(stage / manifest.MANIFEST, man)
    return man


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS with them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def plugin_library() -> Path:
    """The plugin .so the engine loads: $CHAI_TRT_PLUGIN, else the in-tree CMake build."""
    default = Path(__file__).resolve().parents[2] / "plugins" / "tensorrt" / "build" / "libchai_trt_plugin.so"
    return Path(os.environ.get("CHAI_TRT_PLUGIN", default))


def _build_engine(res: Any, stage: Path, dtype: DType) -> None:
    from chai_compile.export.tensorrt import build_engine, symbolic_profile

    shapes = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total"], "position_ids": ["batch", "seq"]}
    for i, (kh, vh) in enumerate(zip(res.cache.k_heads, res.cache.v_heads, strict=True)):
        shapes[f"past_key_values.{i}.key"] = ["batch", kh, "past", res.cache.head_dim]
        shapes[f"past_key_values.{i}.value"] = ["batch", vh, "past", res.cache.head_dim]
    ranges = {"batch": (1, 1, 8), "seq": (1, 1, 2048), "past": (0, 512, 2048), "total": (1, 513, 4096)}
    build_engine(res.path, plugin_library(), stage / "tensorrt", [symbolic_profile(shapes, ranges)],
                 fp16=dtype == DType.FLOAT16)


@click.command("export")
@click.argument("model")
@click.option("--mapping", "mapping_path", default=None, type=click.Path(), help="Cluster mapping JSON.")
@click.option("--no-mapping", is_flag=True, help="Export the original model (same exporter, for comparison).")
@choice_option("--format", "fmt", enum=ExportFormat, default=ExportFormat.ONNX)
@choice_option("--attention", enum=AttentionForm, default=AttentionForm.PORTABLE)
@dtype_option(accepted=EXPORT_DTYPES, help="float32 or float16 (fp32/fp16 accepted too).")
@click.option("--opset", type=int, default=23, show_default=True)
@click.option("--out", "out", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--steps", type=click.IntRange(min=1), default=GREEDY_STEPS, show_default=True,
              help="Greedy steps compared.")
@choice_option("--kv-cache", "kv_cache", enum=KVCacheMode, default=KVCacheMode.CONCAT,
               help="inplace: past and present share one preallocated buffer per layer (needs --attention fused).")
@device_map_options
def export(model: str, mapping_path: str | None, no_mapping: bool, fmt: ExportFormat, attention: AttentionForm,
           dtype: DType, opset: int, out: str, overwrite: bool, steps: int, kv_cache: KVCacheMode,
           device_map: str | None = None, max_memory: str | None = None) -> None:
    """Export MODEL (rewritten with --mapping) to an ONNX decoder with KV cache, then validate it."""
    man = run_export(model, mapping_path, no_mapping, fmt, attention, dtype, opset, out, overwrite, steps,
                     log=lambda m: click.echo(m, err=True), kv_cache=kv_cache, placed=parsed(device_map, max_memory))
    s = man["stats"]
    v = man["validation"]
    checked = "validation passed" if v["passed"] else f"validation skipped: {v['skipped']}"
    click.echo(f"wrote {out}: {s['nodes']} nodes, weights {s['weight_bytes'] / 1e6:.2f} MB, "
               f"files {s['file_bytes'] / 1e6:.2f} MB, export {man['export_s']} s, {checked}")


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@click.command("build-ort-ops")
@click.option("--cuda/--no-cuda", default=None, help="Build the CUDA kernel too (default: when nvcc is found).")
def build_ort_ops(cuda: bool | None) -> None:
    """Build the ClusteredAttention op library for ONNX Runtime (plugins/onnxruntime) with CMake."""
    from chai_compile.export import ort_ops

    lib = ort_ops.build(cuda=cuda, log=lambda m: click.echo(m, err=True))
    click.echo(f"built {lib} (ONNX Runtime C API version {ort_ops.api_version(lib)})")
