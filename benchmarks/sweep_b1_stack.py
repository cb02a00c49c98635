"""Decode at B=1, T=4096 timed as a model runs it: one CUDA graph of L layers, each on its own cache (issue 15
item 3, "B=1, T=4096 at 60% of copy bandwidth").

A single replay timed by CUDA events (bench_kernels.time_ms, sweep_b1_decode.py) charges a 10-20 us step
with the graph launch and with the L2 state the timer leaves (dirty lines from a 256 MB memset, or none).
In a model the attention of layer l runs between other kernels of the same graph, and L2 holds clean lines
of what ran before. Here each layer has its own K/V/q (L x the bytes >> L2), the L launches are captured in
one graph, and the replays run back to back: time per layer = the replay's median / L. Every step kind is
timed the same way in the same run: dense SDPA (flash), clustered_decode under a grid of configs, and a
plain read of the step's bytes (`fused_bytes`: the kept K heads plus the V heads) by a grid-stride Triton
kernel (best of a few grids). The default and the best config are also timed per replay (time_ms) and by
kernel duration from the CUDA profiler. % copy = bytes / time against the 1 GiB copy rate of the same run.

    PYTHONPATH=. python benchmarks/sweep_b1_stack.py --out runs/b1stack [--layers 16] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import (  # noqa: E402,I001
    DEVICE, DT, D, H, capture_graph, copy_bandwidth, decode_fn, equal_mapping, gqa_aligned, median_replay_ms,
    sdpa_flash, time_ms,
)
from sweep_b1_decode import READ_GRIDS, _read_kernel  # noqa: E402

from chai_compile.kernels import DecodeConfig  # noqa: E402
from chai_compile.kernels.reference import clustered_decode_reference  # noqa: E402

# The small-step defaults before one-warp programs (4 warps, 64-key blocks, 2 waves, splits of 64 keys or more).
PREV_SMALL = DecodeConfig(tile_width=1, block_n=64, num_stages=3, num_warps=4, waves=2.0, min_split=64)


def configs(quick: bool) -> dict[str, DecodeConfig]:
    """The default, the non-fused merge and two-phase forms, and grids around the small-step settings."""
    out = {"auto": DecodeConfig(), "merge_kernel": DecodeConfig(fuse_merge=False),
           "two_phase": DecodeConfig(two_phase=True), "prev_small": PREV_SMALL}  # fmt: skip
    grid = itertools.product((32, 64, 128), (2, 3, 4), (1, 2, 4, 8), (1.0, 2.0, 3.0, 4.0, 6.0))
    if quick:
        grid = itertools.product((32, 64), (2, 3), (4,), (2.0, 4.0))
    for block_n, stages, warps, waves in grid:
        cfg = DecodeConfig(tile_width=1, block_n=block_n, num_stages=stages, num_warps=warps, waves=waves,
                           min_split=min(64, block_n))  # fmt: skip
        out[f"w1_n{block_n}_s{stages}_w{warps}_v{waves:g}"] = cfg
    for block_n, stages, waves in itertools.product((32, 64), (2, 3), (1.0, 2.0, 4.0)):
        out[f"w2_n{block_n}_s{stages}_v{waves:g}"] = DecodeConfig(
            tile_width=2, block_n=block_n, num_stages=stages, waves=waves, min_split=min(64, block_n)
        )
    for block_n, stages, waves in itertools.product((32, 64), (2, 3), (2.0, 4.0)):
        out[f"w1fma_n{block_n}_s{stages}_v{waves:g}"] = DecodeConfig(
            tile_width=1, use_dot=False, block_n=block_n, num_stages=stages, waves=waves, min_split=min(64, block_n)
        )
    return out


def stack_graph(fns: list) -> torch.cuda.CUDAGraph:
    """One CUDA graph running fns back to back (each run once before, so compiling stays outside the capture)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    return capture_graph(lambda: [f() for f in fns])


def stack_ms(fns: list, n: int = 60) -> float:
    """Median ms per layer of stack_graph(fns), replays back to back (no flush)."""
    g = stack_graph(fns)
    ms = median_replay_ms(g, n, 5)
    del g
    return ms / len(fns)


def kernel_us(fns: list, reps: int = 5) -> dict | str:
    """Device time per layer of each kernel name, from the CUDA profiler over replays of stack_graph(fns); the
    error as text where the profiler fails (a diagnostic: it must not lose the row)."""
    try:
        return _profile_us(stack_graph(fns), len(fns), reps)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"


def _profile_us(g: torch.cuda.CUDAGraph, layers: int, reps: int) -> dict:
    g.replay()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] = per.get(e.name[:60], 0.0) + e.time_range.elapsed_us()
    return {k: v / (reps * layers) for k, v in per.items()}


def read_stack(nbytes: int, layers: int) -> dict:
    """Per-layer ms of a plain read of nbytes from a distinct buffer per layer, for each read grid."""
    xs = [torch.randn(nbytes // 2, device=DEVICE, dtype=DT) for _ in range(layers)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {}
    for per_sm, block, warps in READ_GRIDS:
        grid = per_sm * sms
        part = torch.empty(grid, device=DEVICE, dtype=torch.float32)
        fns = [lambda x=x, grid=grid, part=part, block=block, warps=warps: _read_kernel[(grid,)](
            x, part, x.numel(), BLOCK=block, num_warps=warps) for x in xs]  # fmt: skip
        res[f"{per_sm}x{block}w{warps}"] = stack_ms(fns)
    return res


def measure(label: str, hk: int, m: dict, t: int, layers: int, cfgs: dict, res: dict) -> None:
    c = len(m["sizes"])
    scale = 1 / math.sqrt(D)
    kd = [torch.randn(1, hk, t, D, device=DEVICE, dtype=DT) for _ in range(layers)]
    v = [torch.randn(1, hk, t, D, device=DEVICE, dtype=DT) for _ in range(layers)]
    qd = [torch.randn(1, H, 1, D, device=DEVICE, dtype=DT) for _ in range(layers)]
    q = [torch.randn(1, c, D, device=DEVICE, dtype=DT) for _ in range(layers)]
    kc = [k[:, : m["k_heads_kept"]] for k in kd]
    lengths = torch.full((1,), t, dtype=torch.int32, device=DEVICE)
    fused_bytes = t * D * (m["k_heads_kept"] + m["v_heads"]) * 2
    copy = res["copy"]["gbps"]
    dense_fns = [lambda i=i: sdpa_flash(qd[i], kd[i], v[i], enable_gqa=hk != H) for i in range(layers)]
    row = {"label": label, "B": 1, "T": t, "C": c, "k_heads": m["k_heads_kept"], "v_heads": m["v_heads"],
           "fused_bytes": fused_bytes, "sdpa_ms": stack_ms(dense_fns), "read_ms": read_stack(fused_bytes, layers),
           "ms": {}, "maxdiff": {}, "failed": {}}  # fmt: skip
    ref = clustered_decode_reference(q[0], kc[0], v[0], lengths, m["offsets"], m["k_index"], m["v_index"], scale,
                                     out_dtype=torch.float64)  # fmt: skip
    for name, cfg in cfgs.items():
        fns = [decode_fn(q[i], kc[i], v[i], lengths, m, scale, cfg) for i in range(layers)]
        try:
            row["maxdiff"][name] = (fns[0]().double() - ref).abs().max().item()
            row["ms"][name] = stack_ms(fns)
        except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
            row["failed"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    ms = row["ms"]
    best = min(ms, key=ms.get)
    best_read = min(row["read_ms"].values())
    row.update(best=best, best_read_ms=best_read)
    row["pct_copy"] = {k: 100 * fused_bytes / x / 1e6 / copy for k, x in ms.items()}
    row["pct_copy_read"] = 100 * fused_bytes / best_read / 1e6 / copy
    row["x_sdpa"] = {k: row["sdpa_ms"] / x for k, x in ms.items()}
    # The same steps by the other two clocks: one replay per timing (L2 flushed), and kernel durations.
    row["single_replay_ms"] = {k: time_ms(decode_fn(q[0], kc[0], v[0], lengths, m, scale, cfgs[k]))
                               for k in dict.fromkeys(("auto", best))}  # fmt: skip
    row["kernel_us"] = {k: kernel_us([decode_fn(q[i], kc[i], v[i], lengths, m, scale, cfgs[k])
                                      for i in range(layers)]) for k in dict.fromkeys(("auto", best))}  # fmt: skip
    row["kernel_us"]["sdpa"] = kernel_us(dense_fns)
    res["rows"].append(row)
    Path(res["json"]).write_text(json.dumps(res, indent=1))  # rows so far survive a timeout
    top = sorted(ms, key=ms.get)[:5]
    print(f"{label:11s} T={t:5d} C={c:2d} sdpa {row['sdpa_ms'] * 1e3:5.1f}us read {best_read * 1e3:5.1f}us "
          + " ".join(f"{k} {ms[k] * 1e3:.1f}" for k in ["auto", *top]), flush=True)  # fmt: skip


def table(res: dict) -> str:
    copy = res["copy"]["gbps"]
    lines = [f"copy {copy:.0f} GB/s  {res['device']}  per layer of a {res['layers']}-layer graph",
             "layout         T  C    MB  sdpa_us read_us %copy  auto_us %copy xSDPA  best (us,%copy,xSDPA)"]
    for r in res["rows"]:
        ms, best = r["ms"], r["best"]
        lines.append(
            f"{r['label']:11s} {r['T']:5d} {r['C']:2d} {r['fused_bytes'] / 1e6:5.1f} {r['sdpa_ms'] * 1e3:8.1f} "
            f"{r['best_read_ms'] * 1e3:7.1f} {r['pct_copy_read']:5.1f} {ms['auto'] * 1e3:8.1f} "
            f"{r['pct_copy']['auto']:5.1f} {r['x_sdpa']['auto']:5.2f}  {best} ({ms[best] * 1e3:.1f}, "
            f"{r['pct_copy'][best]:.1f}, {r['x_sdpa'][best]:.2f})"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Per layout: % of copy bandwidth against T for the default, the previous defaults and a plain read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = res["copy"]["gbps"]
    layouts = list(dict.fromkeys((r["label"], r["C"]) for r in res["rows"]))
    fig, axes = plt.subplots(1, len(layouts), figsize=(3.6 * len(layouts), 3.6), sharey=True, squeeze=False)
    for ax, (label, c) in zip(axes[0], layouts, strict=True):
        rows = sorted((r for r in res["rows"] if (r["label"], r["C"]) == (label, c)), key=lambda r: r["T"])
        ts = [r["T"] for r in rows]
        pct = lambda ms, r: 100 * r["fused_bytes"] / ms / 1e6 / copy  # noqa: E731
        ax.plot(ts, [pct(r["best_read_ms"], r) for r in rows], "k--", label="plain read of the bytes")
        ax.plot(ts, [pct(r["ms"]["auto"], r) for r in rows], "o-", label="clustered decode (default)")
        if all("prev_small" in r["ms"] for r in rows):
            ax.plot(ts, [pct(r["ms"]["prev_small"], r) for r in rows], "s:", label="previous small-step defaults")
        sdpa = [pct(r["sdpa_ms"], r) for r in rows]
        ax.plot(ts, sdpa, "^-", color="grey", label="dense SDPA (CHAI bytes / its time)")
        ax.axhline(60, color="red", lw=0.8, label="60% of copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length T (keys), B=1")
        ax.set_title(f"{label} C={c}")
    axes[0][0].set_ylabel("% of copy bandwidth (per layer)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode per layer of a {res['layers']}-layer CUDA graph, H=32 d=128 bf16 ({res['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--lengths", default="4096", help="cache lengths T (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="a small config grid")
    ap.add_argument("--configs", help="only these configs (comma-separated names; 'auto' is always kept)")
    ap.add_argument("--plot-only", type=Path, help="re-plot an existing JSON into OUT")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        res = json.loads(args.plot_only.read_text())
        plot(res, args.out / "sweep_b1_stack.png")
        print(table(res))
        return
    cfgs = configs(args.quick)
    flags = f" --lengths {args.lengths}" + (" --quick" if args.quick else "")
    if args.configs:
        names = ["auto", *args.configs.split(",")]
        cfgs = {k: cfgs[k] for k in dict.fromkeys(names) if k in cfgs}
        flags += f" --configs {args.configs}"
    res = {"command": f"PYTHONPATH=. python benchmarks/sweep_b1_stack.py --out {args.out} --layers {args.layers}"
                      + flags,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "layers": args.layers, "configs": {k: asdict(c) for k, c in cfgs.items()},
           "copy": copy_bandwidth(), "rows": [], "json": str(args.out / "sweep_b1_stack.json")}  # fmt: skip
    for t in (int(x) for x in args.lengths.split(",")):
        for c in (4, 8, 16):
            measure("mha", H, equal_mapping(c), t, args.layers, cfgs, res)
            torch.cuda.empty_cache()  # the previous layout's caches
        measure("gqa-aligned", 8, gqa_aligned(4), t, args.layers, cfgs, res)
    Path(res["json"]).write_text(json.dumps(res, indent=1))
    plot(res, args.out / "sweep_b1_stack.png")
    print(table(res))


if __name__ == "__main__":
    main()
