# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
"""Times chaiClusteredAttentionEnqueue (decode, bf16) on the GPU machine against torch SDPA dense decode.

Usage: CHAI_TRT_BUILD_DIR=build PYTHONPATH=. python plugins/tensorrt/tools/bench_kernel.py [OUT.json]
Each shape is timed under both cache contracts: concat (present = concat(past, new), a copy of the whole
cache per step; that copy is also timed alone) and in place (past_present_share_buffer: present is the past
buffer, one new row written). Writes the numbers as JSON when OUT.json is given.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
from pathlib import Path

import torch

from chai_compile.export.plugin_kernel import layer_params, load_kernel


def cuda_time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


def main() -> None:
    lib = load_kernel(os.environ["CHAI_TRT_BUILD_DIR"])
    h, d, T = 32, 128, 4096
    rows = []
    for b, c in ((1, 8), (8, 8), (1, 32), (8, 32)):
        offsets = [i * h // c for i in range(c + 1)]
        x = {"query": torch.randn(b, c, 1, d), "key": torch.randn(b, c, 1, d), "value": torch.randn(b, h, 1, d),
             "past_key": torch.randn(b, c, T - 1, d), "past_value": torch.randn(b, h, T - 1, d)}
        x = {k: v.to(torch.bfloat16).cuda() for k, v in x.items()}
        x["attention_mask"] = torch.ones(b, T, dtype=torch.int32, device="cuda")
        prm = layer_params({"num_heads": h, "num_clusters": c, "num_k_heads": c, "num_v_heads": h, "head_dim": d,
                            "scale": 1 / math.sqrt(d), "causal": 1, "cluster_offsets": offsets,
                            "k_head_index": list(range(c)), "v_head_index": list(range(h))})
        out = torch.empty(b, 1, h * d, dtype=torch.bfloat16, device="cuda")
        pk = torch.empty(b, c, T, d, dtype=torch.bfloat16, device="cuda")
        pv = torch.empty(b, h, T, d, dtype=torch.bfloat16, device="cuda")
        prm.batch, prm.seq_len, prm.past_len = b, 1, T - 1
        prm.dtype, prm.mask_dtype = 2, 0  # CHAI_DTYPE_BFLOAT16, CHAI_MASK_INT32
        ws = torch.empty(lib.chaiClusteredAttentionWorkspaceSize(ctypes.byref(prm)), dtype=torch.uint8, device="cuda")
        for name in ("query", "key", "value", "past_key", "past_value", "attention_mask"):
            setattr(prm, name, x[name].data_ptr())
        prm.output, prm.present_key, prm.present_value = out.data_ptr(), pk.data_ptr(), pv.data_ptr()
        prm.workspace, prm.workspace_bytes = ws.data_ptr(), ws.numel()
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        us = cuda_time(lambda: lib.chaiClusteredAttentionEnqueue(ctypes.byref(prm), stream))
        src_k, src_v = x["past_key"], x["past_value"]
        copy_us = cuda_time(lambda: (pk[:, :, : T - 1].copy_(src_k), pv[:, :, : T - 1].copy_(src_v)))
        q = torch.randn(b, h, 1, d, dtype=torch.bfloat16, device="cuda")
        kd = torch.randn(b, h, T, d, dtype=torch.bfloat16, device="cuda")
        vd = torch.randn(b, h, T, d, dtype=torch.bfloat16, device="cuda")
        sdpa_us = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kd, vd))
        # In place: the past tensors are the buffers (T rows, the last one the new token's) and present = past.
        bk, bv = pk.clone(), pv.clone()
        prm.share_buffer, prm.cache_len, prm.past_len = 1, T, T - 1
        prm.past_key, prm.past_value, prm.present_key, prm.present_value = (
            bk.data_ptr(), bv.data_ptr(), bk.data_ptr(), bv.data_ptr())
        inplace_us = cuda_time(lambda: lib.chaiClusteredAttentionEnqueue(ctypes.byref(prm), stream))
        attn_bytes = b * T * d * (c + h) * 2
        rows.append({"batch": b, "heads": h, "clusters": c, "tokens": T, "head_dim": d, "dtype": "bf16",
                     "concat_enqueue_us": round(us, 1), "concat_copy_alone_us": round(copy_us, 1),
                     "inplace_enqueue_us": round(inplace_us, 1), "sdpa_dense_us": round(sdpa_us, 1),
                     "inplace_tb_per_s": round(attn_bytes / inplace_us / 1e6, 2),
                     "inplace_over_sdpa": round(sdpa_us / inplace_us, 2)})
        print(
            f"B={b} H={h} C={c} T={T} d={d} bf16: concat enqueue {us:.1f} us (copy alone {copy_us:.1f} us); "
            f"in place {inplace_us:.1f} us = {attn_bytes / inplace_us / 1e6:.2f} TB/s of K+V reads; "
            f"torch SDPA dense decode {sdpa_us:.1f} us (in place {sdpa_us / inplace_us:.2f}x SDPA)",
            flush=True,
        )
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
                                                 "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
