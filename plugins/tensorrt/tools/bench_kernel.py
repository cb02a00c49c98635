# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
"""Times chaiClusteredAttentionEnqueue (decode: one new token, bf16) on the GPU machine against torch SDPA
dense decode of the original (unclustered) layer.

Usage: CHAI_TRT_BUILD_DIR=build PYTHONPATH=. python plugins/tensorrt/tools/bench_kernel.py [OUT.json]
Each shape is timed under both cache contracts: concat (present = concat(past, new), a copy of the whole
cache per step) and in place (past_present_share_buffer: present is the past buffer, one new row written).
Shapes: H=32, d=128 MHA with C=8/32 clusters (C K heads, 32 V heads), and a SmolLM2-135M layer (H=9, 3 KV
heads, d=64, layer 0 of docs/results/smollm2/mapping_default.json: 4 clusters, 10 K/V head reads per token
where the dense layer reads 6). A split-count sweep at batch 1 records what the automatic choice leaves.
Writes the numbers as JSON when OUT.json is given; a short table is printed last.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch

from chai_compile.export.plugin_kernel import layer_params, load_kernel

BF16 = 2  # CHAI_DTYPE_BFLOAT16


def cuda_time(fn, iters: int, rounds: int = 3) -> float:
    """Mean us per call over `iters` back-to-back calls; the best of `rounds` such loops (the device machine
    may be shared, and a neighbour's burst should not be charged to one kernel and not the other)."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / iters * 1e3)
    return best


def mha_layer(h: int, c: int, d: int) -> dict:
    """C equal clusters of an MHA layer: cluster i's K head is its own, every head keeps its V head."""
    return {"num_heads": h, "num_clusters": c, "num_k_heads": c, "num_v_heads": h, "head_dim": d,
            "scale": 1 / math.sqrt(d), "causal": 1, "cluster_offsets": [i * h // c for i in range(c + 1)],
            "k_head_index": list(range(c)), "v_head_index": list(range(h))}


def smollm2_layer() -> dict:
    """SmolLM2-135M layer 0 of mapping_default.json, heads permuted cluster by cluster: members
    [0,1,4,5,6,8] (representative 6), [2], [3], [7]; KV group of head i is i // 3."""
    order = [0, 1, 4, 5, 6, 8, 2, 3, 7]
    return {"num_heads": 9, "num_clusters": 4, "num_k_heads": 3, "num_v_heads": 3, "head_dim": 64,
            "scale": 1 / 8, "causal": 1, "cluster_offsets": [0, 6, 7, 8, 9], "k_head_index": [2, 0, 1, 2],
            "v_head_index": [i // 3 for i in order]}


class Case:
    """Device tensors and a params struct for one decode step at past length T-1 (T rows with the new one)."""

    def __init__(self, lib: ctypes.CDLL, attrs: dict, b: int, T: int) -> None:
        h, c, d = attrs["num_heads"], attrs["num_clusters"], attrs["head_dim"]
        hk, hv = attrs["num_k_heads"], attrs["num_v_heads"]
        g = torch.Generator(device="cuda").manual_seed(0)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

        self.lib, self.b, self.T = lib, b, T
        self.q, self.k, self.v = rnd(b, c, 1, d), rnd(b, hk, 1, d), rnd(b, hv, 1, d)
        self.buf_k, self.buf_v = rnd(b, hk, T, d), rnd(b, hv, T, d)  # in place: past rows + the new row's slot
        self.past_k, self.past_v = self.buf_k[:, :, : T - 1].contiguous(), self.buf_v[:, :, : T - 1].contiguous()
        self.pres_k, self.pres_v = torch.empty_like(self.buf_k), torch.empty_like(self.buf_v)
        self.mask = torch.ones(b, T, dtype=torch.int32, device="cuda")
        self.out = torch.empty(b, 1, h * d, dtype=torch.bfloat16, device="cuda")
        self.prm = layer_params(attrs)
        prm = self.prm
        prm.batch, prm.seq_len, prm.past_len, prm.dtype, prm.mask_dtype = b, 1, T - 1, BF16, 0
        self.ws = torch.empty(lib.chaiClusteredAttentionWorkspaceSize(ctypes.byref(prm)), dtype=torch.uint8,
                              device="cuda")
        prm.query, prm.key, prm.value = self.q.data_ptr(), self.k.data_ptr(), self.v.data_ptr()
        prm.attention_mask, prm.output = self.mask.data_ptr(), self.out.data_ptr()
        prm.workspace, prm.workspace_bytes = self.ws.data_ptr(), self.ws.numel()
        self.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def contract(self, inplace: bool, splits: int = 0) -> None:
        prm = self.prm
        prm.num_splits = splits
        prm.share_buffer, prm.cache_len = int(inplace), self.T
        if inplace:
            bufs = (self.buf_k, self.buf_v, self.buf_k, self.buf_v)
        else:
            bufs = (self.past_k, self.past_v, self.pres_k, self.pres_v)
        prm.past_key, prm.past_value, prm.present_key, prm.present_value = (t.data_ptr() for t in bufs)

    def enqueue(self) -> None:
        status = self.lib.chaiClusteredAttentionEnqueue(ctypes.byref(self.prm), self.stream)
        assert status == 0, status


def dense_sdpa_us(attrs: dict, b: int, T: int, iters: int) -> float:
    """The original layer's decode: all query heads against the model's K/V heads (GQA when fewer)."""
    h, d = attrs["num_heads"], attrs["head_dim"]
    kv = attrs["num_v_heads"]
    q = torch.randn(b, h, 1, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, kv, T, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(b, kv, T, d, dtype=torch.bfloat16, device="cuda")
    gqa = kv != h
    return cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), iters)


def dump(rows: list, sweep: list) -> None:
    """Rewrites OUT.json after every shape, so that a run cut short still leaves what it measured."""
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "CHAI_TRT_BUILD_DIR=build PYTHONPATH=. python plugins/tensorrt/tools/bench_kernel.py "
                       + " ".join(sys.argv[1:]),
            "rows": rows, "split_sweep (batch 1, in place; num_splits 0 = automatic)": sweep}, indent=1) + "\n")


def main() -> None:
    lib = load_kernel(os.environ["CHAI_TRT_BUILD_DIR"])
    layers = [("H32-C8", mha_layer(32, 8, 128)), ("H32-C32", mha_layer(32, 32, 128)), ("smollm2-L0", smollm2_layer())]
    rows, sweep = [], []
    for name, attrs in layers:
        for b in (1, 8, 32):
            for T in (512, 2048, 4096, 8192, 16384):
                case = Case(lib, attrs, b, T)
                el = case.buf_k.element_size()
                read = b * T * attrs["head_dim"] * el * (attrs["num_k_heads"] + attrs["num_v_heads"])
                iters = 10 if read > 2e9 else 30
                case.contract(inplace=False)
                concat_us = cuda_time(case.enqueue, iters)
                case.contract(inplace=True)
                inplace_us = cuda_time(case.enqueue, iters)
                sdpa_us = dense_sdpa_us(attrs, b, T, iters)
                # Bytes the clustered step must read: one K row per cluster, one V row per distinct (cluster, V head).
                uniq = sum(len({attrs["v_head_index"][i] for i in range(lo, hi)})
                           for lo, hi in itertools.pairwise(attrs["cluster_offsets"]))
                chai_bytes = b * T * attrs["head_dim"] * el * (attrs["num_clusters"] + uniq)
                rows.append({"layer": name, "batch": b, "tokens": T, "heads": attrs["num_heads"],
                             "clusters": attrs["num_clusters"], "head_dim": attrs["head_dim"], "dtype": "bf16",
                             "concat_enqueue_us": round(concat_us, 1), "inplace_enqueue_us": round(inplace_us, 1),
                             "sdpa_dense_us": round(sdpa_us, 1),
                             "inplace_over_sdpa": round(sdpa_us / inplace_us, 2),
                             "inplace_tb_per_s": round(chai_bytes / inplace_us / 1e6, 2)})
                print(json.dumps(rows[-1]), flush=True)
                dump(rows, sweep)
                if b == 1 and T in (4096, 16384):
                    for s in (0, 8, 16, 32, 64):
                        case.contract(inplace=True, splits=s)
                        sweep.append({"layer": name, "batch": b, "tokens": T, "num_splits": s,
                                      "inplace_enqueue_us": round(cuda_time(case.enqueue, 30), 1)})
                dump(rows, sweep)
                del case
                torch.cuda.empty_cache()
    print("\nlayer       B     T | SDPA dense us | in place us | concat us | dense/in place | TB/s")
    for r in rows:
        print(f"{r['layer']:<10} {r['batch']:>2} {r['tokens']:>5} | {r['sdpa_dense_us']:>13} | "
              f"{r['inplace_enqueue_us']:>11} | {r['concat_enqueue_us']:>9} | {r['inplace_over_sdpa']:>14} | "
              f"{r['inplace_tb_per_s']}")
    print("sweep: " + " ".join(f"{s['layer']}/T{s['tokens']}/n{s['num_splits']}={s['inplace_enqueue_us']}"
                               for s in sweep))


if __name__ == "__main__":
    main()
