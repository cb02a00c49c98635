"""kvpress side of the side-by-side passkey benchmark (issue 19): runs in kvpress's OWN environment.

    /work/venv-kvp/bin/python benchmarks/kvpress_runner.py job.json result.json

Why a separate script and environment: kvpress 0.5.5 (PyPI) requires transformers<5.3, chai-compile requires
transformers>=5.17,<5.25, so the two cannot share one virtual environment. This script imports no
chai_compile; `benchmarks/kvpress_side_by_side.py` (chai-compile's environment) writes the job JSON with the
token ids chai-compile's own passkey generator built, calls this script through subprocess and reads the
result JSON back. Both sides therefore score exactly the same token ids.

What is compressed, exactly as kvpress's `KVPressTextGenerationPipeline._forward` does: the CONTEXT (the
prompt up to the question, i.e. instructions, filler, key sentence, filler) is prefilled with the press's
hooks on (`with press(model): model.model(context_ids, past_key_values=cache)`); every layer attends to
the whole context during that prefill and its cache is pruned after the layer ran. The question
("\\n\\nWhat is the pass key? The pass key is") is then fed uncompressed at positions context_length + i,
and the answer is greedily decoded token by token on that cache (`generate_answer`, logits_to_keep=1). We
replicate those few lines instead of calling the pipeline because its preprocess re-tokenises text (and
wraps it in SmolLM2's chat template), which would change the token ids. Scoring: the first len(answer)
greedy tokens equal the answer's token ids (the same criterion as chai-compile's teacher-forced argmax).

Job JSON: {"model_dir", "items": [{"length", "context_ids", "question_ids", "answer_ids"}],
"runs": [{"label", "press", "ratio" or "ratios": {length: ratio}, "kwargs"}], "threads", "reuse": [[key, row]]}.
Result JSON: per run, per item: hit, context tokens, cache tokens kept per layer after the context and after
the question, wall time; plus the versions used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _press(name: str, ratio: float, kwargs: dict[str, Any]) -> Any:
    import kvpress

    if name == "none":
        return None
    return getattr(kvpress, name)(compression_ratio=ratio, **kwargs)


def n_kept(context_tokens: int, ratio: float) -> int:
    """Tokens a scorer press keeps per KV head: kvpress 0.5.5's utils.compute_n_kept (copied so the tests
    run without kvpress; run_item checks it against the cache kvpress really kept)."""
    return 0 if ratio >= 1.0 else max(1, int(context_tokens * (1 - ratio)))


def memo_key(press: str, ratio: float, kwargs: dict[str, Any], item: int,
             context_tokens: int) -> tuple[str, int, str, int]:
    """Runs that compress the same item to the same kept count with the same press share one result: the
    five scorer presses used here depend on the ratio only through that count (StreamingLLMPress's pruned
    span is context - kept too), and ratio 0 returns the cache untouched (ScorerPress.compress), i.e. the
    uncompressed control. So e.g. ratio 0.4 and 0.4001 at 4096 tokens, which keep the same count, run once."""
    if ratio == 0.0:
        return ("none", context_tokens, "{}", item)
    return (press, n_kept(context_tokens, ratio), json.dumps(kwargs, sort_keys=True), item)


def near_key(done: dict[tuple[str, int, str, int], Any], key: tuple[str, int, str, int]) -> Any:
    """A run already done for this press and item keeping the same count, or one token more or fewer (e.g.
    the plan's measured saving 0.4001 and the fixed ratio 0.4 at 4096 tokens keep 2447 and 2448 of 4080):
    not worth a second prefill on a 2-core CPU. The reused row records the difference (kept_diff)."""
    if key in done:
        return key
    if key[0] == "none":
        return None
    for d in (-1, 1):
        other = (key[0], key[1] + d, key[2], key[3])
        if other in done:
            return other
    return None


def _kept(cache: Any) -> list[int]:
    """Tokens held per layer (kvpress's scorer presses keep the same count in every KV head of a layer)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def run_item(model: Any, press: Any, context_ids: list[int], question_ids: list[int],
             answer_ids: list[int]) -> dict[str, Any]:
    """kvpress's prefill-compress-then-answer path for one item; greedy tokens compared to the answer."""
    import torch
    from transformers import DynamicCache

    ctx = torch.tensor([context_ids])
    q = torch.tensor([question_ids])
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad():
        if press is not None:
            with press(model):
                model.model(input_ids=ctx, past_key_values=cache)
        else:
            model.model(input_ids=ctx, past_key_values=cache)
        after_context = _kept(cache)
        n = ctx.shape[1]  # positions continue from the uncompressed context length, as in kvpress
        pos = torch.arange(n, n + q.shape[1]).unsqueeze(0)
        out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
        after_question = _kept(cache)
        pos = pos[:, -1:] + 1
        got = [int(out.logits[0, -1].argmax())]
        for i in range(len(answer_ids) - 1):  # greedy, exactly len(answer) tokens: enough to decide the match
            out = model(input_ids=torch.tensor([[got[-1]]]), past_key_values=cache, position_ids=pos + i)
            got.append(int(out.logits[0, -1].argmax()))
    return {"hit": got == list(answer_ids), "generated": got, "context_tokens": n,
            "kept_after_context": after_context, "kept_after_question": after_question,
            "wall_s": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job")
    ap.add_argument("result")
    args = ap.parse_args(argv)
    job = json.loads(Path(args.job).read_text())

    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    runs = []
    # results of an earlier run on the same items (the job's "reuse": [key, row] pairs), then this run's
    done: dict[tuple[str, int, str, int], dict[str, Any]] = {tuple(k): r for k, r in job.get("reuse", [])}
    for run in job["runs"]:
        t0 = time.perf_counter()
        rows = []
        for k, it in enumerate(job["items"]):
            ratio = run["ratios"][str(it["length"])] if "ratios" in run else run.get("ratio", 0.0)
            key = memo_key(run["press"], ratio, run.get("kwargs", {}), k, len(it["context_ids"]))
            near = near_key(done, key)
            if near is not None:  # the same compression of the same item ran already (to one kept token)
                row = {**done[near], "reused": True, "kept_diff": near[1] - key[1]}
            else:
                press = _press(run["press"], ratio, run.get("kwargs", {}))
                row = done[key] = run_item(model, press, it["context_ids"], it["question_ids"], it["answer_ids"])
                row["ratio_run"] = ratio
                if ratio > 0 and set(row["kept_after_context"]) != {key[1]}:
                    raise RuntimeError(f"kvpress kept {sorted(set(row['kept_after_context']))} tokens, "
                                       f"expected {key[1]}: the result sharing assumption does not hold")
            rows.append({"length": it["length"], "ratio": ratio, **row})
            print(f"kvpress_runner: {run['label']} item {k + 1}/{len(job['items'])} @{it['length']} "
                  f"ratio {ratio:.4f}: {'hit' if row['hit'] else 'miss'} ({row['wall_s']:.1f} s"
                  f"{', reused' if row.get('reused') else ''})", file=sys.stderr, flush=True)
        runs.append({"label": run["label"], "press": run["press"], "kwargs": run.get("kwargs", {}),
                     "items": rows, "wall_s": round(time.perf_counter() - t0, 2)})
    versions = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist("kvpress"),
                "transformers": transformers.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0]}
    Path(args.result).write_text(json.dumps({"versions": versions, "runs": runs}, indent=1))


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
