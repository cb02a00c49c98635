"""Export cost and graph size, original vs CHAI: wall time, peak RSS, nodes, op counts, weight and file bytes.

    python benchmarks/bench_export.py smollm2-135m --mapping docs/results/smollm2/kv20.json \
        --work /tmp/bench_export --out docs/results/onnx/export_smollm2.json

Each export runs `chai-compile export` in its own process; the peak RSS is that process's own (os.wait4), so
the three numbers do not contaminate each other. The goal it checks: peak RSS at most 3x the fp32 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("original", "portable", "fused")


def run_export(model: str, mapping: str | None, out: Path, attention: str, dtype: str, kv_cache: str = "concat"
               ) -> dict:
    """Run one export in a child process; return its wall time, its own peak RSS and its manifest."""
    cmd = [sys.executable, "-m", "chai_compile", "export", model, "--out", str(out), "--overwrite",
           "--dtype", dtype, "--attention", attention, "--kv-cache", kv_cache] + \
        (["--mapping", mapping] if mapping else ["--no-mapping"])
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        # wait4 rather than wait: its rusage is this child's alone (RUSAGE_CHILDREN is a max over all of them)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"export {attention} failed ({code}): {last} (log: {log})")
    man = json.loads((out / "manifest.json").read_text())
    # peak_rss_mb is MiB: ru_maxrss is KiB on Linux
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "export_s": man["export_s"], "validation": man["validation"], "stats": man["stats"],
            "cache": man["cache"]}


def markdown(result: dict) -> str:
    rows = result["variants"]
    base = rows["original"]["stats"]["weight_bytes"]
    lines = ["| graph | wall (export + validation) | peak RSS | peak / fp32 weights | nodes | weights | files "
             "| max abs diff (past 0 / past / padded) | greedy 32 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        v, s = r["validation"], r["stats"]
        peak = r["peak_rss_mb"]
        lines.append(
            f"| {name} | {r['wall_s']:.0f} s | {peak * 2**20 / 1e9:.2f} GB | {peak * 2**20 / base:.2f}x "
            f"| {s['nodes']} | {s['weight_bytes'] / 1e6:.2f} MB | {s['file_bytes'] / 1e6:.2f} MB "
            f"| {v['max_abs_diff_past0']:.1e} / {v['max_abs_diff_past']:.1e} / {v['max_abs_diff_left_padded']:.1e} "
            f"| {'identical' if v['greedy_identical'] else 'differs'} |")
    ops = sorted({op for r in rows.values() for op in r["stats"]["op_counts"]})
    lines += ["", "| op | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for op in ops:
        counts = [r["stats"]["op_counts"].get(op, 0) for r in rows.values()]
        if len(set(counts)) > 1:  # only the ops the rewrite changes
            lines.append(f"| {op} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--mapping", required=True)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_export"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "mapping": args.mapping, "dtype": args.dtype, "command": " ".join(sys.argv),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "variants": {}}
    for name in VARIANTS:
        attention = "portable" if name == "original" else name
        mapping = None if name == "original" else args.mapping
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        result["variants"][name] = run_export(args.model, mapping, args.work / name, attention, args.dtype)
    limit = 3 * result["variants"]["original"]["stats"]["weight_bytes"]
    result["goal_peak_rss_at_most_3x_weights"] = {
        name: r["peak_rss_mb"] * 2**20 <= limit for name, r in result["variants"].items()}
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
        args.out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{table}\n")


if __name__ == "__main__":
    main()
