"""End-to-end generate() latency: original vs CHAI rewrite (fused Triton path and torch path) on a random-weight model.

    python benchmarks/bench_rewrite_latency.py --out results/rewrite_latency.json   # CUDA, bf16

The model has SmolLM2-135M's shapes (30 layers, 9 heads, 3 KV heads, d=64) with random weights (no checkpoint
needed); every layer but the first two is clustered into 3 clusters of 3 heads whose representatives all
read KV head 0 (the K-cache-minimal choice). Latency depends on shapes, not weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chai_compile.adapters import adapter_for
from chai_compile.compat import output_cache
from chai_compile.fingerprint import model_info
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
from chai_compile.rewrite import ClusteredAttention, apply_mapping, kv_cache_bytes


def smol_shaped(dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def mapping_for(model) -> ClusterMapping:
    info = model_info(adapter_for(model))
    layers = [LayerMapping(i, "dense") if i < 2 else LayerMapping(
        i, "clustered", tuple(Cluster((r, r + 3, r + 6), r) for r in range(3))) for i in range(info.num_layers)]
    return ClusterMapping.build(info, layers, {"kind": "bench"})


@torch.no_grad()
def time_generate(model, ids: torch.Tensor, new_tokens: int, reps: int = 3) -> tuple[float, int]:
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = model.generate(ids, **kw)  # warm-up (Triton compile, allocator)
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, kv_cache_bytes(output_cache(out))["total_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--shapes", default="1x512,8x512,8x2048,32x1024", help="batch x prompt, comma separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    orig = smol_shaped(dtype, "cuda")
    mapping = mapping_for(orig)
    chai = apply_mapping(copy.deepcopy(orig), mapping)
    rows = []
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        ids = torch.randint(3, 49152, (b, s), device="cuda")
        row = {"batch": b, "prompt": s, "new_tokens": args.new_tokens}
        row["original_s"], row["original_kv_bytes"] = time_generate(orig, ids, args.new_tokens)
        for on in (True, False):
            for m in chai.modules():
                if isinstance(m, ClusteredAttention):
                    m.use_kernels = on
            key = "chai_fused" if on else "chai_torch"
            row[f"{key}_s"], row["chai_kv_bytes"] = time_generate(chai, ids, args.new_tokens)
        row["speedup_fused"] = row["original_s"] / row["chai_fused_s"]
        row["speedup_torch"] = row["original_s"] / row["chai_torch_s"]
        rows.append(row)
        print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "mapping": mapping.summary(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
