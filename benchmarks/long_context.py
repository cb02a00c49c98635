"""Long-context quality against KV saving: the original against given plans and a StreamingLLM baseline.

    python benchmarks/long_context.py smollm2-135m --plans plan.json --streaming-saving 0.4 \
        --passkey-lengths 1k,2k --limit 20 --ppl-window 4096 --kv-context 4096,8192 \
        --data-dir ../shared/data/eval --out docs/results/long_context/smollm2

    # smoke run (seconds): python benchmarks/long_context.py ../shared/data/models/stories260K \
    #     --passkey-lengths 256,512 --ppl-window 512 --kv-context 256,512 --limit 10 --out /tmp/lc

On the same requests (verify's compare_loaded): passkey retrieval (greedy exact match per context length and
key depth; `--limit` items, sample-major so every cell is covered), WikiText-2 test perplexity in
`--ppl-window` windows (`--limit` windows) and the KV-cache bytes measured after a prefill of each
`--kv-context` length. `--streaming-saving S` adds the StreamingLLM plan (every head: `--sinks` sinks + a
recent window) that saves the fraction S of the cache at the longest passkey length, i.e. the baseline at
equal KV saving. A plan whose layer kinds this build's rewrite refuses is reported as skipped.
Writes long_context.json, long_context.md, passkey.png and streaming.json (the baseline plan) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any


def _log(msg: str) -> None:
    print(f"long_context: {msg}", file=sys.stderr, flush=True)


def _plans(args: argparse.Namespace, loaded, longest: int, out: Path) -> tuple[list, list[dict[str, str]]]:
    """(label, plan) pairs the rewrite can run, and the skipped ones with the reason."""
    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from chai_compile.mapping import UnsupportedLayerKindError
    from chai_compile.verify.baselines import streaming_plan, streaming_window
    from chai_compile.verify.compare import build_chai
    from chai_compile.verify.sweep import collect_mappings

    plans = collect_mappings(args.plans) if args.plans else []
    if args.streaming_saving is not None:
        window = streaming_window(longest, args.streaming_saving, args.sinks)
        plan = streaming_plan(model_info(adapter_for(loaded.model)), args.sinks, window)
        plan.write(out / "streaming.json")
        plans.append((f"streaming-s{args.sinks}-w{window}", plan))
    runnable, skipped = [], []
    for label, plan in plans:
        try:  # probe on a copy: one refused plan must not end the run after the original was scored
            build_chai(loaded.model, plan)
        except UnsupportedLayerKindError as e:
            _log(f"skipping {label}: {e.reason}")
            skipped.append({"label": label, "reason": e.reason})
            continue
        runnable.append((label, plan))
    return runnable, skipped


def markdown(result: dict[str, Any]) -> str:
    from chai_compile.verify.long_context import long_context_markdown

    ctx = [c["context"] for c in result["original"]["kv_context"]]
    head = ["model", "passkey acc", "ppl", "ppl Δ"] + [f"KV saving @{n}" for n in ctx]
    lines = [f"# Long context: {result['model']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    o = result["original"]["tasks"]
    lines.append(f"| original | {o['passkey']['acc']:.3f} | {o['wikitext2-4k']['ppl']:.3f} | - | "
                 + " | ".join("-" for _ in ctx) + " |")
    for p in result["points"]:
        t = p["tasks"]
        ppl_d = p["comparison"]["wikitext2-4k"]["ppl"]["delta"]
        lines.append(f"| {p['label']} | {t['passkey']['acc']:.3f} | {t['wikitext2-4k']['ppl']:.3f} | {ppl_d:+.2f}% | "
                     + " | ".join(f"{c['saving_pct']:.1f}%" for c in p["kv_context"]) + " |")
    for s in result["skipped"]:
        lines.append(f"| {s['label']} | skipped: {s['reason']} |")
    info = result["task_info"]
    lines += ["", f"Passkey: lengths {info['passkey']['lengths']}, depths {info['passkey']['depths']}, "
                  f"n={o['passkey']['n']}. Perplexity: WikiText-2 test, window {info['wikitext2-4k']['window']}, "
                  f"stride {info['wikitext2-4k']['stride']}, {info['wikitext2-4k']['windows']} windows.",
              long_context_markdown(result)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--plans", nargs="*", default=[], help="Plan files or directories of them.")
    ap.add_argument("--streaming-saving", type=float, default=None,
                    help="Add the StreamingLLM baseline saving this fraction of the KV cache (e.g. 0.4).")
    ap.add_argument("--sinks", type=int, default=4, help="Sink tokens of the StreamingLLM baseline.")
    ap.add_argument("--passkey-lengths", default="1k,2k")
    ap.add_argument("--ppl-window", type=int, default=4096, help="Perplexity window (capped at the model).")
    ap.add_argument("--kv-context", default="4096,8192")
    ap.add_argument("--limit", type=int, default=20, help="Passkey items and perplexity windows.")
    ap.add_argument("--ppl-limit", type=int, default=None, help="Perplexity windows, when fewer than --limit.")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from chai_compile.loading import load_model
    from chai_compile.verify.compare import compare_loaded
    from chai_compile.verify.long_context import passkey_plot
    from chai_compile.verify.passkey import parse_lengths
    from chai_compile.verify.report import dumps
    from chai_compile.verify.scoring import model_max_length
    from chai_compile.verify.tasks import load_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = parse_lengths(args.passkey_lengths, "--passkey-lengths")
    kv_context = parse_lengths(args.kv_context, "--kv-context")
    loaded = load_model(args.model, args.dtype, args.device)
    positions = model_max_length(loaded.model)
    passkey = load_task("passkey", passkey_lengths=lengths)
    ppl = dataclasses.replace(load_task("wikitext2-4k", data_dir=args.data_dir), window=args.ppl_window)
    plans, skipped = _plans(args, loaded, min(max(lengths), positions), out)
    result = compare_loaded(loaded, plans, [passkey, ppl], limit=args.limit, batch_size=args.batch_size,
                            task_limits=None if args.ppl_limit is None else {ppl.name: args.ppl_limit},
                            kv_context=kv_context, log=_log)
    result = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "plans"},
              "plans": [str(p) for p in args.plans], "skipped": skipped, **result}
    (out / "long_context.json").write_text(dumps(result))
    (out / "long_context.md").write_text(markdown(result))
    passkey_plot(result, out / "passkey.png")
    _log(f"wrote {out}/long_context.json, long_context.md, passkey.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
