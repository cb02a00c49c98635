# ruff: noqa: B023  (each lambda is timed inside its own loop iteration)
"""Times chaiClusteredAttentionEnqueue (decode, bf16) on the GPU machine against torch SDPA dense decode.

Usage: CHAI_TRT_BUILD_DIR=build python plugins/tensorrt/tools/bench_kernel.py [OUT.json]
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

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import test_tensorrt_plugin as t  # noqa: E402


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
    lib = ctypes.CDLL(str(Path(os.environ["CHAI_TRT_BUILD_DIR"]) / "libchai_attention_kernel.so"))
    lib.chaiClusteredAttentionEnqueue.argtypes = [ctypes.POINTER(t.ChaiClusteredAttentionParams), ctypes.c_void_p]
    lib.chaiClusteredAttentionWorkspaceSize.restype = ctypes.c_size_t
    h, d, T = 32, 128, 4096
    rows = []
    for b, c in ((1, 8), (8, 8), (1, 32), (8, 32)):
        offsets = [i * h // c for i in range(c + 1)]
        attrs, x = t.make_case(
            b=b, h=h, offsets=offsets, hk=c, hv=h, d=d, s=1, p=T - 1, dtype=torch.bfloat16, pad=False
        )
        attrs["k_head_index"] = list(range(c))
        prm = t.ChaiClusteredAttentionParams()
        out = torch.empty(b, 1, h * d, dtype=torch.bfloat16, device="cuda")
        pk = torch.empty(b, c, T, d, dtype=torch.bfloat16, device="cuda")
        pv = torch.empty(b, h, T, d, dtype=torch.bfloat16, device="cuda")
        prm.batch, prm.seq_len, prm.past_len = b, 1, T - 1
        prm.num_heads, prm.num_clusters, prm.num_k_heads, prm.num_v_heads, prm.head_dim = h, c, c, h, d
        prm.scale, prm.causal, prm.dtype, prm.mask_dtype = 1 / math.sqrt(d), 1, 2, 0
        for i, v in enumerate(offsets):
            prm.cluster_offsets[i] = v
        for i in range(c):
            prm.k_head_index[i] = i
        for i in range(h):
            prm.v_head_index[i] = i
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
