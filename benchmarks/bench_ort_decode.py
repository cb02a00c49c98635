"""ONNX Runtime CPU decode-step time, original vs CHAI graph, side by side (medians + ratio, JSON).

    python benchmarks/bench_ort_decode.py ORIG_DIR CHAI_DIR [--past 512,2048] [--iters 20] [--out r.json]
    python benchmarks/bench_ort_decode.py --export smollm2-135m --mapping M.json --work /tmp/bench

With --export, both graphs are exported first (through `chai-compile export`, in a subprocess each) and the
export wall time and peak RSS of the CHAI export are recorded. Steps alternate between the two sessions so
machine noise hits both equally.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def timed_export(model: str, mapping: str | None, out: Path, attention: str = "portable") -> dict:
    cmd = [sys.executable, "-m", "chai_compile", "export", model, "--out", str(out), "--overwrite",
           "--attention", attention] + (["--mapping", mapping] if mapping else ["--no-mapping"])
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"export failed: {proc.stderr.strip().splitlines()[-1:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over children so far
    man = json.loads((out / "manifest.json").read_text())
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 1024, 1),
            "peak_rss_is_max_so_far": peak == before, "validation": man["validation"], "stats": man["stats"]}


def decode_times(dirs: list[Path], past: int, iters: int, threads: int | None) -> list[list[float]]:
    from chai_compile.export.ort_runner import OrtDecoder

    decs = [OrtDecoder(d, providers=["CPUExecutionProvider"], threads=threads) for d in dirs]
    rng = np.random.default_rng(0)
    feeds = []
    for dec in decs:
        cache = []
        for kh, vh in zip(dec.k_heads, dec.v_heads, strict=True):
            cache += [rng.standard_normal((1, kh, past, dec.head_dim), dtype=np.float32).astype(dec.float_type),
                      rng.standard_normal((1, vh, past, dec.head_dim), dtype=np.float32).astype(dec.float_type)]
        feeds.append((np.array([[5]]), np.ones((1, past + 1), np.int64), np.array([[past]]), cache))
    for dec, f in zip(decs, feeds, strict=True):  # warm-up
        for _ in range(3):
            dec.step(*f)
    times: list[list[float]] = [[] for _ in decs]
    for _ in range(iters):
        for i, (dec, f) in enumerate(zip(decs, feeds, strict=True)):
            t0 = time.perf_counter()
            dec.step(*f)
            times[i].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="*", type=Path, help="ORIG_DIR CHAI_DIR")
    ap.add_argument("--export", default=None, help="model to export first (e.g. smollm2-135m)")
    ap.add_argument("--mapping", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_ort"))
    ap.add_argument("--past", default="512,2048")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: dict = {}
    if args.export:
        args.work.mkdir(parents=True, exist_ok=True)
        orig, chai = args.work / "original", args.work / "chai"
        # CHAI first: RUSAGE_CHILDREN is a max over finished children, so the first one's peak is its own
        result["export_chai"] = timed_export(args.export, args.mapping, chai)
        result["export_original"] = timed_export(args.export, None, orig)
        args.dirs = [orig, chai]
    if len(args.dirs) != 2:
        raise SystemExit("pass ORIG_DIR CHAI_DIR, or --export MODEL --mapping M")
    result["graphs"] = [str(d) for d in args.dirs]
    result["decode"] = {}
    for past in [int(p) for p in args.past.split(",")]:
        t = decode_times(args.dirs, past, args.iters, args.threads)
        med = [statistics.median(x) * 1e3 for x in t]
        result["decode"][str(past)] = {"original_ms": round(med[0], 3), "chai_ms": round(med[1], 3),
                                       "ratio_original_over_chai": round(med[0] / med[1], 3), "iters": args.iters}
        print(f"past {past}: original {med[0]:.2f} ms, CHAI {med[1]:.2f} ms, ratio {med[0] / med[1]:.3f}",
              file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
