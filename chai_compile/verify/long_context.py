"""Long-context evaluation beside the tasks: KV bytes at stated context lengths, and the report parts for
them and for passkey retrieval (a per-length / per-depth table and a length x depth heatmap)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from chai_compile.choices import Membership
from chai_compile.mapping import ClusterMapping
from chai_compile.verify.measure import check_cache_prediction, measure_kv_cache

KV_KEYS = ("total_bytes", "key_bytes", "value_bytes", "bytes_per_token", "prefill_s")


def kv_at_contexts(model: nn.Module, contexts: Sequence[int], mapping: ClusterMapping | None = None,
                   membership: Membership = Membership.STATIC,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measured cache bytes after a prefill of each context length; a mapped model's cache is checked
    against its plan's prediction at every length (a bounded span cache must stop growing, not vanish)."""
    out = []
    for n in contexts:
        kv = measure_kv_cache(model, n)
        if mapping is not None:
            check_cache_prediction(kv, mapping, membership)
        out.append({"context": n, **{k: kv[k] for k in KV_KEYS}})
        if log:
            log(f"KV cache at {n} tokens: {kv['total_bytes']:,} bytes ({kv['prefill_s']:.1f} s prefill)")
    return out


def context_savings(original: list[dict[str, Any]], chai: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per context length: the mapped model's bytes and its saving against the original's."""
    return [{**c, "saving_pct": round(100 * (1 - c["total_bytes"] / o["total_bytes"]), 3)}
            for o, c in zip(original, chai, strict=True)]


def _passkey_tasks(result: dict[str, Any]) -> list[str]:
    return [t for t, i in result["task_info"].items() if i["kind"] == "passkey"]


def _columns(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, per-task results) of the original and every mapped point."""
    return [("original", result["original"]["tasks"])] + [
        (p["label"] or "CHAI", p["tasks"]) for p in result["points"]]


def long_context_markdown(result: dict[str, Any]) -> str:
    """Passkey accuracy by length and by depth, and KV bytes at the stated contexts; '' when neither ran."""
    lines: list[str] = []
    cols = _columns(result)
    head = "| " + " | ".join(label for label, _ in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    for task in _passkey_tasks(result):
        lines += ["", f"## {task}: greedy exact match", ""]
        for key, what in (("by_length", "context tokens"), ("by_depth", "key depth")):
            lines += [f"| {what} {head}", rule]
            lines += [f"| {v} | " + " | ".join(f"{r[task][key][v]:.3f}" for _, r in cols) + " |"
                      for v in cols[0][1][task][key]]
            lines.append("")
        lines.pop()
    ctx0 = result["original"].get("kv_context") or []
    if ctx0:
        names = ["context", "original"] + [f"{p['label']} | saving" for p in result["points"]]
        lines += ["", "## KV-cache bytes at stated contexts (measured after a prefill)", "",
                  "| " + " | ".join(names) + " |",
                  "|---|---|" + "---|---|" * len(result["points"])]
        for i, o in enumerate(ctx0):
            row = f"| {o['context']} | {o['total_bytes']:,} |"
            for p in result["points"]:
                c = p["kv_context"][i]
                row += f" {c['total_bytes']:,} | {c['saving_pct']:.2f}% |"
            lines.append(row)
    return "\n".join(lines).rstrip() + "\n" if lines else ""


def passkey_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Heatmap of passkey accuracy, context length (rows) x key depth (columns), one panel per model; None
    when no passkey task ran."""
    tasks = _passkey_tasks(result)
    if not tasks:
        return None
    from chai_compile.verify.report import _figure

    task = tasks[0]
    cols = _columns(result)
    fig = _figure(1.5 + 3.2 * len(cols), 3.6)
    fig.set_layout_engine("constrained")  # room for the colour bar and tick labels
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    image = None
    for ax, (label, res) in zip(axes, cols, strict=True):
        cells = res[task]["by_cell"]
        lengths = list(cells)
        depths = sorted({d for row in cells.values() for d in row}, key=float)
        grid = [[cells[n].get(d, float("nan")) for d in depths] for n in lengths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels([f"{float(d):.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)))
        ax.set_yticklabels(lengths)
        ax.set_xlabel("key depth")
        ax.set_title(f"{label}: acc {res[task]['acc']:.2f}", fontsize=9)
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    axes[0].set_ylabel("context tokens")
    fig.colorbar(image, ax=list(axes), label="accuracy")
    fig.suptitle(f"{Path(result['model']).name}: passkey retrieval (greedy exact match)", fontsize=10)
    fig.savefig(path, dpi=120)
    return path
