"""Clustered-attention kernels against dense SDPA (flash) and the unfused clustered path (issue 5).

Sections (all by default): copy bandwidth, a config sweep, the decode matrix (H=32, d=128, bf16,
B x T x C, plus GQA 32q/8kv), prefill (S = 2048, 8192) and end to end time-to-next-token of a
LLaMA-7B-shaped model (layers 0-17 dense, 18-31 at 4 clusters) against the same model dense.
Timings are medians of triton.testing.do_bench (CUDA events, L2 flushed before every call), on
the call replayed from a CUDA graph ("graph": GPU time, no Python launch cost) and on the eager
call ("eager": what an unfused Python loop pays). Results go to OUT/bench_kernels.json and
OUT/bench_kernels.png; a short table is printed last.

    PYTHONPATH=. python benchmarks/bench_kernels.py --out runs/bench
    PYTHONPATH=. python benchmarks/bench_kernels.py --plot-only runs/bench/bench_kernels.json --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from chai_compile.kernels import DecodeConfig, PrefillConfig, clustered_decode, clustered_prefill, get_plan
from chai_compile.kernels.reference import cluster_of_head

H, D = 32, 128
DT = torch.bfloat16
ESZ = 2  # bytes per bf16 element
DEVICE = "cuda"


# ------------------------------------------------------------------------------------ timing ---


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn (already warmed up), captured after one run on a side stream as torch requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def median_replay_ms(g: torch.cuda.CUDAGraph, n: int, skip: int, before: Callable[[], object] | None = None) -> float:
    """Median ms of n replays of g timed by CUDA events (after `skip` untimed ones), `before()` run ahead of each."""
    times = []
    for i in range(n + skip):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        if i >= skip:
            times.append((start, end))
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in times]).median())


def time_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median ms per call; graph=True replays a CUDA graph of fn (no CPU launch overhead)."""
    import triton.testing

    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    if not graph:
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    g = capture_graph(fn)
    t = float(triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median"))
    del g
    return t


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def copy_bandwidth() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), graph=False)  # noqa: F821 (ruff misreads the del below)
    del src, dst
    return {"bytes": 2 * n, "ms": t, "gbps": 2 * n / t / 1e6}


def decode_fn(q, kc, v, lengths, m: dict, scale: float, cfg: DecodeConfig | None = None) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        return clustered_decode(q, kc, v, lengths, m["offsets"], m["k_index"], m["v_index"], scale, config=cfg)

    return run


def prefill_fn(q, k, v, m: dict, scale: float, cfg: PrefillConfig | None = None) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        return clustered_prefill(q, k, v, m["offsets"], m["k_index"], m["v_index"], scale, True, config=cfg)

    return run


# ----------------------------------------------------------------------------------- mappings ---


def equal_mapping(c: int, h: int = H, hv: int = H) -> dict:
    """Clusters of equal size over permuted heads; K cache holds the C representatives' heads."""
    group = h // hv
    return make_mapping([h // c] * c, [i // group for i in range(h)])


def make_mapping(sizes: list[int], v_heads: list[int], k_heads: list[int] | None = None) -> dict:
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    k_heads = k_heads if k_heads is not None else list(range(len(sizes)))
    m = {
        "offsets": torch.tensor(offs, dtype=torch.int32, device=DEVICE),
        "k_index": torch.tensor(k_heads, dtype=torch.int32, device=DEVICE),
        "v_index": torch.tensor(v_heads, dtype=torch.int32, device=DEVICE),
        "sizes": sizes,
        "k_heads_kept": len(set(k_heads)),
        "v_heads": len(set(v_heads)),
    }
    # distinct (cluster, V head) pairs, as the kernels' plan counts them (GQA heads of one cluster on one
    # V head have equal outputs)
    m["slots"] = get_plan(m["offsets"], m["k_index"], m["v_index"]).num_slots
    return m


def gqa_aligned(c: int, hv: int = 8) -> dict:
    """GQA 32q/8kv, clusters = whole KV groups (permuted heads stay grouped), reps on distinct KV heads."""
    group = H // hv
    return make_mapping([H // c] * c, [i // group for i in range(H)])


def gqa_scattered(c: int, hv: int = 8, seed: int = 0) -> dict:
    """GQA clusters that cut across KV groups: V heads are read by several clusters."""
    g = torch.Generator().manual_seed(seed)
    group = H // hv
    perm = torch.randperm(H, generator=g).tolist()
    v_heads = [h // group for h in perm]
    sizes = [H // c] * c
    rep_kv = [v_heads[sum(sizes[:i])] for i in range(c)]
    kept = sorted(set(rep_kv))
    return make_mapping(sizes, v_heads, [kept.index(r) for r in rep_kv])


def uneven_mapping(c: int) -> dict:
    """Uneven clusters like a real profile gives (one big cluster, a few small ones)."""
    sizes = {4: [20, 6, 4, 2], 8: [12, 6, 4, 3, 3, 2, 1, 1], 16: [8, 4, 3, 3, 2, 2] + [1] * 10}[c]
    return make_mapping(sizes, list(range(H)))


# ------------------------------------------------------------------------------------- decode ---


def unfused_decode(q, kc, v, m: dict, scale: float) -> Callable[[], torch.Tensor]:
    """matmul on the C reps, softmax, index_select probabilities to the heads, matmul with V."""
    cl = cluster_of_head(m["offsets"])
    vidx = m["v_index"].long()
    order = torch.argsort(vidx, stable=True)  # heads grouped by V head: [B, Hv, G, T] @ [B, Hv, T, d]
    inv = torch.argsort(order)
    cl_sorted = cl[order]
    hv = v.shape[1]
    batch = q.shape[0]
    kc_sel = kc.index_select(1, m["k_index"].long()) if m["k_index"].numel() != kc.shape[1] else kc

    def run() -> torch.Tensor:
        s = torch.matmul(q[:, :, None, :], kc_sel.transpose(-1, -2)) * scale  # [B, C, 1, T]
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        p = p.index_select(1, cl_sorted).view(batch, hv, -1, p.shape[-1])
        o = torch.matmul(p, v).reshape(batch, -1, q.shape[-1])
        return o.index_select(1, inv)

    return run


def decode_row(batch: int, t: int, m: dict, k_dense, v, q_dense, dense_ms: dict, label: str, cfg=None) -> dict:
    c = len(m["sizes"])
    scale = 1 / math.sqrt(D)
    kc = k_dense[:, : m["k_heads_kept"]]  # the kept K heads: same bytes as a compact cache
    q = torch.randn(batch, c, D, device=DEVICE, dtype=DT)
    lengths = torch.full((batch,), t, dtype=torch.int32, device=DEVICE)

    fused = decode_fn(q, kc, v, lengths, m, scale, cfg)
    unfused = unfused_decode(q, kc, v, m, scale)
    hv = v.shape[1]
    fused_bytes = batch * t * D * (m["k_heads_kept"] + m["v_heads"]) * ESZ
    dense_bytes = batch * t * D * (k_dense.shape[1] + hv) * ESZ
    row = {
        "label": label,
        "B": batch,
        "T": t,
        "C": c,
        "sizes": m["sizes"],
        "k_heads": m["k_heads_kept"],
        "v_heads": hv,
        "fused_bytes": fused_bytes,
        "bytes_limit": dense_bytes / fused_bytes,
    }
    for mode in ("graph", "eager"):
        graph = mode == "graph"
        tf = time_ms(fused, graph)
        tu = time_ms(unfused, graph)
        td = dense_ms[mode]
        row[mode] = {
            "fused_ms": tf,
            "unfused_ms": tu,
            "sdpa_ms": td,
            "fused_gbps": fused_bytes / tf / 1e6,
            "sdpa_gbps": dense_bytes / td / 1e6,
            "speedup_vs_sdpa": td / tf,
            "speedup_vs_unfused": tu / tf,
            "unfused_vs_sdpa": td / tu,
        }
    return row


def dense_decode_ms(k_dense, v, batch: int) -> dict:
    q = torch.randn(batch, H, 1, D, device=DEVICE, dtype=DT)
    gqa = k_dense.shape[1] != H

    def run() -> torch.Tensor:
        return sdpa_flash(q, k_dense, v, enable_gqa=gqa)

    return {"graph": time_ms(run, True), "eager": time_ms(run, False)}


def decode_matrix(bs, ts, cs, results: dict, save: Callable[[], None]) -> None:
    rows = results.setdefault("decode", [])
    for batch in bs:
        for t in ts:
            k_dense = torch.randn(batch, H, t, D, device=DEVICE, dtype=DT)
            v = torch.randn(batch, H, t, D, device=DEVICE, dtype=DT)
            dense = dense_decode_ms(k_dense, v, batch)
            for c in cs:
                rows.append(decode_row(batch, t, equal_mapping(c), k_dense, v, None, dense, "mha"))
                if batch == 8 and t == 16384:
                    rows.append(decode_row(batch, t, uneven_mapping(c), k_dense, v, None, dense, "mha-uneven"))
                print(fmt_decode(rows[-1]), flush=True)
            del k_dense, v
            torch.cuda.empty_cache()
            save()
    gqa_rows = results.setdefault("decode_gqa", [])
    for batch in bs:
        for t in ts:
            k_dense = torch.randn(batch, 8, t, D, device=DEVICE, dtype=DT)
            v = torch.randn(batch, 8, t, D, device=DEVICE, dtype=DT)
            dense = dense_decode_ms(k_dense, v, batch)
            gqa_rows.append(decode_row(batch, t, gqa_aligned(4), k_dense, v, None, dense, "gqa-aligned"))
            print(fmt_decode(gqa_rows[-1]), flush=True)
            if t == 16384:
                gqa_rows.append(decode_row(batch, t, gqa_scattered(4), k_dense, v, None, dense, "gqa-scattered"))
                print(fmt_decode(gqa_rows[-1]), flush=True)
            del k_dense, v
            torch.cuda.empty_cache()
            save()


def fmt_decode(r: dict) -> str:
    g = r["graph"]
    return (
        f"{r['label']:13s} B={r['B']:2d} T={r['T']:5d} C={r['C']:2d} fused {g['fused_ms'] * 1e3:8.1f}us "
        f"{g['fused_gbps']:6.0f}GB/s  sdpa {g['sdpa_ms'] * 1e3:8.1f}us  x{g['speedup_vs_sdpa']:.2f} "
        f"(limit {r['bytes_limit']:.2f})  vs unfused x{g['speedup_vs_unfused']:.2f}  "
        f"eager x{r['eager']['speedup_vs_sdpa']:.2f}"
    )


# -------------------------------------------------------------------------------------- sweep ---


# The first sweep (run 1, configs fixed by hand) picked the tile-width table in triton_decode;
# the default sweep now checks the grid size (waves) around the automatic configs.
DECODE_SWEEP_FULL = [
    DecodeConfig(tile_width=w, block_n=n, num_warps=nw, num_stages=st, waves=wv, min_split=ms)
    for (w, n, nw, st, wv, ms) in [
        (4, 32, 4, 3, 4.0, 128),
        (2, 32, 4, 3, 4.0, 128),
        (8, 16, 4, 3, 4.0, 128),
        (8, 32, 8, 3, 4.0, 128),
        (4, 64, 4, 2, 4.0, 128),
        (4, 64, 8, 3, 4.0, 128),
        (4, 16, 4, 4, 4.0, 128),
        (2, 64, 4, 3, 4.0, 128),
        (1, 64, 4, 3, 4.0, 128),
        (1, 128, 4, 2, 4.0, 256),
        (4, 32, 4, 3, 8.0, 64),
        (4, 32, 4, 3, 2.0, 256),
        (4, 32, 2, 3, 4.0, 128),
        (8, 32, 4, 2, 4.0, 128),
    ]
]

DECODE_SWEEP = [DecodeConfig(waves=w) for w in (4.0, 8.0, 16.0)] + [
    DecodeConfig(num_stages=4),
    DecodeConfig(num_stages=2),
    DecodeConfig(block_n=64),
    DecodeConfig(block_n=128, num_stages=2),
    DecodeConfig(min_split=256),
    DecodeConfig(use_dot=False),  # FMA kernel everywhere
    DecodeConfig(use_dot=True),  # tensor-core kernel everywhere
]

PREFILL_SWEEP_FULL = [
    PrefillConfig(tile_width=w, block_m=bm, block_n=bn, num_warps=nw, num_stages=st)
    for (w, bm, bn, nw, st) in [
        (2, 128, 64, 8, 2),
        (2, 128, 64, 8, 3),
        (1, 128, 64, 8, 3),
        (1, 128, 128, 8, 2),
        (4, 64, 64, 4, 2),
        (4, 64, 32, 4, 3),
        (2, 64, 64, 4, 3),
        (4, 128, 32, 8, 2),
        (2, 128, 32, 8, 3),
        (1, 64, 64, 4, 3),
    ]
]


PREFILL_SWEEP = [PrefillConfig(), PrefillConfig(block_n=32), PrefillConfig(num_stages=4)]


def sweep(results: dict, save: Callable[[], None], full: bool = False) -> None:
    decode_cfgs, prefill_cfgs = (DECODE_SWEEP_FULL, PREFILL_SWEEP_FULL) if full else (DECODE_SWEEP, PREFILL_SWEEP)
    out = results.setdefault("sweep", {"decode": [], "prefill": []})
    shapes = [
        (1, 4096, 4, "mha"),
        (1, 32768, 8, "mha"),
        (8, 16384, 4, "mha"),
        (32, 16384, 16, "mha"),
        (8, 16384, 4, "gqa"),
    ]
    for batch, t, c, kind in shapes:
        hk = 8 if kind == "gqa" else H
        k_dense = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
        v = torch.randn(batch, hk, t, D, device=DEVICE, dtype=DT)
        m = gqa_aligned(c) if kind == "gqa" else equal_mapping(c)
        q = torch.randn(batch, c, D, device=DEVICE, dtype=DT)
        kc = k_dense[:, : m["k_heads_kept"]]
        lengths = torch.full((batch,), t, dtype=torch.int32, device=DEVICE)
        fused_bytes = batch * t * D * (m["k_heads_kept"] + m["v_heads"]) * ESZ
        for cfg in decode_cfgs:
            try:
                ms = time_ms(decode_fn(q, kc, v, lengths, m, 0.088, cfg))
                out["decode"].append(
                    {
                        "B": batch,
                        "T": t,
                        "C": c,
                        "kind": kind,
                        "cfg": asdict(cfg),
                        "ms": ms,
                        "gbps": fused_bytes / ms / 1e6,
                    }
                )
                print(
                    f"sweep decode {kind} B={batch} T={t} C={c} {cfg}: {ms * 1e3:.1f}us "
                    f"{fused_bytes / ms / 1e6:.0f}GB/s"
                )
            except Exception as e:  # a config that does not compile (registers, smem) is skipped
                print(f"sweep decode {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
        del k_dense, v
        torch.cuda.empty_cache()
        save()
    for batch, s, c in [(1, 8192, 4), (1, 8192, 16), (4, 2048, 8)]:
        m = equal_mapping(c)
        q = torch.randn(batch, c, s, D, device=DEVICE, dtype=DT)
        k = torch.randn(batch, c, s, D, device=DEVICE, dtype=DT)
        v = torch.randn(batch, H, s, D, device=DEVICE, dtype=DT)
        flops = prefill_flops(batch, s, c, H)
        for cfg in prefill_cfgs:
            try:
                ms = time_ms(prefill_fn(q, k, v, m, 0.088, cfg))
                out["prefill"].append(
                    {"B": batch, "S": s, "C": c, "cfg": asdict(cfg), "ms": ms, "tflops": flops / ms / 1e9}
                )
                print(f"sweep prefill B={batch} S={s} C={c} {cfg}: {ms * 1e3:.1f}us {flops / ms / 1e9:.0f}TFLOP/s")
            except Exception as e:
                print(f"sweep prefill {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
        save()


def cpu_us_per_call(fn: Callable[[], object], n: int = 300) -> float:
    """Wall time per call with the GPU queue never draining: the host-side cost of one call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def overhead_section(results: dict, save: Callable[[], None]) -> None:
    """Host cost per call at a shape whose GPU time is tiny (B=1, T=256): launch-bound eager decode."""
    t = 256
    k_dense = torch.randn(1, H, t, D, device=DEVICE, dtype=DT)
    v = torch.randn(1, H, t, D, device=DEVICE, dtype=DT)
    qd = torch.randn(1, H, 1, D, device=DEVICE, dtype=DT)
    m = equal_mapping(4)
    q = torch.randn(1, 4, D, device=DEVICE, dtype=DT)
    lengths = torch.full((1,), t, dtype=torch.int32, device=DEVICE)
    kc = k_dense[:, :4]
    r = {
        "fused_us": cpu_us_per_call(decode_fn(q, kc, v, lengths, m, 0.088)),
        "sdpa_us": cpu_us_per_call(lambda: sdpa_flash(qd, k_dense, v)),
        "unfused_us": cpu_us_per_call(unfused_decode(q, kc, v, m, 0.088)),
        "plan_lookup_us": cpu_us_per_call(lambda: get_plan(m["offsets"], m["k_index"], m["v_index"])),
    }
    results["overhead"] = r
    print("host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    save()


# ------------------------------------------------------------------------------------ prefill ---


def prefill_flops(batch: int, s: int, c: int, h: int) -> float:
    """Causal: scores for the C reps, P.V for h distinct (cluster, V head) pairs; 2 flops per MAC."""
    return 2.0 * batch * (c + h) * s * s * D / 2


def prefill_section(results: dict, save: Callable[[], None]) -> None:
    rows = results.setdefault("prefill", [])
    for batch, s in [(1, 2048), (4, 2048), (1, 8192)]:
        qd = torch.randn(batch, H, s, D, device=DEVICE, dtype=DT)
        kd = torch.randn(batch, H, s, D, device=DEVICE, dtype=DT)
        v = torch.randn(batch, H, s, D, device=DEVICE, dtype=DT)
        t_dense = time_ms(lambda qd=qd, kd=kd, v=v: sdpa_flash(qd, kd, v, is_causal=True))
        dense_flops = prefill_flops(batch, s, H, H)
        for c in (4, 8, 16):
            m = equal_mapping(c)
            q, k = qd[:, :c], kd[:, :c]
            tf = time_ms(prefill_fn(q, k, v, m, 1 / math.sqrt(D)))
            r = {
                "B": batch,
                "S": s,
                "C": c,
                "fused_ms": tf,
                "sdpa_ms": t_dense,
                "speedup": t_dense / tf,
                "flop_ratio": dense_flops / prefill_flops(batch, s, c, H),
                "fused_tflops": prefill_flops(batch, s, c, H) / tf / 1e9,
                "sdpa_tflops": dense_flops / t_dense / 1e9,
            }
            rows.append(r)
            print(
                f"prefill B={batch} S={s} C={c}: fused {tf * 1e3:.0f}us ({r['fused_tflops']:.0f} TFLOP/s) "
                f"sdpa {t_dense * 1e3:.0f}us ({r['sdpa_tflops']:.0f}) x{r['speedup']:.2f} "
                f"(flop ratio {r['flop_ratio']:.2f})",
                flush=True,
            )
        del qd, kd, v
        torch.cuda.empty_cache()
        save()
    # GQA 32q / 8kv, clusters aligned with KV groups (4 clusters, 4 kept K heads).
    batch, s = 1, 8192
    qd = torch.randn(batch, H, s, D, device=DEVICE, dtype=DT)
    kd = torch.randn(batch, 8, s, D, device=DEVICE, dtype=DT)
    v = torch.randn(batch, 8, s, D, device=DEVICE, dtype=DT)
    t_dense = time_ms(lambda: sdpa_flash(qd, kd, v, is_causal=True, enable_gqa=True))
    m = gqa_aligned(4)
    tf = time_ms(prefill_fn(qd[:, :4], kd[:, :4], v, m, 1 / math.sqrt(D)))
    dense_flops = prefill_flops(batch, s, H, H)
    r = {
        "B": batch,
        "S": s,
        "C": 4,
        "label": "gqa-aligned",
        "fused_ms": tf,
        "sdpa_ms": t_dense,
        "speedup": t_dense / tf,
        "flop_ratio": dense_flops / prefill_flops(batch, s, 4, m["slots"]),
        "fused_tflops": prefill_flops(batch, s, 4, m["slots"]) / tf / 1e9,
        "sdpa_tflops": dense_flops / t_dense / 1e9,
    }
    rows.append(r)
    print(f"prefill GQA B=1 S=8192 C=4: x{r['speedup']:.2f} (flop ratio {r['flop_ratio']:.2f})", flush=True)
    save()


# ---------------------------------------------------------------------------------- end to end ---


class Llama7BShaped:
    """LLaMA-7B-shaped decode step in plain torch with random bf16 weights.

    Layers listed in `clustered` keep C query/key heads (Q/K projection rows of the reps only) and
    run clustered_decode; the others run SDPA flash. The KV cache of all layers of one kind shares
    one buffer: each layer still streams its own full cache from HBM (L2 is far smaller), and a
    16k x 8 dense cache for 32 layers would not fit beside the weights.
    """

    hidden, inter, vocab, layers = 4096, 11008, 32000, 32

    def __init__(self, batch: int, ctx: int, clustered: dict[int, int]) -> None:
        self.batch, self.ctx, self.clustered = batch, ctx, clustered
        dev, std = DEVICE, 0.02

        def w(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=dev, dtype=DT) * std

        self.wqkv, self.wo, self.wgu, self.wd = [], [], [], []
        for i in range(self.layers):
            c = clustered.get(i, H)
            self.wqkv.append(w(self.hidden, (2 * c + H) * D))
            self.wo.append(w(H * D, self.hidden))
            self.wgu.append(w(self.hidden, 2 * self.inter))
            self.wd.append(w(self.inter, self.hidden))
        self.lm_head = w(self.hidden, self.vocab)
        self.k_dense = torch.randn(batch, H, ctx, D, device=dev, dtype=DT)
        self.v = torch.randn(batch, H, ctx, D, device=dev, dtype=DT)
        cs = set(clustered.values())
        self.k_clustered = {c: torch.randn(batch, c, ctx, D, device=dev, dtype=DT) for c in cs}
        self.maps = {c: equal_mapping(c) for c in cs}
        self.lengths = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        pos = ctx - 1
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
        ang = pos * inv
        self.cos = torch.cat([ang.cos(), ang.cos()]).to(DT)
        self.sin = torch.cat([ang.sin(), ang.sin()]).to(DT)
        self.x = torch.randn(batch, self.hidden, device=dev, dtype=DT)

    def weight_bytes(self) -> int:
        ws = self.wqkv + self.wo + self.wgu + self.wd + [self.lm_head]
        return sum(t.numel() for t in ws) * ESZ

    def kv_bytes(self) -> int:
        per = self.batch * self.ctx * D * ESZ
        return sum(per * (self.clustered.get(i, H) + H) for i in range(self.layers))

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * self.cos + torch.cat([-x2, x1], -1) * self.sin

    @staticmethod
    def rms(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def step(self) -> torch.Tensor:
        x, b, pos = self.x, self.batch, self.ctx - 1
        for i in range(self.layers):
            c = self.clustered.get(i, H)
            qkv = self.rms(x) @ self.wqkv[i]
            q, k, v = qkv.split([c * D, c * D, H * D], dim=-1)
            q = self.rope(q.view(b, c, D))
            k = self.rope(k.view(b, c, D))
            kc = self.k_dense if c == H else self.k_clustered[c]
            kc[:, :, pos] = k  # append this token's K/V at the last cache slot
            self.v[:, :, pos] = v.view(b, H, D)
            if i in self.clustered:
                m = self.maps[c]
                a = clustered_decode(
                    q, kc, self.v, self.lengths, m["offsets"], m["k_index"], m["v_index"], 1 / math.sqrt(D)
                )
            else:
                a = sdpa_flash(q[:, :, None, :], kc, self.v)
            x = x + a.reshape(b, H * D) @ self.wo[i]
            gate, up = (self.rms(x) @ self.wgu[i]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ self.wd[i]
        return self.rms(x) @ self.lm_head


def e2e_section(results: dict, save: Callable[[], None]) -> None:
    rows = results.setdefault("e2e", [])
    chai = {i: 4 for i in range(18, 32)}  # reference LLaMA-7B settings: 632 of 1024 K heads
    for ctx in (4096, 16384):
        for batch in (1, 8):
            r = {"ctx": ctx, "B": batch}
            for name, clustered in (("dense", {}), ("chai", chai)):
                model = Llama7BShaped(batch, ctx, clustered)
                with torch.no_grad():
                    r[f"{name}_ms"] = time_ms(model.step, graph=True)
                r[f"{name}_bytes"] = model.weight_bytes() + model.kv_bytes()
                r[f"{name}_kv_bytes"] = model.kv_bytes()
                del model
                torch.cuda.empty_cache()
            r["measured_ratio"] = r["dense_ms"] / r["chai_ms"]
            r["bytes_ratio"] = r["dense_bytes"] / r["chai_bytes"]
            r["kv_only_ratio"] = r["dense_kv_bytes"] / r["chai_kv_bytes"]
            rows.append(r)
            print(
                f"e2e ctx={ctx} B={batch}: dense {r['dense_ms']:.2f}ms chai {r['chai_ms']:.2f}ms "
                f"x{r['measured_ratio']:.3f} (bytes model x{r['bytes_ratio']:.3f})",
                flush=True,
            )
            save()


# ----------------------------------------------------------------------------------- reporting ---


def summary(results: dict) -> str:
    copy = results.get("copy", {}).get("gbps", float("nan"))
    lines = [f"copy bandwidth {copy:.0f} GB/s   device {results.get('device')}"]
    if "overhead" in results:
        lines.append("host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in results["overhead"].items()))
    lines.append("decode (graph)     B     T   C  fused_us   GB/s  %copy  xSDPA  limit  %lim  xUnf  xSDPA_eager")
    for r in results.get("decode", []) + results.get("decode_gqa", []):
        g = r["graph"]
        lines.append(
            f"{r['label']:15s} {r['B']:4d} {r['T']:5d} {r['C']:3d} {g['fused_ms'] * 1e3:9.1f} {g['fused_gbps']:6.0f} "
            f"{100 * g['fused_gbps'] / copy:6.1f} {g['speedup_vs_sdpa']:6.2f} {r['bytes_limit']:6.2f} "
            f"{100 * g['speedup_vs_sdpa'] / r['bytes_limit']:5.0f} {g['speedup_vs_unfused']:5.2f} "
            f"{r['eager']['speedup_vs_sdpa']:6.2f}"
        )
    for r in results.get("prefill", []):
        lines.append(
            f"prefill {r.get('label', 'mha')} B={r['B']} S={r['S']} C={r['C']}: x{r['speedup']:.2f} vs SDPA "
            f"(flop ratio {r['flop_ratio']:.2f}), "
            f"{r['fused_tflops']:.0f} vs {r['sdpa_tflops']:.0f} TFLOP/s"
        )
    for r in results.get("e2e", []):
        lines.append(
            f"e2e ctx={r['ctx']} B={r['B']}: dense {r['dense_ms']:.2f} ms, chai {r['chai_ms']:.2f} ms, "
            f"x{r['measured_ratio']:.3f} measured vs x{r['bytes_ratio']:.3f} bytes model"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("decode", []) if r["label"] == "mha"] + results.get("decode_gqa", [])
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(rows)), 8), sharex=True)
    tag = {"mha": "", "gqa-aligned": "GQA ", "gqa-scattered": "GQA-scat "}
    names = [f"{tag.get(r['label'], r['label'])}B{r['B']} T{r['T'] // 1024}k C{r['C']}" for r in rows]
    xs = range(len(rows))
    axes[0].bar([x - 0.2 for x in xs], [r["graph"]["speedup_vs_sdpa"] for r in rows], 0.4, label="fused vs SDPA")
    axes[0].bar([x + 0.2 for x in xs], [r["graph"]["unfused_vs_sdpa"] for r in rows], 0.4, label="unfused vs SDPA")
    axes[0].scatter(xs, [r["bytes_limit"] for r in rows], color="k", marker="_", s=200, label="bytes limit", zorder=3)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("speedup over dense SDPA")
    axes[0].legend()
    copy = results.get("copy", {}).get("gbps")
    axes[1].bar(xs, [r["graph"]["fused_gbps"] for r in rows], label="fused kernel")
    axes[1].plot(xs, [r["graph"]["sdpa_gbps"] for r in rows], "o", color="C1", label="SDPA dense")
    if copy:
        axes[1].axhline(copy, color="k", ls="--", label="copy")
        axes[1].axhline(0.85 * copy, color="grey", ls=":", label="85% copy")
    axes[1].set_ylabel("GB/s")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(names, rotation=70, fontsize=7)
    axes[1].legend()
    fig.suptitle(f"Clustered decode, H=32 d=128 bf16 ({results.get('device')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--sections", default="copy,overhead,sweep,decode,prefill,e2e")
    ap.add_argument("--full-sweep", action="store_true", help="the wide config sweep of the first tuning run")
    ap.add_argument("--quick", action="store_true", help="small decode matrix (B=1,8; T=4096,16384)")
    ap.add_argument("--plot-only", type=Path, help="re-plot an existing JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        results = json.loads(args.plot_only.read_text())
        plot(results, args.out / "bench_kernels.png")
        print(summary(results))
        return

    torch.manual_seed(0)
    import triton

    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
        "command": "PYTHONPATH=. python benchmarks/bench_kernels.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
        "errors": [],
    }
    json_path = args.out / "bench_kernels.json"

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1))

    sections = args.sections.split(",")
    bs, ts = ((1, 8), (4096, 16384)) if args.quick else ((1, 8, 32), (4096, 16384, 32768))
    steps = {
        "copy": lambda: results.__setitem__("copy", copy_bandwidth()),
        "overhead": lambda: overhead_section(results, save),
        "sweep": lambda: sweep(results, save, args.full_sweep),
        "decode": lambda: decode_matrix(bs, ts, (4, 8, 16), results, save),
        "prefill": lambda: prefill_section(results, save),
        "e2e": lambda: e2e_section(results, save),
    }
    for name in sections:
        t0 = time.time()
        try:
            steps[name]()
        except Exception as e:  # keep the other sections' numbers
            traceback.print_exc()
            results["errors"].append(f"{name}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        results.setdefault("section_s", {})[name] = time.time() - t0
        save()
        print(f"== {name} done in {time.time() - t0:.0f}s", flush=True)
    try:
        plot(results, args.out / "bench_kernels.png")
    except Exception as e:
        results["errors"].append(f"plot: {e}")
    save()
    print(summary(results))


if __name__ == "__main__":
    main()
