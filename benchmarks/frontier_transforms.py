"""The SmolLM2 frontier with a fourth variant: the planner given every transform (CHAI, spans, shared layers).

    python benchmarks/frontier_transforms.py --chai docs/results/frontier/smollm2-distill/frontier.json \
        docs/results/frontier/smollm2-distill-levels/frontier.json \
        --sweeps docs/results/frontier/smollm2-transforms/sweeps --out docs/results/frontier/smollm2-transforms

Reads what was measured, computes nothing new: the CHAI-only variants from `frontier.py`'s JSON (a later
file's level replaces an earlier one's) and the transforms plans (`allNN` at NN% KV, `span20`) from the
`chai-compile sweep` results of `bash benchmarks/device_transforms.sh frontier` (short tasks and long-context
tasks in separate sweeps, each beside the original). A span saves KV only beyond its window, so the
transforms' saving is the one measured after a 4096-token prefill (the context the plans were made for);
the CHAI variants save the same fraction at every length. Writes frontier_transforms.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CHAI_VARIANTS = ("chai", "planned", "planned+refit")
TRANSFORMS = "all transforms"


def chai_rows(paths: list[Path]) -> dict[float, dict]:
    rows: dict[float, dict] = {}
    for p in paths:
        for r in json.loads(p.read_text())["levels"]:
            rows[r["level"]] = {v: {"kv_saving_pct": 100 * r[v]["kv_cache_saving"],
                                    "avg_acc_points": r[v]["average_accuracy_change_points"],
                                    "wikitext2_ppl_pct": r[v]["wikitext2_ppl_change_pct"]} for v in CHAI_VARIANTS}
    return rows


def sweep_points(folder: Path) -> dict[str, dict]:
    """label -> the measured numbers of that plan, merged over the short and long sweeps."""
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("*/sweep.json")):
        for p in json.loads(f.read_text())["points"]:
            row = out.setdefault(p["label"], {"plan": p["label"]})
            comp = p["comparison"]
            if "wikitext2" in comp:
                row["avg_acc_points"] = p["average_accuracy_change_points"]
                row["wikitext2_ppl_pct"] = comp["wikitext2"]["ppl"]["delta"]
                row["kv_saving_pct_512"] = p["kv_cache_saving_pct"]
            if "wikitext2-4k" in comp:
                row["wikitext2_4k_ppl_pct"] = comp["wikitext2-4k"]["ppl"]["delta"]
                row["passkey"] = p["tasks"]["passkey"]["by_length"]
                for c in p["kv_context"]:
                    row[f"kv_saving_pct_{c['context']}"] = c["saving_pct"]
                row["kv_saving_pct"] = row["kv_saving_pct_4096"]
            row["summary"] = {k: p["mapping_summary"][k] for k in ("clustered_layers", "shared_layers", "span_layers",
                                                                    "k_heads_kept", "k_heads_total")}
    return out


def markdown(result: dict) -> str:
    lines = ["# SmolLM2-135M: quality against KV saving, four planners", "",
             "Average accuracy change over the 7 accuracy tasks (points, 500 items, COPA 100) / WikiText-2 test "
             "perplexity change (1024-token windows). CHAI variants: the saving holds at every length. All "
             "transforms: `plan --transforms chai,span,shared --context 4096`, saving measured after a 4096-token "
             "prefill; its 4k-window perplexity change and passkey (25 keys per length) beside.", "",
             "| KV target | pure CHAI | planned | planned + refit | all transforms (saved at 4k / 512 tokens) "
             "| its 4k-window Δppl | its passkey 1k/2k/4k/8k | its layers (span/CHAI/shared) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["levels"]:
        cells = [f"{row[v]['avg_acc_points']:+.2f} / {row[v]['wikitext2_ppl_pct']:+.1f}%" if v in row else "-"
                 for v in CHAI_VARIANTS]
        t = row.get(TRANSFORMS)
        if t:
            s = t["summary"]
            cells += [f"{t['avg_acc_points']:+.2f} / {t['wikitext2_ppl_pct']:+.2f}% ({t['kv_saving_pct']:.1f}% / "
                      f"{t['kv_saving_pct_512']:.1f}%)", f"{t['wikitext2_4k_ppl_pct']:+.2f}%",
                      "/".join(f"{round(25 * a)}" for a in t["passkey"].values()),
                      f"{s['span_layers']}/{s['clustered_layers']}/{s['shared_layers']}"]
        lines.append(f"| {100 * row['level']:.0f}% | " + " | ".join(cells) + " |")
    for name, t in result["others"].items():
        lines.append(f"\n`{name}` (spans only, profile-ranked): {t['avg_acc_points']:+.2f} pt / "
                     f"{t['wikitext2_ppl_pct']:+.2f}% at {t['kv_saving_pct']:.1f}% KV saved at 4k "
                     f"({t['kv_saving_pct_512']:.1f}% at 512 tokens); 4k-window {t['wikitext2_4k_ppl_pct']:+.2f}%; "
                     "passkey " + "/".join(f"{round(25 * a)}" for a in t["passkey"].values()) + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series = [(v, v, "o-") for v in CHAI_VARIANTS] + [(TRANSFORMS, "all transforms (saved at 4k)", "D-")]
    for key, label, style in series:
        rows = [r[key] for r in result["levels"] if key in r]
        xs = [r["kv_saving_pct"] for r in rows]
        a.plot(xs, [r["avg_acc_points"] for r in rows], style, label=label)
        b.plot(xs, [r["wikitext2_ppl_pct"] for r in rows], style, label=label)
    rows = [r[TRANSFORMS] for r in result["levels"] if TRANSFORMS in r]
    b.plot([r["kv_saving_pct"] for r in rows], [r["wikitext2_4k_ppl_pct"] for r in rows], "D:",
           label="all transforms, 4k windows")
    a.axhline(-1, color="grey", ls=":", lw=1)
    b.axhline(5, color="grey", ls=":", lw=1)
    a.set(xlabel="KV cache saved (%)", ylabel="average accuracy change (points)", title="7 accuracy tasks")
    b.set(xlabel="KV cache saved (%)", ylabel="WikiText-2 test perplexity change (%)", title="perplexity")
    b.set_yscale("symlog", linthresh=1)
    b.set_ylim(-0.5, 2000)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M (H200, fp32); dotted lines: the goal (1 point, 5%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chai", nargs="+", type=Path, required=True, help="frontier.py JSON files, later ones win")
    ap.add_argument("--sweeps", type=Path, required=True, help="folder of sweep result folders")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    chai = chai_rows(args.chai)
    points = sweep_points(args.sweeps)
    levels = []
    for level in sorted(chai):
        row = {"level": level, **chai[level]}
        name = f"all{round(100 * level):02d}"
        if name in points:
            row[TRANSFORMS] = points[name]
        levels.append(row)
    others = {k: v for k, v in points.items() if not re.fullmatch(r"all\d\d", k)}
    result = {"model": "smollm2-135m", "chai_sources": [str(p) for p in args.chai], "sweeps": str(args.sweeps),
              "levels": levels, "others": others}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier_transforms.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "frontier_transforms.md").write_text(markdown(result))
    plot(result, args.out / "frontier_transforms.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
