"""A LLaMA-70B-shaped model with random weights, built straight on the GPUs, profiled and planned through
accelerate's device map: wall time per stage and peak memory per GPU, as JSON.

The model is created on the `meta` device (no memory), accelerate places its layers under --max-memory,
and each parameter is then drawn at random directly on the device that holds it: no full host copy. Layers
placed on the CPU (a budget smaller than the model) are drawn there and offloaded, loaded per forward.

    # one H200 (139 GiB): 16 of the 80 layers, ~28 GiB in bf16
    python benchmarks/bench_device_map.py --layers 16 --out docs/results/device_map/h200_16layers.json
    # the same model under a 10 GiB GPU budget: the rest offloaded to the CPU
    python benchmarks/bench_device_map.py --layers 16 --max-memory 0=10GiB,cpu=100GiB --out ...
    # CPU smoke test of the script itself: --tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
             "num_hidden_layers": 80, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_hidden_layers": 4, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 10000.0}


class ByteTokenizer:
    """Offline stand-in tokenizer (UTF-8 bytes + 3): the weights are random, so any token stream will do."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b + 3 for b in text.encode()]}


def build(shape: dict[str, Any], layers: int, dtype: Any, max_memory: dict | None) -> tuple[Any, dict, float]:
    """Meta init, device map, random weights drawn where each parameter lives, accelerate hooks."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False)
    with init_empty_weights():  # parameters on `meta`; buffers (rotary frequencies) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"],
                                       dtype=dtype)
    if "disk" in device_map.values():
        sys.exit("chai-compile: error: the model does not fit --max-memory (disk offload is not benchmarked); "
                 "fix: raise the cpu budget or lower --layers")
    gen_seed = 0
    for name, p in list(model.named_parameters()):
        where = next(v for k, v in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                     if k == "" or name == k or name.startswith(k + "."))
        dev = torch.device("cuda", where) if isinstance(where, int) else torch.device("cpu")
        value = torch.empty(p.shape, dtype=dtype, device=dev)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        else:
            torch.manual_seed(gen_seed)
            value.normal_(0.0, 0.02)
        gen_seed += 1
        set_module_tensor_to_device(model, name, dev, value=value)
    gpus = sorted({v for v in device_map.values() if isinstance(v, int)})
    model = dispatch_model(model, device_map, main_device=gpus[0] if gpus else "cpu")
    model.eval()
    return model, device_map, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="Decoder layers (80 in LLaMA-70B; 16 fit one H200).")
    ap.add_argument("--max-memory", default=None, help="Per-device budget, e.g. 0=40GiB,cpu=100GiB.")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--kv-target", type=float, default=0.05, help="Plan budget (small: a few greedy rounds).")
    ap.add_argument("--tiny", action="store_true", help="Tiny shape on the CPU: checks the script, measures nothing.")
    ap.add_argument("--out", required=True, help="JSON file to write.")
    args = ap.parse_args()

    try:
        import accelerate
    except ImportError:
        sys.exit("chai-compile: error: accelerate is not importable; fix: pip install accelerate")
    import torch
    import transformers

    print(f"accelerate {accelerate.__version__} importable; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, GPUs: {torch.cuda.device_count()}", flush=True)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("chai-compile: error: no CUDA GPU is visible; fix: run on a GPU machine, or pass --tiny")

    from chai_compile.device_map import peak_memory_mb, placement, reset_peaks
    from chai_compile.loading import LoadedModel
    from chai_compile.placement_options import parse_max_memory
    from chai_compile.plan.options import PlanOptions
    from chai_compile.plan.planner import plan_model
    from chai_compile.profile.measure import ProfileOptions, profile_model

    shape = TINY if args.tiny else LLAMA_70B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is None:
        max_memory = {"cpu": 8 * 2**30} if args.tiny else {i: torch.cuda.mem_get_info(i)[0] - 8 * 2**30
                                                             for i in range(torch.cuda.device_count())}
    model, device_map, build_s = build(shape, args.layers, dtype, max_memory)
    print(f"built {args.layers} layers in {build_s:.1f} s: {placement(model)}", flush=True)
    loaded = LoadedModel(model, ByteTokenizer(), "llama-70b-shaped-random")
    result: dict[str, Any] = {
        "model": {"shape": shape, "layers": args.layers, "dtype": str(dtype).removeprefix("torch."),
                  "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)},
        "max_memory": {str(k): v for k, v in max_memory.items()}, "placement": placement(model),
        "build_s": round(build_s, 2), "peak_mb_after_build": peak_memory_mb(),
        "machine": {"platform": platform.platform(), "gpus": [torch.cuda.get_device_name(i) for i in
                                                                range(torch.cuda.device_count())]},
    }
    reset_peaks()
    t0 = time.perf_counter()
    popts = ProfileOptions(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    data, mapping = profile_model(loaded, popts, progress=True)
    result["profile"] = {"wall_s": round(time.perf_counter() - t0, 2), "timings": data.timings,
                         "peak_mb": peak_memory_mb(), "clusters_per_layer": [lm.num_clusters for lm in mapping.layers]}
    print(f"profile: {result['profile']['wall_s']} s, peak {result['profile']['peak_mb']}", flush=True)
    reset_peaks()
    t0 = time.perf_counter()
    plan = plan_model(loaded, PlanOptions(kv_target=args.kv_target, samples=2, refit_samples=4, seq_len=args.seq_len,
                                          batch_size=2, query_steps=20), progress=True)
    r = plan.report
    result["plan"] = {"wall_s": round(time.perf_counter() - t0, 2), "peak_mb": peak_memory_mb(),
                      "k_heads_dropped": r["k_heads_dropped"], "kv_cache_saving": r["kv_cache_saving"],
                      "stages": r["stages"], "original": r["original"]}
    print(f"plan: {result['plan']['wall_s']} s, peak {result['plan']['peak_mb']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
