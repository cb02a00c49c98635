"""KV-cache bytes after an N-token generation: original model vs the CHAI rewrite (measured from the cache's tensors).

    python benchmarks/bench_cache_bytes.py --model smollm2-135m --mapping /tmp/smol_prof/mapping.json \
        --new-tokens 1024 --out results/cache_bytes.json

Without --mapping the identity mapping is used (no saving; a sanity check of the measurement).
Generation is greedy with EOS suppressed (min_new_tokens), so both runs hold exactly prompt + N tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from chai_compile.adapters import adapter_for
from chai_compile.compat import output_cache
from chai_compile.fingerprint import model_info
from chai_compile.loading import load_model
from chai_compile.mapping import ClusterMapping
from chai_compile.rewrite import apply_mapping, kv_cache_bytes

PROMPT = "Once upon a time, in a small village by the sea, there lived"


@torch.no_grad()
def generate_cache(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[dict, float, int]:
    t0 = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=model.config.eos_token_id)
    seconds = time.perf_counter() - t0
    return kv_cache_bytes(output_cache(out)), seconds, out.sequences.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mapping", help="mapping.json from `chai-compile profile` (default: identity)")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args()

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = loaded.model
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids.to(args.device)
    mapping = ClusterMapping.read(args.mapping) if args.mapping else ClusterMapping.identity(
        model_info(adapter_for(model)))

    orig_bytes, orig_s, length = generate_cache(model, ids, args.new_tokens)
    apply_mapping(model, mapping)  # in place: the original is measured first
    chai_bytes, chai_s, chai_length = generate_cache(model, ids, args.new_tokens)

    summary = mapping.summary()
    result = {
        "model": args.model,
        "mapping": str(args.mapping) if args.mapping else "identity",
        "dtype": args.dtype,
        "device": args.device,
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "cached_tokens": length - 1,  # the last generated token is never fed back, so never cached
        "original": {k: orig_bytes[k] for k in ("key_bytes", "value_bytes", "total_bytes")},
        "chai": {k: chai_bytes[k] for k in ("key_bytes", "value_bytes", "total_bytes")},
        "saving": {
            "key": 1.0 - chai_bytes["key_bytes"] / orig_bytes["key_bytes"],
            "total": 1.0 - chai_bytes["total_bytes"] / orig_bytes["total_bytes"],
        },
        "predicted_kv_saving_from_mapping": summary["kv_cache_saving"],
        "per_layer_key_heads": [p["key_shape"][1] for p in chai_bytes["per_layer"]],
        "per_layer_value_heads": [p["value_shape"][1] for p in chai_bytes["per_layer"]],
        "seconds": {"original": orig_s, "chai": chai_s},
        "lengths_equal": length == chai_length,
        "host": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    o, c = result["original"]["total_bytes"], result["chai"]["total_bytes"]
    print(f"{args.model}: {result['cached_tokens']} cached tokens, KV cache {o / 2**20:.2f} MiB -> {c / 2**20:.2f} MiB "
          f"({100 * result['saving']['total']:.1f}% saved; K {100 * result['saving']['key']:.1f}%); "
          f"mapping predicts {100 * summary['kv_cache_saving']:.1f}%")


if __name__ == "__main__":
    main()
