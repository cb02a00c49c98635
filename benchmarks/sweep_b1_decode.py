"""Decode at B=1, T=4096 (issue 15 item 3): the small-step defaults (width-1 tiles on tensor cores, 2 waves,
the split merge in the split kernel) against the defaults before them and nearby configs, beside a plain read
of the same bytes.

Per layout of the quick decode matrix at B=1, T=4096 (MHA C=4/8/16, GQA 32q/8kv aligned C=4), in one run:
dense SDPA (flash), clustered_decode under each config, and pure reads of `fused_bytes` (the kept K heads plus
the distinct V heads, bench_kernels' bytes): torch.sum and a Triton grid-stride read kernel (best of a few
grids). All from CUDA graphs timed by bench_kernels.time_ms (median, L2 emptied by zeroing 256 MB before
every replay); the default, SDPA and the best read also by time_ms_clean (L2 emptied by reading). % copy =
bytes / time against the 1 GiB copy rate of the same run. maxdiff: largest |output - the old default's|.
`--rule` adds B=1 T=16384 and B=8 T=4096, where the small-step settings are not the default.

    PYTHONPATH=. python benchmarks/sweep_b1_decode.py --out runs/b1 [--rule]
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
from bench_kernels import (  # noqa: E402,I001
    DEVICE, DT, D, H, capture_graph, copy_bandwidth, decode_fn, equal_mapping, gqa_aligned, median_replay_ms,
    sdpa_flash, time_ms,
)

from chai_compile.kernels import DecodeConfig  # noqa: E402
from chai_compile.kernels.tile_plan import auto_tile_width  # noqa: E402


def before(m: dict) -> DecodeConfig:
    """The defaults before the small-step rule: tiles ~ the mean slots per cluster, 8 waves, the merge kernel."""
    return DecodeConfig(tile_width=auto_tile_width(m["slots"], len(m["sizes"])), waves=8.0, fuse_merge=False)


# Around the small-step defaults (width-1 dot tiles, 2 waves, merge in the split kernel). The configs that
# picked them: docs/results/kernels/sweep_b1_decode_wide_h200.json (this script with --wide at commit c82ed6e).
CONFIGS = {
    "before": before,
    "auto": DecodeConfig(),
    "auto_merge_kernel": DecodeConfig(fuse_merge=False),
    "waves1": DecodeConfig(waves=1.0),
    "waves4": DecodeConfig(waves=4.0),
    "n128": DecodeConfig(block_n=128, num_stages=2),
    "warps8": DecodeConfig(num_warps=8),
    "stages4": DecodeConfig(num_stages=4),
    "ms128": DecodeConfig(min_split=128),
}
# Larger steps: the small-step settings forced there, against the defaults (which do not apply them).
RULE = {"before": before, "auto": DecodeConfig(),
        "small_step_cfg": DecodeConfig(tile_width=1, waves=2.0, fuse_merge=True)}  # fmt: skip


def time_ms_clean(fn, n: int = 200) -> float:
    """Median ms of a CUDA graph replay of fn with L2 emptied by *reading* 256 MB before each replay.

    time_ms (triton do_bench) empties L2 by zeroing 256 MB, which leaves it full of dirty lines that a kernel
    reading less than L2 holds (50 MB on H100) has to write back as it reads. A decode step in a model finds
    L2 holding mostly clean lines (the previous layer's cache reads), so both numbers are reported.
    """
    fn()
    torch.cuda.synchronize()
    g = capture_graph(fn)
    flush = torch.ones(64 << 20, dtype=torch.int32, device=DEVICE)
    return median_replay_ms(g, n, 10, before=flush.sum)


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr):
    """Sum a buffer with a grid-stride loop: a read of every byte and one store per program."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(X + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc, 0))


# (programs per SM, elements per block, warps) of the read kernel; the best of them is the read's time.
READ_GRIDS = [(2, 4096, 8), (4, 4096, 8), (8, 2048, 4), (16, 2048, 4), (4, 8192, 8)]


def pure_read(nbytes: int) -> dict:
    """Best pure read of nbytes (bf16) over a few grids, and torch.sum, as GB/s of bytes read."""
    x = torch.randn(nbytes // 2, device=DEVICE, dtype=DT)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"torch_sum_ms": time_ms(lambda: x.sum(dtype=torch.float32))}
    best = None
    for per_sm, block, warps in READ_GRIDS:
        grid = per_sm * sms
        part = torch.empty(grid, device=DEVICE, dtype=torch.float32)
        ms = time_ms(lambda grid=grid, part=part, block=block, warps=warps: _read_kernel[(grid,)](
            x, part, x.numel(), BLOCK=block, num_warps=warps))  # fmt: skip
        res[f"triton_read_{per_sm}x{block}w{warps}_ms"] = ms
        best = ms if best is None else min(best, ms)
    res["triton_read_ms"] = best
    per_sm, block, warps = min(
        READ_GRIDS,
        key=lambda c: res[f"triton_read_{c[0]}x{c[1]}w{c[2]}_ms"],
    )
    part = torch.empty(per_sm * sms, device=DEVICE, dtype=torch.float32)
    res["triton_read_clean_ms"] = time_ms_clean(
        lambda: _read_kernel[(per_sm * sms,)](x, part, x.numel(), BLOCK=block, num_warps=warps)
    )
    for k in ("torch_sum", "triton_read", "triton_read_clean"):
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
        ref = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), before(m))().float()
        for name, cfg in configs.items():
            fn = decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D), cfg(m) if callable(cfg) else cfg)
            try:
                row["maxdiff"][name] = max((fn().float() - ref).abs().max().item() for _ in range(3))
                row["ms"][name] = time_ms(fn)
            except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
                row["failed"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        ms = row["ms"]
        if batch == 1:  # the default and the pure read with clean L2 lines (time_ms_clean)
            row["clean_ms"] = {"sdpa": time_ms_clean(lambda: sdpa_flash(qd, kd, v, enable_gqa=hk != H)),
                               "auto": time_ms_clean(decode_fn(q, kc, v, lengths, m, 1 / math.sqrt(D)))}  # fmt: skip
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
             "layout       B     T   C    MB  sdpa_us  before_us  auto_us  GB/s %copy xSDPA  best(us,%copy,xSDPA)"
             "  read %copy(torch.sum/triton/triton clean L2)  auto clean L2 (us, %copy, xSDPA)"]  # fmt: skip
    for r in res["rows"]:
        ms, best = r["ms"], r["best"]
        rd = r["read"]
        kinds = ("torch_sum", "triton_read", "triton_read_clean")
        read = "/".join(f"{100 * rd[f'{k}_gbps'] / copy:.0f}" for k in kinds) if rd else "-"
        cl = r.get("clean_ms")
        clean = (f"{cl['auto'] * 1e3:.1f}, {100 * r['fused_bytes'] / cl['auto'] / 1e6 / copy:.1f}, "
                 f"{cl['sdpa'] / cl['auto']:.2f}") if cl else "-"  # fmt: skip
        lines.append(
            f"{r['label']:11s} {r['B']:2d} {r['T']:5d} {r['C']:3d} {r['fused_bytes'] / 1e6:5.1f} "
            f"{r['sdpa_ms'] * 1e3:8.1f} "
            f"{ms['before'] * 1e3:10.1f} {ms['auto'] * 1e3:8.1f} {r['gbps']['auto']:5.0f} "
            f"{r['pct_copy']['auto']:5.1f} {r['x_sdpa']['auto']:5.2f}  {best} ({ms[best] * 1e3:.1f}, "
            f"{r['pct_copy'][best]:.1f}, {r['x_sdpa'][best]:.2f})  {read}  {clean}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rule", action="store_true", help="also B=1 T=16384 and B=8 T=4096 (small-step settings forced)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = CONFIGS
    flags = "--rule" if args.rule else ""
    res = {"command": f"PYTHONPATH=. python benchmarks/sweep_b1_decode.py --out {args.out} {flags}".strip(),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "configs": {k: asdict(c) if not callable(c) else c.__doc__ for k, c in {**configs, **RULE}.items()},
           "copy": copy_bandwidth(), "rows": []}  # fmt: skip
    path = args.out / "sweep_b1_decode.json"
    res["json"] = str(path)
    mha = [("mha", equal_mapping(c)) for c in (4, 8, 16)]
    measure(H, 1, 4096, configs, res, mha)
    measure(8, 1, 4096, configs, res, [("gqa-aligned", gqa_aligned(4))])
    path.write_text(json.dumps(res, indent=1))
    if args.rule:
        for batch, t in ((1, 16384), (8, 4096)):
            measure(H, batch, t, RULE, res, mha[:1])
            measure(8, batch, t, RULE, res, [("gqa-aligned", gqa_aligned(4))])
            path.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
