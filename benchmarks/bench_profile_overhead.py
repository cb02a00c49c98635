"""Profiling overhead: `profile`'s attention capture vs a plain forward pass over the same tokens.

Both run side by side in one process, alternating, several repeats; medians and their ratio are
written as JSON. Peak RSS of the whole run is reported too (capture adds L x H x H accumulators).

    python benchmarks/bench_profile_overhead.py --model smollm2-135m --samples 32 --seq-len 256 \
        --out docs/results/profile_overhead_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from chai_compile.adapters import adapter_for
from chai_compile.fileio import write_json
from chai_compile.loading import load_model
from chai_compile.profile.calibration import build_calibration
from chai_compile.profile.capture import capture_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    loaded = load_model(args.model)
    adapter = adapter_for(loaded.model)
    calib = build_calibration(loaded.tokenizer, "builtin", args.samples, args.seq_len, seed=0)
    ids = calib.input_ids
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @torch.no_grad()
    def plain() -> float:
        t = time.perf_counter()
        for s in range(0, ids.shape[0], args.batch_size):
            loaded.model(input_ids=ids[s : s + args.batch_size], use_cache=False)
        return time.perf_counter() - t

    def capture() -> float:
        t = time.perf_counter()
        capture_attention(adapter, ids, batch_size=args.batch_size, progress=False)
        return time.perf_counter() - t

    plain()  # warm-up
    plain_t, cap_t = [], []
    for _ in range(args.repeats):
        plain_t.append(plain())
        cap_t.append(capture())
    result = {
        "model": args.model,
        "tokens": ids.numel(),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "plain_forward_s": plain_t,
        "capture_s": cap_t,
        "plain_median_s": statistics.median(plain_t),
        "capture_median_s": statistics.median(cap_t),
        "overhead_ratio": statistics.median(cap_t) / statistics.median(plain_t),
        "peak_rss_mb_after_load": rss_after_load,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)
    print(json.dumps({k: result[k] for k in ("plain_median_s", "capture_median_s", "overhead_ratio",
                                              "peak_rss_mb_after_load", "peak_rss_mb")}, indent=1))


if __name__ == "__main__":
    main()
