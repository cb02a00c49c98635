"""chai-compile's span plans against NVIDIA kvpress's presses on the passkey task, at equal KV saving (issue 19).

    python benchmarks/kvpress_side_by_side.py smollm2-135m --plans /tmp/i19/span38/plan.json \
        --streaming-saving match --lengths 1k,2k,4k --per-length 5 \
        --kvpress-python /work/venv-kvp/bin/python --out docs/results/spans/kvpress

Two environments, on purpose: kvpress 0.5.5 requires transformers<5.3 and chai-compile requires
transformers>=5.17,<5.25, so kvpress lives in its own virtual environment (`--kvpress-python`; see
docs/long-context.md for how it was made). This script runs in chai-compile's environment. It
1. builds the passkey items and prompts with chai-compile's generator (chai_compile/verify/passkey.py) and
   scores the original and every plan through the rewrite (verify's compare_loaded: greedy exact match),
2. measures each plan's KV saving at every length (cache bytes after a prefill of that many tokens, checked
   against the plan's prediction, as verify's --kv-context does),
3. writes a job JSON with the same token ids, split into context / question / answer, and the compression
   ratios: per length each plan's measured saving there (equal KV saving), plus the fixed `--ratios`,
4. runs benchmarks/kvpress_runner.py with the kvpress python (it imports no chai_compile) and reads back
   per item hit or miss and the cache tokens kvpress really kept, and
5. writes kvpress_side_by_side.json, kvpress_side_by_side.md and passkey_vs_length.png under --out.

What kvpress compresses: the context prefill only (the prompt up to "\\n\\nWhat is the pass key?..."), after
each layer attended to all of it; the question and the answer then run uncompressed on the pruned cache. A
span plan instead bounds its span heads at every position, prefill included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("kvpress_runner.py")
PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress", "KnormPress")


def _log(msg: str) -> None:
    print(f"kvpress_side_by_side: {msg}", file=sys.stderr, flush=True)


def per_length_items(items: Sequence[Any], lengths: Sequence[int], per_length: int) -> list[Any]:
    """The first `per_length` items of every length, in the generator's (sample-major) order: 5 per length is
    every key depth once, 10 twice."""
    taken = dict.fromkeys(lengths, 0)
    out = []
    for it in items:
        if taken.get(it.length, per_length) < per_length:
            taken[it.length] += 1
            out.append(it)
    short = [n for n, k in taken.items() if k < per_length]
    if short:
        raise ValueError(f"fewer than {per_length} passkey items at lengths {short}")
    return out


def score_point(loaded: Any, prepared: Any, plan: Any, label: str, lengths: Sequence[int],
                original_kv: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Passkey hits (per item) of the original or one plan through the rewrite, and the KV bytes it holds after
    a prefill of each length (a plan's checked against its prediction, with the saving against the original)."""
    from chai_compile.verify.compare import build_chai
    from chai_compile.verify.long_context import context_savings, kv_at_contexts
    from chai_compile.verify.scoring import score

    model = loaded.model if plan is None else build_chai(loaded.model, plan)
    r = score(model, prepared, loaded.tokenizer, batch_size=1, label=label)
    _log(f"passkey [{label}] acc {r['acc']:.3f} (n={r['n']}, {r['wall_s']:.1f} s)")
    kv = kv_at_contexts(model, lengths, plan, log=_log)
    if original_kv is not None:
        kv = context_savings(original_kv, kv)
    return {"label": label, "tasks": {"passkey": r}, "kv_context": kv}


def check_kvpress_python(path: str) -> str | None:
    """None when `path` is an executable python that imports kvpress, else the one-line reason."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"no kvpress python at {path} (create its venv as docs/long-context.md 'kvpress side by side' says)"
    r = subprocess.run([path, "-c", "import kvpress"], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{path} cannot import kvpress: {last}"
    return None


def split_question(context_ids: Sequence[int], head_ids: Sequence[int]) -> int:
    """Where the question starts in a prompt's token ids: the end of the longest common prefix with the
    tokens of the prompt text before the question (a merge across the boundary moves the split by a token,
    never changes the ids; context + question is always exactly the ids chai-compile scored)."""
    k = 0
    for a, b in zip(context_ids, head_ids, strict=False):
        if a != b:
            break
        k += 1
    if k == 0 or k >= len(context_ids):
        raise ValueError(f"cannot split the question off a prompt of {len(context_ids)} tokens (common prefix {k})")
    return k


def equal_saving_ratios(kv_context: Sequence[dict[str, Any]]) -> dict[str, float]:
    """{length: compression ratio} from a plan's measured kv_context rows: the fraction of the cache it saves
    at that length, which is what kvpress's compression_ratio removes from the context's cache. Rounded down
    to 1e-4 so kvpress is never asked to save more than the plan did; clamped to kvpress's [0, 1)."""
    out = {}
    for row in kv_context:
        saving = row["saving_pct"] / 100.0
        out[str(row["context"])] = min(max(math.floor(saving * 1e4) / 1e4, 0.0), 0.9999)
    return out


def predicted_saving(plan: Any, tokens: int) -> float:
    """The fraction of the dense cache a plan saves after `tokens` tokens, from its own prediction (the same
    numbers check_cache_prediction holds the measured cache to)."""
    m = plan.model
    dense = 2 * m.num_layers * m.num_kv_heads * m.head_dim * tokens
    return 1.0 - sum(k + v for k, v in plan.cache_bytes(tokens, 1)) / dense


def kvpress_runs(presses: Sequence[str], equal: Sequence[tuple[str, dict[str, float]]],
                 ratios: Sequence[float]) -> list[dict[str, Any]]:
    """The runner's runs: the uncompressed control, every press at each plan's saving per length (equal:
    (plan label, {length: ratio}) pairs), and every press at each fixed ratio."""
    runs: list[dict[str, Any]] = [{"label": "kvpress: no press (control)", "press": "none", "ratio": 0.0}]
    for p in presses:
        runs += [{"label": f"{p} @ saving of {label}", "press": p, "ratios": r} for label, r in equal]
        runs += [{"label": f"{p} @ {r:g}", "press": p, "ratio": r} for r in ratios]
    return runs


def kvpress_job(model_dir: str, requests: Sequence[Any], lengths: Sequence[int], heads: Sequence[Sequence[int]],
                runs: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """The JSON handed to kvpress_runner.py: per item the chai-compile token ids split into context,
    question and answer, and the runs."""
    items = []
    for req, n, head in zip(requests, lengths, heads, strict=True):
        k = split_question(req.context, head)
        items.append({"length": n, "context_ids": list(req.context[:k]), "question_ids": list(req.context[k:]),
                      "answer_ids": list(req.continuation)})
    return {"model_dir": model_dir, "items": items, "runs": runs, "threads": threads}


def reusable_rows(raw: dict[str, Any], items: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """[memo key, row] for every result an earlier runner computed itself (not reused), keyed as
    kvpress_runner.memo_key does, after checking that item i has the same length and context size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kvpress_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(runner)  # type: ignore[union-attr]
    out = []
    for run in raw["runs"]:
        for i, row in enumerate(run["items"]):
            if row.get("reused") or "ratio_run" not in row:
                continue
            if (row["length"], row["context_tokens"]) != (items[i]["length"], len(items[i]["context_ids"])):
                raise ValueError(f"--reuse: item {i} differs from the earlier run's")
            key = runner.memo_key(run["press"], row["ratio_run"], run.get("kwargs", {}), i, row["context_tokens"])
            clean = {k: v for k, v in row.items() if k not in ("length", "ratio")}
            out.append([list(key), clean])
    return out


def kvpress_summary(run: dict[str, Any], lengths: Sequence[int]) -> dict[str, Any]:
    """Keys found per length and the cache kvpress really kept: the saving after the context (pruned tokens /
    context tokens) and once the question is in (what the answer is decoded from)."""
    by = {}
    for n in lengths:
        rows = [r for r in run["items"] if r["length"] == n]
        if not rows:
            continue
        ctx = sum(r["context_tokens"] for r in rows)
        kept_c = sum(sum(r["kept_after_context"]) / len(r["kept_after_context"]) for r in rows)
        full_q = sum(r["context_tokens"] + r["kept_after_question"][0] - r["kept_after_context"][0] for r in rows)
        kept_q = sum(sum(r["kept_after_question"]) / len(r["kept_after_question"]) for r in rows)
        by[str(n)] = {"hits": sum(r["hit"] for r in rows), "n": len(rows),
                      "acc": sum(r["hit"] for r in rows) / len(rows),
                      "ratio": rows[0]["ratio"],
                      "saving_context_pct": round(100 * (1 - kept_c / ctx), 2),
                      "saving_at_question_pct": round(100 * (1 - kept_q / full_q), 2),
                      "shared_items": sum(bool(r.get("reused")) for r in rows)}
    return by


def chai_summary(tasks: dict[str, Any], item_lengths: Sequence[int], kv_context: Sequence[dict[str, Any]] | None,
                 lengths: Sequence[int]) -> dict[str, Any]:
    """Keys found per length from verify's per-item predictions, with the measured saving at that length."""
    preds = tasks["passkey"]["predictions"]
    saving = {str(r["context"]): r.get("saving_pct", 0.0) for r in (kv_context or [])}
    by = {}
    for n in lengths:
        sel = [p for p, m in zip(preds, item_lengths, strict=True) if m == n]
        if sel:
            by[str(n)] = {"hits": sum(sel), "n": len(sel), "acc": sum(sel) / len(sel),
                          "saving_pct": saving.get(str(n), 0.0)}
    return by


def markdown(result: dict[str, Any]) -> str:
    lengths = [str(n) for n in result["lengths"]]
    head = ["method", "side"] + [f"{n}: saving" for n in lengths] + [f"{n}: keys" for n in lengths]
    lines = [f"# Passkey: chai-compile vs kvpress on {result['model']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["table"]:
        cells = [row["method"], row["side"]]
        cells += [f"{row['by_length'][n]['saving']:.1f}%" if n in row["by_length"] else "-" for n in lengths]
        cells += [f"{row['by_length'][n]['hits']}/{row['by_length'][n]['n']}" if n in row["by_length"] else "-"
                  for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    v = result["kvpress_versions"]
    lines += ["", "Saving: chai-compile rows, the KV-cache bytes saved after a prefill of that many tokens (measured); "
              "kvpress rows, the cache tokens pruned once the question is in (measured from the cache kvpress "
              "kept; the press's ratio applies to the context only). A kvpress item that asks for the same press "
              "and kept count (to one token) as one already run shares its result (`reused` in the JSON; ratio 0 "
              f"is the control). kvpress {v.get('kvpress')}, transformers "
              f"{v.get('transformers')}, torch {v.get('torch')}; chai-compile side: transformers "
              f"{result['chai_versions']['transformers']}, torch {result['chai_versions']['torch']}.",
              "Control: kvpress's uncompressed path finds the same keys as chai-compile's original on every item: "
              + ("yes." if result["control_matches_original"] else f"NO (items {result['control_mismatches']})."),
              f"Wall time: chai-compile side {result['wall_s']['chai']:.0f} s, kvpress side "
              f"{result['wall_s']['kvpress']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from chai_compile.verify.report import _figure

    fig = _figure(11.0, 4.6)
    ax = fig.subplots()
    lengths = result["lengths"]
    for row in result["table"]:
        xs = [n for n in lengths if str(n) in row["by_length"]]
        ys = [row["by_length"][str(n)]["acc"] for n in xs]
        style = "-" if row["side"] == "chai-compile" else ("--" if "saving of" in row["method"] else ":")
        ax.plot(xs, ys, style, marker="o", label=f"{row['side']}: {row['method']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy (greedy exact match)")
    ax.set_title(f"{Path(result['model']).name}: passkey, chai-compile plans vs kvpress presses", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: lines overlap at 0 and 1
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--plans", nargs="*", default=[], help="Plan files; kvpress runs at each one's measured saving.")
    ap.add_argument("--streaming-saving", default=None,
                    help="Add the in-project StreamingLLM plan saving this fraction at the longest length, "
                         "or 'match' for the first plan's measured saving there.")
    ap.add_argument("--sinks", type=int, default=4, help="Sink tokens of the in-project StreamingLLM plan.")
    ap.add_argument("--lengths", default="1k,2k,4k")
    ap.add_argument("--per-length", type=int, default=5, help="Passkey items per length (5 = every depth once).")
    ap.add_argument("--ratios", default="0.4", help="Fixed kvpress compression ratios, comma list ('' for none).")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--kvpress-python", required=True, help="python of the venv that has kvpress installed.")
    ap.add_argument("--hf-dir", default=None,
                    help="Hugging Face folder kvpress loads (default: the folder chai-compile loaded).")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default).")
    ap.add_argument("--reuse", default=None,
                    help="An earlier kvpress_side_by_side.json on the same items: its original, plans of the same "
                         "label and hash, and kvpress results of the same press and kept count are not rerun.")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    problem = check_kvpress_python(args.kvpress_python)
    if problem:  # before any model is loaded: CI and machines without kvpress stop here, in one line
        raise SystemExit(f"kvpress_side_by_side: {problem}")

    import torch
    import transformers

    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from chai_compile.loading import load_model
    from chai_compile.verify.baselines import streaming_plan, streaming_window
    from chai_compile.verify.passkey import QUESTION, build_prompts, parse_lengths
    from chai_compile.verify.report import dumps
    from chai_compile.verify.scoring import _encode, prepare
    from chai_compile.verify.sweep import collect_mappings
    from chai_compile.verify.tasks import load_task

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = parse_lengths(args.lengths, "--lengths")
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    loaded = load_model(args.model)
    model_dir = args.hf_dir or str(loaded.model.name_or_path)
    task = load_task("passkey", passkey_lengths=lengths)
    task = dataclasses.replace(task, items=per_length_items(task.items, lengths, args.per_length))

    t0 = time.perf_counter()
    plans = collect_mappings(args.plans) if args.plans else []
    n_given = len(plans)
    if args.streaming_saving is not None:
        longest = max(lengths)
        if args.streaming_saving == "match":
            if not plans:
                raise SystemExit("kvpress_side_by_side: --streaming-saving match needs a plan")
            saving = predicted_saving(plans[0][1], longest)
        else:
            saving = float(args.streaming_saving)
        window = streaming_window(longest, saving, args.sinks)
        splan = streaming_plan(model_info(adapter_for(loaded.model)), args.sinks, window)
        splan.write(out / "streaming.json")
        plans.append((f"StreamingLLM plan (s{args.sinks}, w{window})", splan))
    prepared = prepare(task, loaded.tokenizer, loaded.model)
    prev = json.loads(Path(args.reuse).read_text()) if args.reuse else None
    if prev is not None and (prev["model"], prev["lengths"], prev["per_length"]) != (args.model, list(lengths),
                                                                                     args.per_length):
        raise SystemExit(f"kvpress_side_by_side: --reuse {args.reuse} scored other items (model, lengths or "
                         "per-length differ)")
    if prev is not None:  # the same generator, model and selection: the same items, already scored
        _log(f"reusing the original and the plans of the same label and plan hash from {args.reuse}")
        result: dict[str, Any] = {"original": prev["chai"]["original"], "points": []}
    else:
        result = {"original": score_point(loaded, prepared, None, "original", lengths, None), "points": []}
    old_points = {(p["label"], p.get("plan_sha256")): p for p in (prev["chai"]["points"] if prev else [])}
    for label, plan in plans:
        point = old_points.get((label, plan.plan_sha256()))
        if point is None:
            point = score_point(loaded, prepared, plan, label, lengths, result["original"]["kv_context"])
            point["plan_sha256"] = plan.plan_sha256()
        result["points"].append(point)
    chai_s = time.perf_counter() - t0

    pairs, facts = build_prompts(prepared.items, loaded.tokenizer, prepared.meta["max_length"], True)
    heads = [_encode(loaded.tokenizer, prompt[: -len(QUESTION)]) for prompt, _ in pairs]
    item_lengths = facts["_item_lengths"]
    # every given plan sets one equal-saving run per press (the in-project StreamingLLM plan, added last,
    # matches the first plan's saving at the longest length and has no kvpress run of its own)
    equal = [(label, equal_saving_ratios(p["kv_context"]))
             for (label, _), p in zip(plans[:n_given], result["points"], strict=True)]
    runs = kvpress_runs(presses, equal, ratios)
    job = kvpress_job(model_dir, prepared.requests, item_lengths, heads, runs, args.threads)
    if prev is not None:
        job["reuse"] = reusable_rows(prev["kvpress_raw"], job["items"])
        _log(f"{len(job['reuse'])} kvpress results reused from {args.reuse}")
    (out / "kvpress_job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    _log(f"running {len(runs)} kvpress runs x {len(job['items'])} items with {args.kvpress_python}")
    r = subprocess.run([args.kvpress_python, str(RUNNER), str(out / "kvpress_job.json"),
                        str(out / "kvpress_raw.json")])
    if r.returncode != 0:
        raise SystemExit(f"kvpress_side_by_side: kvpress_runner.py failed (exit {r.returncode}); see its output above")
    kv_s = time.perf_counter() - t0
    raw = json.loads((out / "kvpress_raw.json").read_text())
    (out / "kvpress_job.json").unlink()  # token ids only; rebuilt by the next run

    table = [{"method": "original", "side": "chai-compile",
              "by_length": chai_summary(result["original"]["tasks"], item_lengths, None, lengths)}]
    table += [{"method": p["label"], "side": "chai-compile",
               "by_length": chai_summary(p["tasks"], item_lengths, p["kv_context"], lengths)} for p in result["points"]]
    for row in table:
        for v in row["by_length"].values():
            v["saving"] = v["saving_pct"]
    for run in raw["runs"]:
        by = kvpress_summary(run, lengths)
        for v in by.values():
            v["saving"] = v["saving_at_question_pct"]
        table.append({"method": run["label"], "side": "kvpress", "by_length": by})
    control = next(row for row in table if row["side"] == "kvpress" and "control" in row["method"])
    orig_preds = result["original"]["tasks"]["passkey"]["predictions"]
    ctrl_preds = [int(x["hit"]) for x in raw["runs"][0]["items"]]
    out_result = {
        "model": args.model, "lengths": list(lengths), "per_length": args.per_length,
        "settings": {k: v for k, v in vars(args).items()},
        "chai_versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "kvpress_versions": raw["versions"],
        "what_is_compressed": "kvpress: the context prefill only (prompt up to the question), after each layer "
                              "attended to all of it; question and answer run on the pruned cache. chai-compile "
                              "span heads: bounded at every position, prefill included.",
        "control_matches_original": ctrl_preds == orig_preds,
        "control_mismatches": [i for i, (a, b) in enumerate(zip(orig_preds, ctrl_preds, strict=True)) if a != b],
        "table": table, "chai": result, "kvpress_raw": raw,
        "wall_s": {"chai": round(chai_s, 1), "kvpress": round(kv_s, 1)},
    }
    if not out_result["control_matches_original"]:
        _log(f"WARNING: the kvpress control differs from chai-compile's original on items "
             f"{out_result['control_mismatches']} ({control['by_length']})")
    (out / "kvpress_side_by_side.json").write_text(dumps(out_result))
    (out / "kvpress_side_by_side.md").write_text(markdown(out_result))
    plot(out_result, out / "passkey_vs_length.png")
    _log(f"wrote {out}/kvpress_side_by_side.json, .md, passkey_vs_length.png")
    print(markdown(out_result))


if __name__ == "__main__":
    main()
