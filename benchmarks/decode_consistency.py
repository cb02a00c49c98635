"""Cached decode of the CHAI rewrite against its own full forward, on the installed transformers.

    python benchmarks/decode_consistency.py --out docs/results/compat/decode_consistency.json

For stories260K (a mapping profiled here on the built-in calibration text) and SmolLM2-135M (the kv20
mapping in docs/results/smollm2): max |logit difference| of a prefill split at three points and of
token-by-token decode against the cache-free full forward, for the original and the CHAI model, and
the measured cache bytes against the mapping's prediction.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
import transformers

from chai_compile.loading import load_model
from chai_compile.mapping import ClusterMapping
from chai_compile.profile import ProfileOptions, profile_model
from chai_compile.rewrite import apply_mapping, kv_cache_bytes
from chai_compile.verify.measure import decode_differences

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her"


def eager(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")  # the math the rewritten layers run
    return m


def run(name: str, spec: str, mapping: ClusterMapping | None) -> dict:
    loaded = load_model(spec)
    if mapping is None:
        _, mapping = profile_model(loaded, ProfileOptions(samples=8, seq_len=64, batch_size=8), progress=False)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    splits = (1, ids.shape[1] // 2, ids.shape[1] - 1)
    original, _ = decode_differences(eager(loaded.model), ids, splits)
    chai, cache = decode_differences(apply_mapping(eager(loaded.model), mapping), ids, splits)
    measured = [[p["key_bytes"], p["value_bytes"]] for p in kv_cache_bytes(cache)["per_layer"]]
    predicted = [list(p) for p in mapping.cache_bytes(ids.numel(), elem_bytes=4)]
    return {"model": name, "tokens": ids.shape[1], "mapping": mapping.summary(), "original": original, "chai": chai,
            "cache_bytes_measured": sum(map(sum, measured)), "cache_bytes_predicted": sum(map(sum, predicted)),
            "cache_equals_prediction": measured == predicted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run("stories260K", str(REPO.parent / "shared/data/models/stories260K"), None),
            run("smollm2-135m", "smollm2-135m", ClusterMapping.read(REPO / "docs/results/smollm2/kv20.json"))]
    res = {"transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "command": "python benchmarks/decode_consistency.py --out " + str(args.out), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"transformers {transformers.__version__}")
    print("| model | K heads kept | original max diff | CHAI max diff | cache bytes = prediction |")
    for r in rows:
        print(f"| {r['model']} | {r['mapping']['k_heads_kept']}/{r['mapping']['k_heads_total']} | "
              f"{max(r['original'].values()):.2e} | {max(r['chai'].values()):.2e} | {r['cache_equals_prediction']} |")


if __name__ == "__main__":
    main()
