"""ONNX Runtime decode step: original graph vs CHAI portable graph vs CHAI fused graph on the compiled op.

    # export the three graphs (each in its own process), then time them
    python benchmarks/bench_ort_fused.py --export smollm2-135m --mapping docs/results/smollm2/mapping_default.json \\
        --work /tmp/bench_fused --out docs/results/onnx/ort_cpu_smollm2_fused.json
    # a LLaMA-7B-shaped stack (random weights; 8 clusters of 4 heads per layer), fp16 on the CUDA provider
    python benchmarks/bench_ort_fused.py --llama7b-layers 4 --dtype fp16 --provider cuda --batch 1,8,32 \
        --past 512,2048,8192 --work /tmp/b7 --out r.json
    # or time existing exports: ORIGINAL_DIR PORTABLE_DIR FUSED_DIR
    python benchmarks/bench_ort_fused.py /tmp/b/original /tmp/b/portable /tmp/b/fused --out r.json

The fused graph is exported with --kv-cache inplace and runs its ClusteredAttention nodes through the compiled
library (plugins/onnxruntime; an error names the build command when it is missing). One decode step = one
new token per row after a past of P tokens. The three sessions take turns step by step, so machine noise hits
them alike; medians and ratios (original time / CHAI time, > 1 = CHAI faster) come from one run. Minimums
are recorded beside the medians, and the load average before and after each point: on a shared machine the
median moves with other people's work, the minimum much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench_export import run_export  # sibling scripts
from bench_ort_decode import decode_times, llama7b_stack

GRAPHS = (("original", "portable", "concat"), ("portable", "portable", "concat"), ("fused", "fused", "inplace"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path, help="ORIGINAL_DIR PORTABLE_DIR FUSED_DIR")
    ap.add_argument("--export", default=None, help="model to export first (e.g. smollm2-135m)")
    ap.add_argument("--mapping", default=None)
    ap.add_argument("--llama7b-layers", type=int, default=0, help="export a LLaMA-7B-shaped stack of N layers")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_fused"))
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--past", default="512,2048")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from chai_compile.export import ort_ops

    lib = ort_ops.require_library()  # before minutes of export: one line with the build command
    result: dict = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "onnxruntime": ort.__version__, "provider": args.provider, "dtype": args.dtype,
                    "threads": args.threads,
                    "op_library": str(lib), "op_library_api_version": ort_ops.api_version(lib),
                    "command": " ".join(sys.argv)}
    if args.export:
        args.work.mkdir(parents=True, exist_ok=True)
        args.dirs = [args.work / name for name, _, _ in GRAPHS]
        for (name, attention, kv), out in zip(GRAPHS, args.dirs, strict=True):
            mapping = None if name == "original" else args.mapping
            result[f"export_{name}"] = run_export(args.export, mapping, out, attention, args.dtype, kv_cache=kv)
    elif args.llama7b_layers:
        t0 = time.perf_counter()
        args.dirs = llama7b_stack(args.llama7b_layers, args.work, args.dtype, GRAPHS)
        result["llama7b_stack"] = {"layers": args.llama7b_layers, "export_s": round(time.perf_counter() - t0, 1),
                                   "clusters_per_layer": 8, "heads": 32, "head_dim": 128}
    if len(args.dirs) != len(GRAPHS):
        raise SystemExit("pass ORIGINAL_DIR PORTABLE_DIR FUSED_DIR, --export MODEL --mapping M, or --llama7b-layers N")
    result["graphs"] = {name: str(d) for (name, _, _), d in zip(GRAPHS, args.dirs, strict=True)}
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        for past in [int(p) for p in args.past.split(",")]:
            load0 = os.getloadavg()[0]
            t = decode_times(args.dirs, past, batch, args.iters, args.threads, args.provider, op_library="compiled")
            med = {name: statistics.median(x) * 1e3 for (name, _, _), x in zip(GRAPHS, t, strict=True)}
            low = {name: min(x) * 1e3 for (name, _, _), x in zip(GRAPHS, t, strict=True)}
            rows.append({"batch": batch, "past": past, **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                         "ratio_portable": round(med["original"] / med["portable"], 3),
                         "ratio_fused": round(med["original"] / med["fused"], 3),
                         **{f"{k}_min_ms": round(v, 3) for k, v in low.items()},
                         "ratio_fused_min": round(low["original"] / low["fused"], 3),
                         "ratio_portable_min": round(low["original"] / low["portable"], 3),
                         "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)], "iters": args.iters,
                         "all_ms": {name: [round(v * 1e3, 3) for v in x] for (name, _, _), x in
                                    zip(GRAPHS, t, strict=True)}})
            print(f"batch {batch} past {past}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()),
                  file=sys.stderr, flush=True)
            result["decode"] = rows
            result["goal_fused_at_least_original_everywhere"] = all(r["ratio_fused"] >= 1.0 for r in rows)
            if args.out:  # after every point: a later one that runs out of memory keeps the earlier ones
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'batch':>5} {'past':>6} {'original ms':>12} {'portable ms':>12} {'fused ms':>9} {'portable x':>10} "
          f"{'fused x':>8} {'fused x (min)':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['past']:>6} {r['original_ms']:>12.3f} {r['portable_ms']:>12.3f} "
              f"{r['fused_ms']:>9.3f} {r['ratio_portable']:>10.3f} {r['ratio_fused']:>8.3f} "
              f"{r['ratio_fused_min']:>13.3f}")


if __name__ == "__main__":
    main()
