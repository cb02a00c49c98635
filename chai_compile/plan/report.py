"""The plan's human report: Markdown beside the JSON, and the greedy rounds as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    s, o = report["summary"], report["original"]
    lines = [f"# chai-compile plan: {report['model']}", "",
             f"K heads dropped: {report['k_heads_dropped']}/{report['k_heads_total']}, "
             f"KV cache -{100 * report['kv_cache_saving']:.1f}% "
             f"(score heads {s['score_heads_kept']}/{s['query_heads_total']}, "
             f"{s['clustered_layers']} of {s['layers']} layers changed).", "",
             f"Calibration: {report['calibration']['source']} ({report['calibration']['windows']} windows of "
             f"{report['calibration']['seq_len']} tokens; every candidate measured on "
             f"{report['calibration']['scoring_windows']}).", "",
             "| stage | KL from original (nats/token) | calibration perplexity | change | kept |",
             "|---|---|---|---|---|",
             f"| original | 0 | {o['ppl']:.3f} | | |"]
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {st['kl']:.4f} | {st['ppl']:.3f} | {100 * (st['ppl'] / o['ppl'] - 1):+.2f}% | "
                     f"{'yes' if st.get('kept', True) else 'no'} |")
    lines += ["", f"Wall time {report['total_s']:.0f} s (selection {report['select_s']:.0f} s), "
              f"peak RSS {report['peak_rss_mb']:.0f} MB"
              + (f", peak CUDA {report['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in report else "") + "."]
    return "\n".join(lines) + "\n"


def rounds_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    x = [100 * r["k_heads_dropped"] / (2 * report["k_heads_total"]) for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [r["kl"] for r in rounds], "o-", label="KL from original")
    ax.set_xlabel("KV cache saved (%)")
    ax.set_ylabel("calibration KL (nats/token)")
    ax2 = ax.twinx()
    ax2.plot(x, [r["ppl"] for r in rounds], "s--", color="tab:red", label="perplexity")
    ax2.set_ylabel("calibration perplexity", color="tab:red")
    ax.set_title("Greedy rounds (before reconstruction)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transforms_markdown(report: dict[str, Any]) -> str:
    """The combined planner's report: saving at the context, layer kinds, the greedy rounds."""
    b, o = report["budget"], report["original"]
    kinds = ", ".join(f"{v} {k}" for k, v in report["layer_kinds"].items() if v)
    lines = [f"# chai-compile plan: {report['model']}", "",
             f"Transforms {', '.join(b['transforms'])}; KV cache -{100 * report['kv_cache_saving']:.1f}% at "
             f"{b['context']} tokens (target {b['kv_target']}); layers: {kinds}; "
             f"{report['span_kv_heads']} span KV heads.", "",
             f"Calibration: {report['calibration']['source']} ({report['calibration']['windows']} windows of "
             f"{report['calibration']['seq_len']} tokens). Original perplexity {o['ppl']:.3f}.", "",
             "| round | KV saved | KL (nats/token) | perplexity | accepted |", "|---|---|---|---|---|"]
    for i, r in enumerate(report["rounds"]):
        lines.append(f"| {i} | {100 * r['saving']:.1f}% | {r['kl']:.4f} | {r['ppl']:.3f} | {' '.join(r['accepted'])} |")
    lines += ["", f"Wall time {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def transforms_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([100 * r["saving"] for r in rounds], [r["kl"] for r in rounds], "o-")
    ax.set_xlabel(f"KV cache saved at {report['budget']['context']} tokens (%)")
    ax.set_ylabel("calibration KL (nats/token)")
    ax.set_title("Greedy rounds: " + ", ".join(report["budget"]["transforms"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
