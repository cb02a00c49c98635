"""Verify and sweep reports: JSON (the result as is), a Markdown table, and PNG plots.

Plots use matplotlib's object API (Figure + Agg canvas) so no global backend state is touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from chai_compile.verify.compare import PRIMARY, task_metrics


def _fmt(v: Any, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric == "ppl":
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _signed(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.2f}{'%' if unit.startswith('%') else ' pt'}"


def verify_markdown(result: dict[str, Any]) -> str:
    """Table of every task and metric: original, CHAI, difference (or the original alone without a mapping)."""
    orig = result["original"]
    point = result["points"][0] if result["points"] else None
    lines = [f"# chai-compile verify: {result['model']}", ""]
    if point:
        s = point["mapping_summary"]
        lines += [f"Mapping `{result.get('mapping_path', point['label'])}` ({point['membership']} membership): "
                  f"{s['clustered_layers']}/{s['layers']} layers clustered, score heads "
                  f"{s['score_heads_kept']}/{s['query_heads_total']}, "
                  f"K heads {s['k_heads_kept']}/{s['k_heads_total']}.",
                  ""]
        lines += ["| task | metric | n | original | CHAI | Δ | agreement |", "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| task | metric | n | original |", "|---|---|---|---|"]
    for task, r in orig["tasks"].items():
        kind = result["task_info"][task]["kind"]
        for m in task_metrics(task, kind):
            row = f"| {task} | {m} | {r['n']} | {_fmt(r[m], m)} |"
            if point:
                c = point["comparison"][task]
                agree = c.get("agreement")
                row += (f" {_fmt(c[m]['chai'], m)} | {_signed(c[m]['delta'], c[m]['unit'])} |"
                        f" {'-' if agree is None or m == 'ppl' else f'{agree:.3f}'} |")
            lines.append(row)
    if point and point["average_accuracy_change_points"] is not None:
        lines += ["", f"Average accuracy change ({', '.join(sorted(set(PRIMARY.values()) - {'ppl'}))} over "
                      f"accuracy tasks): {point['average_accuracy_change_points']:+.2f} points."]
    lines += ["", "## Cost", "", "| quantity | original | CHAI | saving |", "|---|---|---|---|"]
    kv0 = orig["kv_cache"]
    if point:
        kv1, fl = point["kv_cache"], point["flops"]
        lines += [
            f"| KV-cache bytes/token (measured, {_kv_run(kv0)}) | "
            f"{kv0['bytes_per_token']:,.0f} | {kv1['bytes_per_token']:,.0f} | {point['kv_cache_saving_pct']:.2f}% |",
            f"| KV-cache total bytes, batch {kv0['batch']} | {kv0['total_bytes']:,} | {kv1['total_bytes']:,} | "
            f"{_pct(kv0['total_bytes'], kv1['total_bytes'])} |",
            f"| K-cache bytes/token | {kv0['key_bytes_per_token']:,.0f} | {kv1['key_bytes_per_token']:,.0f} | "
            f"{_pct(kv0['key_bytes_per_token'], kv1['key_bytes_per_token'])} |",
            f"| Q/K projection FLOPs/token | {fl['original']['qk_projection']:,} | {fl['chai']['qk_projection']:,} | "
            f"{fl['saving_pct']['qk_projection']:.2f}% |",
            f"| score FLOPs/token at {fl['original']['context']} keys | {fl['original']['scores']:,} | "
            f"{fl['chai']['scores']:,} | {fl['saving_pct']['scores']:.2f}% |",
            f"| evaluation wall time (s) | {orig['wall_s']:.1f} | {point['wall_s']:.1f} | "
            f"{_pct(orig['wall_s'], point['wall_s'])} |",
        ]
        lines += ["", "| task | original s | CHAI s |", "|---|---|---|"]
        lines += [f"| {t} | {orig['tasks'][t]['wall_s']:.1f} | {point['tasks'][t]['wall_s']:.1f} |"
                  for t in orig["tasks"]]
    else:
        lines += [f"| KV-cache bytes/token (measured, {_kv_run(kv0)}) | "
                  f"{kv0['bytes_per_token']:,.0f} | - | - |",
                  f"| evaluation wall time (s) | {orig['wall_s']:.1f} | - | - |"]
        lines += ["", "| task | original s |", "|---|---|"]
        lines += [f"| {t} | {r['wall_s']:.1f} |" for t, r in orig["tasks"].items()]
    from chai_compile.verify.long_context import long_context_markdown

    extra = long_context_markdown(result)
    lines += [extra.rstrip()] if extra else []
    violations = result.get("max_drop", {}).get("violations") or []
    if result.get("max_drop"):
        lines += ["", f"Max drop {result['max_drop']['threshold']:g}: "
                      + ("exceeded: " + "; ".join(violations) if violations else "within limit.")]
    return "\n".join(lines) + "\n"


def _kv_run(kv: dict[str, Any]) -> str:
    run = f"{kv['prefill_tokens']}-token prefill"
    return run + (f" + {kv['decode_steps']} decode steps" if kv.get("decode_steps") else "")


def _pct(a: float, b: float) -> str:
    return f"{100 * (1 - b / a):.2f}%" if a else "-"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def verify_plot(result: dict[str, Any], path: Path) -> Path:
    """Bars of original vs CHAI: accuracy tasks (primary metric) on the left, perplexities on the right."""
    orig = result["original"]["tasks"]
    point = result["points"][0] if result["points"] else None
    chai = point["tasks"] if point else {}
    kinds = {t: result["task_info"][t]["kind"] for t in orig}
    acc_tasks = [t for t in orig if kinds[t] != "perplexity"]
    ppl_tasks = [t for t in orig if kinds[t] == "perplexity"]
    panels = [p for p in ((acc_tasks, "accuracy"), (ppl_tasks, "perplexity")) if p[0]]
    fig = _figure(max(5.0, 1.2 * len(orig) + 2), 4)
    ratios = [max(len(p[0]), 1) for p in panels]
    axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    for ax, (names, ylabel) in zip(axes, panels, strict=True):
        xs = range(len(names))
        metric = [PRIMARY[kinds[t]] for t in names]
        w = 0.38 if point else 0.6
        ax.bar([x - (w / 2 if point else 0) for x in xs], [orig[t][m] for t, m in zip(names, metric, strict=True)],
               w, label="original", color="#4c72b0")
        if point:
            ax.bar([x + w / 2 for x in xs], [chai[t][m] for t, m in zip(names, metric, strict=True)], w,
                   label=f"CHAI ({point['membership']})", color="#dd8452")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel(ylabel + (" (acc)" if ylabel == "accuracy" else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    title = f"{result['model']}: original vs CHAI" if point else f"{result['model']}"
    if point:
        title += f" (KV cache -{point['kv_cache_saving_pct']:.1f}%)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def sweep_markdown(result: dict[str, Any]) -> str:
    kinds = {t: i["kind"] for t, i in result["task_info"].items()}
    acc_tasks = [t for t in kinds if kinds[t] != "perplexity"]
    ppl_tasks = [t for t in kinds if kinds[t] == "perplexity"]
    head = ["mapping", "made by", "KV saving (measured)", "K heads kept", "avg Δacc (pt)"]
    head += [f"{t} Δacc" for t in acc_tasks] + [f"{t} Δppl" for t in ppl_tasks]
    lines = [f"# chai-compile sweep: {result['model']}", "",
             f"Membership {result['membership']}; tasks {', '.join(kinds)}; limit {result['settings']['limit']}.",
             "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    orig = result["original"]["tasks"]
    lines.append("| original | | 0.00% | all | 0.00 | " + " | ".join(
        [_fmt(orig[t]["acc"]) for t in acc_tasks] + [_fmt(orig[t]["ppl"], "ppl") for t in ppl_tasks]) + " |")
    for p in result["points"]:
        s = p["mapping_summary"]
        cells = [p["label"], p.get("origin", "profile"), f"{p['kv_cache_saving_pct']:.2f}%",
                 f"{s['k_heads_kept']}/{s['k_heads_total']}", _signed(p["average_accuracy_change_points"], "points")]
        cells += [_signed(p["comparison"][t]["acc"]["delta"], "points") for t in acc_tasks]
        cells += [_signed(p["comparison"][t]["ppl"]["delta"], "%") for t in ppl_tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(result: dict[str, Any], path: Path) -> Path:
    """The frontier: measured KV-cache saving (x) against average accuracy change and, when a perplexity
    task ran, its change (y); one line per way the mappings were made (profile, planned, planned+refit)."""
    ppl_tasks = [t for t, i in result["task_info"].items() if i["kind"] == "perplexity"]
    fig = _figure(11 if ppl_tasks else 6, 4.5)
    axes = [fig.add_subplot(1, 2 if ppl_tasks else 1, i + 1) for i in range(2 if ppl_tasks else 1)]
    pts = [p for p in result["points"] if p["average_accuracy_change_points"] is not None]
    metrics = [("average accuracy change (points)", lambda p: p["average_accuracy_change_points"])]
    if ppl_tasks:
        t = ppl_tasks[0]
        metrics.append((f"{t} perplexity change (%)", lambda p, t=t: p["comparison"][t]["ppl"]["delta"]))
    for ax, (ylabel, value) in zip(axes, metrics, strict=True):
        ax.scatter([0], [0], color="black", zorder=3, label="original")
        for origin in sorted({p.get("origin", "profile") for p in pts}):
            group = sorted((p for p in pts if p.get("origin", "profile") == origin),
                           key=lambda p: p["kv_cache_saving_pct"])
            ax.plot([p["kv_cache_saving_pct"] for p in group], [value(p) for p in group], "-o", zorder=3,
                    label=origin)
            for p in group:
                ax.annotate(p["label"], (p["kv_cache_saving_pct"], value(p)), textcoords="offset points",
                            xytext=(4, 4), fontsize=6)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("KV-cache saving vs native cache, measured (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if ppl_tasks:
        axes[1].set_yscale("symlog", linthresh=10)
    fig.suptitle(f"{result['model']}: quality against KV saving ({result['membership']} membership)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def dumps(result: dict[str, Any]) -> str:
    # NaN (e.g. stderr with n=1) is not JSON; write null
    return json.dumps(_clean(result), indent=1) + "\n"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v
