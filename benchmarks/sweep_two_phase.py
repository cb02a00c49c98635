"""Decode: single-pass tiles vs the two-phase kernels (issue 15), per shape of the quick decode matrix.

Times dense SDPA (flash) and clustered_decode under the default rule ("auto"), forced single-pass
tiles ("single") and forced two phases with a few configs ("tp*"), each from a CUDA graph
(bench_kernels.time_ms: median of triton.testing.do_bench, L2 flushed; the recorded H200 run used 5 warm-up
and 25 timed replays, time_ms uses 10 and 60). maxdiff: largest |output - single| per config. The table picked
DecodeConfig's defaults (two_phase rule, min_split) in chai_compile/kernels/triton_decode.py.

    PYTHONPATH=. python benchmarks/sweep_two_phase.py --out runs/tp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import (  # noqa: E402
    DEVICE,
    DT,
    D,
    H,
    copy_bandwidth,
    decode_fn,
    equal_mapping,
    gqa_aligned,
    gqa_scattered,
    sdpa_flash,
    time_ms,
    uneven_mapping,
)  # fmt: skip

from chai_compile.kernels import DecodeConfig  # noqa: E402

CONFIGS = {
    "single": DecodeConfig(two_phase=False),
    "auto": DecodeConfig(),
    "tp": DecodeConfig(two_phase=True, min_split=64),
    "tp_ms256": DecodeConfig(two_phase=True),
    "tp_w8": DecodeConfig(two_phase=True, num_warps=8),
    "tp_n128w8": DecodeConfig(two_phase=True, block_n=128, num_stages=3, num_warps=8),
    "tp_n32s4": DecodeConfig(two_phase=True, block_n=32, num_stages=4),
}



def shapes(hk: int, batch: int, t: int) -> list[tuple[str, dict]]:
    if hk != H:
        return [("gqa-aligned", gqa_aligned(4))] + ([("gqa-scattered", gqa_scattered(4))] if t == 16384 else [])
    maps = [("mha", equal_mapping(c)) for c in (4, 8, 16)]
    return maps + ([("mha-uneven", uneven_mapping(c)) for c in (4, 8, 16)] if (batch, t) == (8, 16384) else [])


def measure(hk: int, batch: int, t: int, res: dict) -> None:
    """All configs on the layouts of one cache shape; appends to res["rows"]."""
    kd = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
    v = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
    qd = torch.randn(batch, H, 1, D, device=DEVICE, dtype=DT)
    dense = time_ms(lambda: sdpa_flash(qd, kd, v, enable_gqa=hk != H))
    for label, m in shapes(hk, batch, t):
        c = len(m["sizes"])
        kc = kd[:, : m["k_heads_kept"]]
        q = torch.randn(batch, c, D, device=DEVICE, dtype=DT)
        lengths = torch.full((batch,), t, dtype=torch.int32, device=DEVICE)
        fused_bytes = batch * t * D * (m["k_heads_kept"] + m["v_heads"]) * 2
        row = {"label": label, "B": batch, "T": t, "C": c, "k_heads": m["k_heads_kept"], "v_heads": m["v_heads"],
               "slots": m["slots"], "fused_bytes": fused_bytes, "dense_ms": dense, "ms": {}, "maxdiff": {}}
        ref = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), CONFIGS["single"])().float()
        for name, cfg in CONFIGS.items():
            fn = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), cfg)
            row["maxdiff"][name] = (fn().float() - ref).abs().max().item()
            row["ms"][name] = time_ms(fn)
        res["rows"].append(row)
        ms = row["ms"]
        pct = 100 * fused_bytes / ms["auto"] / 1e6 / res["copy"]["gbps"]
        print(f"{label:13s} B={batch} T={t:5d} C={c:2d} dense {dense * 1e3:6.1f}us  "
              + " ".join(f"{k} {x * 1e3:6.1f}" for k, x in ms.items())
              + f"  auto x{dense / ms['auto']:.2f} {pct:.0f}%copy",
              flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"command": f"PYTHONPATH=. python benchmarks/sweep_two_phase.py --out {args.out}",
           "device": torch.cuda.get_device_name(), "copy": copy_bandwidth(), "rows": []}  # fmt: skip
    for hk in (8, H):
        for batch in (1, 8):
            for t in (4096, 16384):
                measure(hk, batch, t, res)
                torch.cuda.empty_cache()
                (args.out / "sweep_two_phase.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
