"""ONNX Runtime decode-step time, original vs CHAI graph, side by side (medians + ratio, JSON).

    # two exported decoders (chai-compile export ... --no-mapping / --mapping M)
    python benchmarks/bench_ort_decode.py ORIG_DIR CHAI_DIR [--past 512,2048] [--batch 1] [--out r.json]
    # export both first (each in its own process: wall time and that process's peak RSS recorded)
    python benchmarks/bench_ort_decode.py --export smollm2-135m --mapping M.json --work /tmp/bench [--dtype fp16]
    # a LLaMA-7B-shaped layer stack (random weights, 4096 hidden, 32 heads of 128, 8 clusters of 4 per layer)
    python benchmarks/bench_ort_decode.py --llama7b-layers 4 --work /tmp/bench7b --dtype fp16 --provider cuda

One decode step = one new token per row with a past of P tokens. Steps alternate between the two sessions
so machine noise hits both equally. On CUDA the caches live on the device (IO binding) and only the logits
come back, as in a generation loop; on the CPU the caches are numpy arrays.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_export import run_export  # sibling script: one way to time an export


def llama7b_stack(layers: int, work: Path, dtype: str,
                  graphs: tuple[tuple[str, str, str], ...] = (("original", "portable", "concat"),
                                                              ("chai", "portable", "concat"))) -> list[Path]:
    """Export a random LLaMA-7B-shaped stack, once per (name, attention form, kv cache) in `graphs`: "original"
    unmapped, the others with 8 clusters of 4 heads in every layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chai_compile.adapters import adapter_for
    from chai_compile.choices import LayerKind
    from chai_compile.export import onnx_export
    from chai_compile.fingerprint import model_info
    from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
    from chai_compile.rewrite import apply_mapping

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384)
    dirs = []
    for name, attention, kv_cache in graphs:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        if name != "original":
            info = model_info(adapter_for(model))
            # Clusters of 4 neighbouring heads, first head represents: shapes matter here, not weights.
            clustered = [LayerMapping(i, LayerKind.CLUSTERED, tuple(Cluster(tuple(range(c, c + 4)), c)
                                                                     for c in range(0, 32, 4))) for i in range(layers)]
            apply_mapping(model, ClusterMapping.build(info, clustered, {"kind": "bench-llama7b"}))
        if dtype == "fp16":
            model.half()
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        onnx_export.export_decoder(model, out, attention=attention, kv_cache=kv_cache, in_place=True,
                                   metadata={"chai.kv_cache": kv_cache})  # the runner drives in-place graphs by it
        dirs.append(out)
        del model
    return dirs


def _cache_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Random cache rows: a block of 256 random rows repeated along the token axis (a step's time does not
    depend on the values, and drawing tens of GB of normals at batch 32 x 8k tokens would take minutes)."""
    block = rng.standard_normal((*shape[:2], min(shape[2], 256), shape[3]), dtype=np.float32).astype(dtype)
    reps = -(-shape[2] // block.shape[2])
    return np.ascontiguousarray(np.tile(block, (1, 1, reps, 1))[:, :, : shape[2]])


def decode_times(dirs: list[Path], past: int, batch: int, iters: int, threads: int | None, provider: str,
                 op_library: str = "auto") -> list[list[float]]:
    """Per graph, `iters` decode-step times (s) at this past length and batch, the graphs taking turns.

    In-place graphs get buffers of past + 1 rows (the step writes row `past`); concat graphs get past rows."""
    from chai_compile.export.ort_runner import OrtDecoder

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    # No spinning: the two sessions take turns, and a spinning pool would steal the other's cores.
    spin = {"session.intra_op.allow_spinning": "0"}
    decs = [OrtDecoder(d, providers=providers, threads=threads, config=spin, op_library=op_library) for d in dirs]
    if provider == "cuda" and not all(d.use_cuda for d in decs):
        raise SystemExit("onnxruntime did not give the CUDA execution provider (is onnxruntime-gpu installed?)")
    rng = np.random.default_rng(0)
    feeds = []
    for dec in decs:
        rows = past + 1 if dec.kv_cache == "inplace" else past
        # Every cache input by name, with the shape the graph's chai.cache gives it (span layers' bounded groups
        # hold min(rows, sinks + window) rows).
        shapes = {f"past_key_values.{name}": shape for name, shape in dec.cache.entries(batch, rows)}
        arrays = [_cache_values(rng, shapes[name], dec.float_type) for name in dec.past_inputs]
        feeds.append((np.full((batch, 1), 5), np.ones((batch, past + 1), np.int64), np.full((batch, 1), past),
                      dec.wrap_cache(arrays)))
    for dec, f in zip(decs, feeds, strict=True):  # warm-up (CUDA kernels, allocator arenas)
        for _ in range(5):
            dec.step(*f)
    times: list[list[float]] = [[] for _ in decs]
    for _ in range(iters):
        for i, (dec, f) in enumerate(zip(decs, feeds, strict=True)):
            t0 = time.perf_counter()
            dec.step(*f)
            times[i].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path, help="ORIG_DIR CHAI_DIR")
    ap.add_argument("--export", default=None, help="model to export first (e.g. smollm2-135m)")
    ap.add_argument("--mapping", default=None)
    ap.add_argument("--llama7b-layers", type=int, default=0, help="export a LLaMA-7B-shaped stack of N layers")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_ort"))
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--past", default="512,2048")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    result: dict = {"machine": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
                    "onnxruntime": ort.__version__, "provider": args.provider, "dtype": args.dtype,
                    "threads": args.threads, "command": " ".join(sys.argv)}
    if args.export:
        args.work.mkdir(parents=True, exist_ok=True)
        orig, chai = args.work / "original", args.work / "chai"
        result["export_chai"] = run_export(args.export, args.mapping, chai, "portable", args.dtype)
        result["export_original"] = run_export(args.export, None, orig, "portable", args.dtype)
        args.dirs = [orig, chai]
    elif args.llama7b_layers:
        t0 = time.perf_counter()
        args.dirs = llama7b_stack(args.llama7b_layers, args.work, args.dtype)
        result["llama7b_stack"] = {"layers": args.llama7b_layers, "export_both_s": round(time.perf_counter() - t0, 1),
                                   "clusters_per_layer": 8, "heads": 32, "head_dim": 128}
    if len(args.dirs) != 2:
        raise SystemExit("pass ORIG_DIR CHAI_DIR, --export MODEL --mapping M, or --llama7b-layers N")
    result["graphs"] = [str(d) for d in args.dirs]
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        for past in [int(p) for p in args.past.split(",")]:
            t = decode_times(args.dirs, past, batch, args.iters, args.threads, args.provider)
            med = [statistics.median(x) * 1e3 for x in t]
            rows.append({"batch": batch, "past": past, "original_ms": round(med[0], 3), "chai_ms": round(med[1], 3),
                         "ratio_original_over_chai": round(med[0] / med[1], 3), "iters": args.iters,
                         "original_all_ms": [round(x * 1e3, 3) for x in t[0]],
                         "chai_all_ms": [round(x * 1e3, 3) for x in t[1]]})
    result["decode"] = rows
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(f"{'batch':>5} {'past':>6} {'original ms':>12} {'CHAI ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['past']:>6} {r['original_ms']:>12.3f} {r['chai_ms']:>9.3f} "
              f"{r['ratio_original_over_chai']:>6.3f}")


if __name__ == "__main__":
    main()
