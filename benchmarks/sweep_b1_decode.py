"""Decode at B=1, T=4096 (issue 15 item 3): the in-kernel split merge against the merge kernel, with configs,
beside a plain read of the same bytes.

Per layout of the quick decode matrix at B=1, T=4096 (MHA C=4/8/16, GQA 32q/8kv aligned C=4), in one run:
dense SDPA (flash), clustered_decode under each config, and two pure reads of `fused_bytes` (the kept K heads
plus the distinct V heads, bench_kernels' bytes): torch.sum and a Triton grid-stride read kernel (best of a
few grids). All from CUDA graphs (bench_kernels.time_ms: median, L2 flushed before every replay). % copy =
bytes / time against the 1 GiB copy rate of the same run. maxdiff: largest |output - the merge kernel's|.
`--rule` adds B=1 T=16384 and B=8 T=4096, with the merge fused and not, for the dispatch threshold.

    PYTHONPATH=. python benchmarks/sweep_b1_decode.py --out runs/b1 [--wide] [--rule]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import DEVICE, DT, D, H, copy_bandwidth, decode_fn, equal_mapping, gqa_aligned, sdpa_flash, time_ms  # noqa: E402,I001

from chai_compile.kernels import DecodeConfig  # noqa: E402

F = dict(fuse_merge=True)
CONFIGS = {
    "merge_kernel": DecodeConfig(fuse_merge=False),  # the two-launch path (the default before)
    "auto": DecodeConfig(),
}
WIDE = {
    "fused": DecodeConfig(**F),
    **{f"fused_waves{w:g}": DecodeConfig(waves=w, **F) for w in (1.0, 2.0, 4.0, 16.0)},
    **{f"fused_w{w}_dot": DecodeConfig(tile_width=w, use_dot=True, **F) for w in (1, 2, 4, 8)},
    **{f"fused_w{w}_fma": DecodeConfig(tile_width=w, use_dot=False, **F) for w in (2, 4, 8)},
    "fused_warps8": DecodeConfig(num_warps=8, **F),
    "fused_warps2": DecodeConfig(num_warps=2, **F),
    "fused_n16": DecodeConfig(block_n=16, **F),
    "fused_n64": DecodeConfig(block_n=64, **F),
    "fused_ms128": DecodeConfig(min_split=128, **F),
    "fused_stages4": DecodeConfig(num_stages=4, **F),
    "fused_w1_dot_ms128": DecodeConfig(tile_width=1, use_dot=True, min_split=128, **F),
    "fused_w2_dot_warps8": DecodeConfig(tile_width=2, use_dot=True, num_warps=8, **F),
    "fused_w1_dot_waves2": DecodeConfig(tile_width=1, use_dot=True, waves=2.0, **F),
    "fused_w2_dot_waves2": DecodeConfig(tile_width=2, use_dot=True, waves=2.0, **F),
    "fused_w4_dot_warps8": DecodeConfig(tile_width=4, use_dot=True, num_warps=8, **F),
    "fused_two_phase": DecodeConfig(two_phase=True, **F),
    "merge_kernel_waves2": DecodeConfig(fuse_merge=False, waves=2.0),
}


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr):
    """Sum a buffer with a grid-stride loop: a read of every byte and one store per program."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(X + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc, 0))


def pure_read(nbytes: int) -> dict:
    """Best pure read of nbytes (bf16) over a few grids, and torch.sum, as GB/s of bytes read."""
    x = torch.randn(nbytes // 2, device=DEVICE, dtype=DT)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"torch_sum_ms": time_ms(lambda: x.sum(dtype=torch.float32))}
    best = None
    for per_sm, block, warps in [(2, 4096, 8), (4, 4096, 8), (8, 2048, 4), (16, 2048, 4), (4, 8192, 8)]:
        grid = per_sm * sms
        part = torch.empty(grid, device=DEVICE, dtype=torch.float32)
        ms = time_ms(lambda grid=grid, part=part, block=block, warps=warps: _read_kernel[(grid,)](
            x, part, x.numel(), BLOCK=block, num_warps=warps))  # fmt: skip
        res[f"triton_read_{per_sm}x{block}w{warps}_ms"] = ms
        best = ms if best is None else min(best, ms)
    res["triton_read_ms"] = best
    for k in ("torch_sum", "triton_read"):
        res[f"{k}_gbps"] = nbytes / res[f"{k}_ms"] / 1e6
    return res


def measure(hk: int, batch: int, t: int, configs: dict, res: dict, layouts: list[tuple[str, dict]]) -> None:
    kd = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
    v = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
    qd = torch.randn(batch, H, 1, D, device=DEVICE, dtype=DT)
    dense = time_ms(lambda: sdpa_flash(qd, kd, v, enable_gqa=hk != H))
    dense_bytes = 2 * kd.numel() * 2
    copy = res["copy"]["gbps"]
    for label, m in layouts:
        c = len(m["sizes"])
        kc = kd[:, : m["k_heads_kept"]]
        q = torch.randn(batch, c, D, device=DEVICE, dtype=DT)
        lengths = torch.full((batch,), t, dtype=torch.int32, device=DEVICE)
        fused_bytes = batch * t * D * (m["k_heads_kept"] + m["v_heads"]) * 2
        row = {"label": label, "B": batch, "T": t, "C": c, "k_heads": m["k_heads_kept"], "v_heads": m["v_heads"],
               "fused_bytes": fused_bytes, "sdpa_ms": dense, "sdpa_gbps": dense_bytes / dense / 1e6,
               "read": pure_read(fused_bytes) if batch == 1 else {}, "ms": {}, "maxdiff": {}, "failed": {}}  # fmt: skip
        ref = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), CONFIGS["merge_kernel"])().float()
        for name, cfg in configs.items():
            fn = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), cfg)
            try:
                row["maxdiff"][name] = max((fn().float() - ref).abs().max().item() for _ in range(3))
                row["ms"][name] = time_ms(fn)
            except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
                row["failed"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        ms = row["ms"]
        row["best"] = min(ms, key=ms.get)
        row["gbps"] = {k: fused_bytes / x / 1e6 for k, x in ms.items()}
        row["pct_copy"] = {k: 100 * g / copy for k, g in row["gbps"].items()}
        row["x_sdpa"] = {k: dense / x for k, x in ms.items()}
        res["rows"].append(row)
        Path(res["json"]).write_text(json.dumps(res, indent=1))  # rows so far survive a timeout
        print(f"{label:11s} B={batch} T={t} C={c:2d} sdpa {dense * 1e3:5.1f}us "
              + " ".join(f"{k} {x * 1e3:.1f}" for k, x in ms.items()), flush=True)  # fmt: skip


def table(res: dict) -> str:
    copy = res["copy"]["gbps"]
    lines = [f"copy {copy:.0f} GB/s  {res['device']}",
             "layout       B     T   C    MB  sdpa_us  merge_kernel_us  auto_us  GB/s %copy xSDPA  best(us,%copy,xSDPA)"
             "  read(torch.sum/triton %copy)"]  # fmt: skip
    for r in res["rows"]:
        ms, best = r["ms"], r["best"]
        rd = r["read"]
        read = f"{100 * rd['torch_sum_gbps'] / copy:.0f}/{100 * rd['triton_read_gbps'] / copy:.0f}%" if rd else "-"
        lines.append(
            f"{r['label']:11s} {r['B']:2d} {r['T']:5d} {r['C']:3d} {r['fused_bytes'] / 1e6:5.1f} "
            f"{r['sdpa_ms'] * 1e3:8.1f} "
            f"{ms.get('merge_kernel', float('nan')) * 1e3:16.1f} {ms['auto'] * 1e3:8.1f} {r['gbps']['auto']:5.0f} "
            f"{r['pct_copy']['auto']:5.1f} {r['x_sdpa']['auto']:5.2f}  {best} ({ms[best] * 1e3:.1f}, "
            f"{r['pct_copy'][best]:.1f}, {r['x_sdpa'][best]:.2f})  {read}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--wide", action="store_true", help="the config sweep that picked the defaults")
    ap.add_argument("--rule", action="store_true", help="also B=1 T=16384 and B=8 T=4096, fused merge or not")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {**CONFIGS, **(WIDE if args.wide else {})}
    flags = " ".join(f for f, on in (("--wide", args.wide), ("--rule", args.rule)) if on)
    res = {"command": f"PYTHONPATH=. python benchmarks/sweep_b1_decode.py --out {args.out} {flags}".strip(),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "configs": {k: asdict(c) for k, c in configs.items()}, "copy": copy_bandwidth(), "rows": []}  # fmt: skip
    path = args.out / "sweep_b1_decode.json"
    res["json"] = str(path)
    mha = [("mha", equal_mapping(c)) for c in (4, 8, 16)]
    measure(H, 1, 4096, configs, res, mha)
    measure(8, 1, 4096, configs, res, [("gqa-aligned", gqa_aligned(4))])
    path.write_text(json.dumps(res, indent=1))
    if args.rule:
        rule = {**CONFIGS, "fused": DecodeConfig(fuse_merge=True)}
        for batch, t in ((1, 16384), (8, 4096)):
            measure(H, batch, t, rule, res, mha[:1])
            measure(8, batch, t, rule, res, [("gqa-aligned", gqa_aligned(4))])
            path.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
