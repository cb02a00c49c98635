"""Decode-step time of plans with span heads and shared layers against the original, beside the bytes model.

    # SmolLM2-135M with real plans, at 4k and 16k tokens of context
    python benchmarks/bench_transforms_decode.py smollm2-135m --plans combined.json span.json \\
        --contexts 4096,16384 --batch 1,8 --dtype bf16 --device cuda --out docs/results/spans/decode_h200.json
    # a LLaMA-7B-shaped stack (random weights) with a synthetic plan: dense, CHAI, span, shared layers in turn
    python benchmarks/bench_transforms_decode.py --llama7b-layers 8 --contexts 4096,16384 --batch 1,8 \\
        --dtype bf16 --device cuda --out r.json

One decode step = one new token per row after a prefill of C tokens (random ids, prefilled in chunks), through
the PyTorch rewrite (its CUDA kernels where a layer has them). The models take turns step by step; medians
and ratios (original time / plan time, > 1 = faster) come from one run. The bytes model: a decode step
reads every weight once and the whole KV cache once, so its predicted ratio is
(weights + original cache) / (weights + plan cache), the cache bytes from the plan's arithmetic
(`ClusterMapping.cache_bytes`) and checked against the bytes the rewritten cache holds after the prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"bench_transforms_decode: {msg}", file=sys.stderr, flush=True)


def llama7b_plan(model, layers: int):
    """Layers in turns of four: dense, CHAI (8 clusters of 4), span (half the KV heads keep 4 sinks + 1024),
    shared (reads the dense layer before it)."""
    from chai_compile.adapters import adapter_for
    from chai_compile.choices import LayerKind
    from chai_compile.fingerprint import model_info
    from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, Span

    out = []
    for i in range(layers):
        kind = i % 4
        if kind == 1:
            out.append(LayerMapping(i, LayerKind.CLUSTERED, tuple(Cluster(tuple(range(c, c + 4)), c)
                                                                   for c in range(0, 32, 4))))
        elif kind == 2:
            out.append(LayerMapping(i, LayerKind.SPAN, spans=(Span(4, 1024),) * 16 + (None,) * 16))
        elif kind == 3:
            out.append(LayerMapping(i, LayerKind.SHARED, source=i - 3))
        else:
            out.append(LayerMapping(i, LayerKind.DENSE))
    return ClusterMapping.build(model_info(adapter_for(model)), out, {"kind": "bench-llama7b-transforms"})


def load(args: argparse.Namespace, dtype: torch.dtype):
    """(model, [(label, plan)])."""
    if args.llama7b_layers:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.llama7b_layers,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=max(args.contexts) + 256)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        return model, [("dense/chai/span/shared", llama7b_plan(model, args.llama7b_layers))]
    from chai_compile.loading import load_model
    from chai_compile.mapping import ClusterMapping

    model = load_model(args.model, dtype=args.dtype_name).model.eval()
    return model, [(Path(p).parent.name if Path(p).name == "plan.json" else Path(p).stem, ClusterMapping.read(p))
                   for p in args.plans]


@torch.no_grad()
def prefill(model, batch: int, context: int, chunk: int, device: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    cache = None
    for s in range(0, context, chunk):
        out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return cache


@torch.no_grad()
def step_times(models: list, caches: list, batch: int, iters: int, device: str) -> list[list[float]]:
    tok = torch.full((batch, 1), 5, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for m, c in zip(models, caches, strict=True):  # warm-up: kernels compiled, allocator settled
        for _ in range(3):
            m(input_ids=tok, past_key_values=c, use_cache=True)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(iters):
        for i, (m, c) in enumerate(zip(models, caches, strict=True)):
            sync()
            t0 = time.perf_counter()
            m(input_ids=tok, past_key_values=c, use_cache=True)
            sync()
            times[i].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def host_profile(model, cache, batch: int, steps: int, device: str) -> dict:
    """Where a decode step's host time goes: torch.profiler over `steps` steps, ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.full((batch, 1), 5, device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            model(input_ids=tok, past_key_values=cache, use_cache=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"steps": steps, "host_ms_per_step": round(total / 1e3 / steps, 3),
            "ops_per_step": round(sum(e.count for e in ops) / steps, 1),
            "top": [{"op": e.key, "calls_per_step": round(e.count / steps, 1),
                     "self_host_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3)} for e in ops[:25]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--plans", nargs="*", default=[])
    ap.add_argument("--llama7b-layers", type=int, default=0)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    ap.add_argument("--dtype", dest="dtype_name", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", type=int, default=0, help="also profile this many steps of each model (host time)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.llama7b_layers and not (args.model and args.plans):
        raise SystemExit("pass MODEL --plans P [P ...], or --llama7b-layers N")
    from chai_compile.rewrite.cache_bytes import kv_cache_bytes
    from chai_compile.verify.compare import build_chai

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype_name]
    # torch 2.11 sends a one-token SDPA step to cuDNN attention on the H200, which builds a new cuDNN graph
    # whenever the key length changes, i.e. every decode step: 5.4 ms of host time per layer measured. The
    # original would then be timed on that artefact; flash / memory-efficient SDPA is what it should run.
    torch.backends.cuda.enable_cudnn_sdp(False)
    base, plans = load(args, dtype)
    base = base.to(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    elem = torch.finfo(dtype).bits // 8
    vocab = base.config.vocab_size
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else args.device, "torch": torch.__version__, "dtype": args.dtype_name, "weight_bytes": weight_bytes,
              "rows": []}
    for label, plan in plans:
        chai = build_chai(base, plan).to(args.device)
        for batch in args.batch:
            for context in args.contexts:
                caches = [prefill(m, batch, context, args.chunk, args.device, vocab) for m in (base, chai)]
                held = [kv_cache_bytes(c)["total_bytes"] for c in caches]
                planned = sum(k + v for k, v in plan.cache_bytes(batch * context, elem, batch=batch))
                t = step_times([base, chai], caches, batch, args.iters, args.device)
                med = [statistics.median(x) * 1e3 for x in t]
                row = {"plan": label, "batch": batch, "context": context, "original_ms": round(med[0], 4),
                       "plan_ms": round(med[1], 4), "ratio": round(med[0] / med[1], 3),
                       "kv_bytes_original": held[0], "kv_bytes_plan": held[1], "kv_bytes_plan_predicted": planned,
                       "kv_saving": round(1 - held[1] / held[0], 4),
                       "bytes_model_ratio": round((weight_bytes + held[0]) / (weight_bytes + held[1]), 3),
                       "original_all_ms": [round(x * 1e3, 4) for x in t[0]],
                       "plan_all_ms": [round(x * 1e3, 4) for x in t[1]]}
                if args.profile:
                    row["profile"] = {name: host_profile(m, c, batch, args.profile, args.device)
                                      for name, m, c in zip(("original", "plan"), (base, chai), caches, strict=True)}
                    for name, prof in row["profile"].items():
                        _log(f"  {name}: {prof['host_ms_per_step']} ms host, {prof['ops_per_step']} ops a step; top: "
                             + ", ".join(f"{o['op']} {o['self_host_ms_per_step']}" for o in prof["top"][:6]))
                result["rows"].append(row)
                _log(f"{label} B={batch} C={context}: {med[0]:.3f} ms vs {med[1]:.3f} ms ({row['ratio']}x; "
                     f"bytes model {row['bytes_model_ratio']}x; KV {held[1]:,} of {held[0]:,}, planned {planned:,})")
                del caches
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        del chai
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'plan':>24} {'B':>3} {'context':>7} {'original ms':>11} {'plan ms':>8} {'ratio':>6} {'bytes model':>11} "
          f"{'KV saved':>8}")
    for r in result["rows"]:
        print(f"{r['plan']:>24} {r['batch']:>3} {r['context']:>7} {r['original_ms']:>11.3f} {r['plan_ms']:>8.3f} "
              f"{r['ratio']:>6.3f} {r['bytes_model_ratio']:>11.3f} {100 * r['kv_saving']:>7.1f}%")


if __name__ == "__main__":
    main()
