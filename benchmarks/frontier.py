"""Quality against KV saving for three ways to choose shared scores, side by side on the same requests.

    python benchmarks/frontier.py smollm2-135m --levels 0.05,0.1,0.15,0.2,0.25,0.3 \
        --calib ../shared/data/eval/wikitext2/valid.txt --data-dir ../shared/data/eval --limit 500 \
        --device cuda --workers 7 --out docs/results/frontier/smollm2

Per KV level: pure CHAI (`profile --kv-target`: attention similarity), planned (`plan`, measured loss, no
refit) and planned with reconstruction (`plan --refit all`). Every variant is scored on the 8 default tasks
(`--limit` items; COPA has 100) with WikiText-2 test perplexity; the original once. Levels run in parallel
worker processes (one GPU serves several: this model is launch-bound). Calibration is WikiText-2 valid or
the built-in text, never an evaluation set. Writes frontier.json, frontier.md, frontier.png and each plan.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TASKS = "piqa,hellaswag,arc_easy,boolq,copa,openbookqa,lambada,wikitext2"
VARIANTS = ("chai", "planned", "planned+refit")


def _evaluate(args: argparse.Namespace, loaded, mapping=None) -> dict:
    from chai_compile.verify.compare import _public, build_chai, evaluate
    from chai_compile.verify.scoring import prepare
    from chai_compile.verify.tasks import parse_task_list, resolve_tasks

    model = loaded.model if mapping is None else build_chai(loaded.model, mapping)
    tasks = resolve_tasks(parse_task_list(TASKS), None, args.data_dir)
    prepared = [prepare(t, loaded.tokenizer, model, args.limit) for t in tasks]
    res = evaluate(model, loaded.tokenizer, prepared, args.batch_size, "")
    return {"tasks": {n: _public(r) for n, r in res.items()}, "kinds": {t.name: t.kind for t in tasks},
            "predictions": {n: r.get("predictions") for n, r in res.items()}}


def worker(args: argparse.Namespace) -> None:
    import dataclasses

    from chai_compile.loading import load_model
    from chai_compile.mapping import ClusterMapping
    from chai_compile.plan.options import PlanOptions, Refit
    from chai_compile.plan.planner import plan_model
    from chai_compile.plan.weights import write_weights
    from chai_compile.profile import profile_model
    from chai_compile.profile.options import ProfileOptions

    loaded = load_model(args.model, device=args.device)
    out = Path(args.out) / "work"
    out.mkdir(parents=True, exist_ok=True)
    if args.worker == "original":
        (out / "original.json").write_text(json.dumps(_evaluate(args, loaded)))
        return
    level = float(args.worker)
    tag = f"kv{round(100 * level):02d}"
    t0 = time.perf_counter()
    variants = args.variants
    _, chai = profile_model(loaded, ProfileOptions(calib=args.calib, samples=64, seq_len=512, kv_target=level),
                            progress=False)
    profile_s = time.perf_counter() - t0
    res = plan_model(loaded, PlanOptions(calib=args.calib, kv_target=level, refit=Refit.ALL, seq_len=args.plan_seq_len,
                                         samples=args.plan_samples, distill_steps=args.distill_steps,
                                         distill_lr=args.distill_lr),
                     progress=False)
    plan_dir = out / tag
    plan_dir.mkdir(exist_ok=True)
    chai.write(plan_dir / "chai.json")
    res.mapping.write(plan_dir / "planned.json")
    refit = dataclasses.replace(res.mapping, weights=write_weights(res.weights, plan_dir / "plan.weights.safetensors"))
    refit.write(plan_dir / "plan.json")
    row = {"level": level, "profile_s": profile_s, "plan_report": res.report}
    for name, path in zip(VARIANTS, ("chai.json", "planned.json", "plan.json"), strict=True):
        if name not in variants:
            continue
        mapping = ClusterMapping.read(plan_dir / path)
        row[name] = {"summary": mapping.summary(), **_evaluate(args, loaded, mapping)}
    (out / f"{tag}.json").write_text(json.dumps(row))


def combine(args: argparse.Namespace) -> dict:
    from chai_compile.verify.compare import average_accuracy_change, compare_task, task_metrics

    work = Path(args.out) / "work"
    orig = json.loads((work / "original.json").read_text())
    kinds = orig["kinds"]

    def full(r: dict, n: str) -> dict:
        return {**r["tasks"][n], **({"predictions": r["predictions"][n]} if r["predictions"][n] else {})}

    rows = []
    for level in args.levels:
        row = json.loads((work / f"kv{round(100 * level):02d}.json").read_text())
        for v in args.variants:
            comp = {n: compare_task(task_metrics(n, k), full(orig, n), full(row[v], n)) for n, k in kinds.items()}
            row[v] = {"kv_cache_saving": row[v]["summary"]["kv_cache_saving"], "summary": row[v]["summary"],
                      "tasks": row[v]["tasks"], "comparison": comp,
                      "average_accuracy_change_points": average_accuracy_change(comp, kinds),
                      "wikitext2_ppl_change_pct": comp["wikitext2"]["ppl"]["delta"]}
        rows.append(row)
    return {"model": args.model, "variants": args.variants, "limit": args.limit, "calibration": args.calib,
            "device": args.device, "command": " ".join(sys.argv), "original": {"tasks": orig["tasks"]}, "levels": rows}


def markdown(result: dict) -> str:
    lines = [f"# Quality against KV saving: {result['model']}", "",
             f"8 tasks (at most {result['limit']} items each; COPA has 100), average accuracy change in points "
             "(acc_norm where defined) and WikiText-2 test perplexity change; calibration on "
             f"{result['calibration']}.", "", f"Command: `{result['command']}`", "",
             "| KV saved | " + " | ".join(f"{v}: avg Δ acc / Δ ppl" for v in result["variants"]) + " |",
             "|---|" + "---|" * len(result["variants"])]
    for row in result["levels"]:
        cells = [f"{row[v]['average_accuracy_change_points']:+.2f} / {row[v]['wikitext2_ppl_change_pct']:+.1f}%"
                 for v in result["variants"]]
        lines.append(f"| {100 * row['level']:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, style in zip(VARIANTS, ("o-", "s-", "^-"), strict=True):
        if v not in result["variants"]:
            continue
        xs = [100 * r[v]["kv_cache_saving"] for r in result["levels"]]
        a.plot(xs, [r[v]["average_accuracy_change_points"] for r in result["levels"]], style, label=v)
        b.plot(xs, [r[v]["wikitext2_ppl_change_pct"] for r in result["levels"]], style, label=v)
    a.axhline(-1, color="grey", ls=":", lw=1)
    b.axhline(5, color="grey", ls=":", lw=1)
    a.set(xlabel="KV cache saved (%)", ylabel="average accuracy change (points)", title="8 tasks")
    b.set(xlabel="KV cache saved (%)", ylabel="WikiText-2 test perplexity change (%)", title="perplexity")
    b.set_yscale("symlog", linthresh=10)
    a.legend()
    fig.suptitle(result["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.2])
    ap.add_argument("--calib", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--plan-seq-len", type=int, default=None, help="plan's calibration window length (plan's default)")
    ap.add_argument("--plan-samples", type=int, default=4, help="plan's scoring windows")
    ap.add_argument("--distill-steps", type=int, default=200, help="plan's end-to-end distillation steps (0: off)")
    ap.add_argument("--distill-lr", type=float, default=5e-5, help="plan's distillation learning rate")
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                    help=f"which of {','.join(VARIANTS)} to evaluate")
    ap.add_argument("--combine-only", action="store_true",
                    help="only combine the worker results already under OUT/work (levels run in separate calls)")
    ap.add_argument("--skip-original", action="store_true", help="do not evaluate the original in this call")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args)
    jobs = [] if args.combine_only else (["original"] * (not args.skip_original)
                                          + [str(level) for level in args.levels])
    t0 = time.perf_counter()
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.workers:
            job = jobs.pop(0)
            running.append((job, subprocess.Popen([sys.executable, *sys.argv, "--worker", job])))
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                print(f"[{time.perf_counter() - t0:6.0f} s] {job}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(job)
    if failed:
        sys.exit(f"frontier: workers failed: {failed}")
    result = combine(args)
    if not args.combine_only:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    (out / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "frontier.md").write_text(markdown(result))
    plot(result, out / "frontier.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
