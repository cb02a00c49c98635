"""Decode speed and cache size of one model's exports in onnxruntime-genai, Optimum and chai-compile's own loop.

    python benchmarks/bench_runtimes.py WORKDIR NAME OUT.json [--new 128] [--repeats 3]

WORKDIR is tests/runtimes/make_artifacts.py output (NAME-original, NAME-chai, NAME-chai-genai). Runs in the
runtimes environment (tests/runtimes/requirements.txt). Greedy, batch 1, CPU; best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def genai_run(path: Path, ids: list[int], new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def timed(fn, repeats: int) -> tuple[float, list[int]]:
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cache_bytes_per_token(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    total = 0
    for i in graph.input:
        if i.name.startswith("past_key_values."):
            d = i.type.tensor_type.shape.dim
            total += d[1].dim_value * d[3].dim_value * 4
    return total


def main() -> None:
    from chai_compile.export.ort_runner import OrtDecoder
    from chai_compile.runtime import CHAIModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("name")
    ap.add_argument("out", type=Path)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ids = json.loads((a.work / "references.json").read_text())[a.name]["prompt_ids"][0]
    d = {k: a.work / f"{a.name}-{k}" for k in ("original", "chai", "chai-genai")}
    rows = {}

    def optimum(path: Path):
        model = CHAIModelForCausalLM.from_pretrained(path)
        x = torch.tensor([ids])
        return lambda: model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=a.new,
                                      min_new_tokens=a.new, do_sample=False)[0, len(ids):].tolist()

    runs = {
        "genai original": (d["original"], lambda: genai_run(d["original"], ids, a.new)),
        "genai CHAI (genai-pack)": (d["chai-genai"], lambda: genai_run(d["chai-genai"], ids, a.new)),
        "optimum original": (d["original"], optimum(d["original"])),
        "optimum CHAI (CHAIModelForCausalLM)": (d["chai"], optimum(d["chai"])),
        "chai-compile OrtDecoder original": (d["original"], lambda: OrtDecoder(d["original"]).greedy(
            np.array([ids]), a.new)[0].tolist()),
        "chai-compile OrtDecoder CHAI": (d["chai"], lambda: OrtDecoder(d["chai"]).greedy(
            np.array([ids]), a.new)[0].tolist()),
    }
    for label, (path, fn) in runs.items():
        seconds, tokens = timed(fn, a.repeats)
        rows[label] = {"seconds": round(seconds, 3), "ms_per_token": round(1000 * seconds / a.new, 2),
                       "cache_bytes_per_token": cache_bytes_per_token(path), "tokens": tokens}
        print(f"{label:40s} {rows[label]['ms_per_token']:8.2f} ms/token  cache {rows[label]['cache_bytes_per_token']}"
              " B/token", flush=True)
    ref = rows["chai-compile OrtDecoder CHAI"]["tokens"]
    for r in rows.values():
        r["tokens_equal_ortdecoder_chai"] = r["tokens"] == ref
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.name, "prompt_tokens": len(ids), "new_tokens": a.new,
                                 "repeats": a.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
