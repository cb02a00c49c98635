"""Original against CHAI on one loaded model: evaluate, measure, compare, check the allowed drop.

`compare_loaded` is the one code path behind `verify` (one mapping) and `sweep` (several): the
tasks are tokenised once, the original is evaluated once, and every mapping is applied to a deep
copy of the original model, evaluated on the same requests and measured the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from chai_compile.choices import Membership
from chai_compile.errors import ChaiError, UsageError
from chai_compile.loading import LoadedModel
from chai_compile.mapping import ClusterMapping
from chai_compile.verify.long_context import context_savings, kv_at_contexts
from chai_compile.verify.measure import check_cache_prediction, flops_comparison, measure_kv_cache
from chai_compile.verify.passkey import check_lengths
from chai_compile.verify.scoring import LogitsBackend, Prepared, model_max_length, prepare, score
from chai_compile.verify.tasks import Task

# Accuracy-like metrics compare in points (x100), perplexities as % change.
METRICS = {"multiple_choice": ("acc", "acc_norm"), "last_word": ("acc", "ppl"), "perplexity": ("ppl",),
           "passkey": ("acc",)}
# lm-eval reports only acc where answers are fixed short forms (no/yes; two parallel sentences)
ACC_ONLY = frozenset({"boolq", "copa"})
# The metric averaged for the sweep's "average accuracy change" and checked first by --max-drop.
PRIMARY = {"multiple_choice": "acc", "last_word": "acc", "perplexity": "ppl", "passkey": "acc"}
# Kinds left out of the average accuracy change: it stays the zero-shot average the goals are stated in.
NOT_AVERAGED = frozenset({"perplexity", "passkey"})

Log = Callable[[str], None]


def task_metrics(name: str, kind: str) -> tuple[str, ...]:
    """The metrics reported and compared for a task."""
    return ("acc",) if name in ACC_ONLY else METRICS[kind]


class RewriteUnavailable(ChaiError):
    """The CHAI rewrite (chai_compile.rewrite) is not installed in this build."""


def build_chai(model: nn.Module, mapping: ClusterMapping, membership: Membership = Membership.STATIC) -> nn.Module:
    """A deep copy of `model` with `mapping` applied (the original stays untouched for comparison)."""
    try:
        from chai_compile.rewrite import apply_mapping
    except ImportError as e:
        raise RewriteUnavailable(f"the CHAI rewrite is not available: {e}",
                                 fix="install a chai-compile build that includes chai_compile.rewrite") from None
    chai = copy.deepcopy(model)
    return apply_mapping(chai, mapping, membership=membership)


def check_mapping(model: nn.Module, mapping: ClusterMapping) -> None:
    """Refuse a mapping profiled on another model (raises FingerprintMismatchError)."""
    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info

    mapping.check_model(model_info(adapter_for(model)))


def evaluate(model: nn.Module | LogitsBackend, tokenizer: Any, prepared: Sequence[Prepared], batch_size: int = 8,
             label: str = "", log: Log | None = None) -> dict[str, dict[str, Any]]:
    """Score every prepared task on `model`; per task the metrics (with per-item predictions) and wall time."""
    results = {}
    for p in prepared:
        r = score(model, p, tokenizer, batch_size, label)
        results[p.task.name] = r
        if log:
            shown = ", ".join(f"{m} {r[m]:.4g}" for m in task_metrics(p.task.name, p.task.kind))
            log(f"{p.task.name} [{label}] {shown} (n={r['n']}, {r['wall_s']:.1f} s)")
    return results


def _delta(metric: str, orig: float, chai: float) -> float:
    if metric == "ppl":
        return 100.0 * (chai / orig - 1.0) if orig > 0 and math.isfinite(orig) else float("nan")
    return 100.0 * (chai - orig)


def compare_task(metrics: tuple[str, ...], orig: dict[str, Any], chai: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metrics:
        out[m] = {"original": orig[m], "chai": chai[m], "delta": _delta(m, orig[m], chai[m]),
                  "unit": "% change" if m == "ppl" else "points"}
    if "predictions" in orig:  # how often CHAI picks the same answer, a finer signal than acc
        same = sum(a == b for a, b in zip(orig["predictions"], chai["predictions"], strict=True))
        out["agreement"] = same / max(len(orig["predictions"]), 1)
    return out


def average_accuracy_change(comparison: dict[str, dict[str, Any]], kinds: dict[str, str]) -> float | None:
    deltas = [comparison[t][PRIMARY[k]]["delta"] for t, k in kinds.items() if k not in NOT_AVERAGED and t in comparison]
    return sum(deltas) / len(deltas) if deltas else None


def max_drop_violations(comparison: dict[str, dict[str, Any]], kinds: dict[str, str], max_drop: float) -> list[str]:
    """Accuracy metrics may fall at most `max_drop` points; a perplexity task may rise at most `max_drop` %."""
    bad = []
    for task, kind in kinds.items():
        for m in ("ppl",) if kind == "perplexity" else ("acc", "acc_norm"):
            if m not in comparison[task]:
                continue
            c = comparison[task][m]
            worse = c["delta"] if m == "ppl" else -c["delta"]
            if not worse <= max_drop:  # NaN counts as exceeded
                what = "rose" if m == "ppl" else "fell"
                unit = "%" if m == "ppl" else " points"
                bad.append(f"{task} {m} {what} {abs(c['delta']):.2f}{unit} ({c['original']:.4g} -> "
                           f"{c['chai']:.4g}), limit {max_drop:g}{unit}")
    return bad


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("predictions")}


def compare_loaded(
    loaded: LoadedModel,
    mappings: Sequence[tuple[str, ClusterMapping]],
    tasks: Sequence[Task],
    *,
    membership: Membership = Membership.STATIC,
    limit: int | None = None,
    task_limits: dict[str, int] | None = None,
    batch_size: int = 8,
    window: int | None = None,
    stride: int | None = None,
    kv_tokens: int = 512,
    kv_decode: int = 0,
    kv_context: Sequence[int] = (),
    log: Log | None = None,
) -> dict[str, Any]:
    """Evaluate the original once and each mapping's CHAI model on the same requests; `kv_context` adds
    the cache bytes measured after a prefill of each stated length (refused above the model's positions).
    `task_limits` overrides `limit` for the tasks it names (long-window perplexity costs far more per window).

    Returns {"original": {...}, "points": [one per mapping]}, JSON-serialisable.
    """
    from chai_compile.device_map import is_dispatched
    from chai_compile.rewrite.dispatched import rewrite_in_place

    model, tok = loaded.model, loaded.tokenizer
    for _, m in mappings:  # fail before any expensive work
        check_mapping(model, m)
    check_lengths(kv_context, model_max_length(model), "--kv-context", UsageError)
    prepared = [prepare(t, tok, model, (task_limits or {}).get(t.name, limit), window, stride) for t in tasks]
    kinds = {t.name: t.kind for t in tasks}
    kv_tokens = max(1, min(kv_tokens, model_max_length(model)))

    orig = evaluate(model, tok, prepared, batch_size, "original", log)
    orig_kv = measure_kv_cache(model, kv_tokens, kv_decode)
    out: dict[str, Any] = {
        "original": {
            "tasks": {n: _public(r) for n, r in orig.items()},
            "kv_cache": orig_kv,
            "kv_context": kv_at_contexts(model, kv_context, log=log),
            "flops": flops_comparison(model, None, kv_tokens)["original"] if mappings else None,
            "wall_s": round(sum(r["wall_s"] for r in orig.values()), 3),
        },
        "task_info": {p.task.name: {"kind": p.task.kind, "source": p.task.source,
                                    "metrics": list(task_metrics(p.task.name, p.task.kind)),
                                    **{k: v for k, v in p.meta.items() if not k.startswith("_")}} for p in prepared},
        "points": [],
    }
    for label, mapping in mappings:
        undo = None
        if is_dispatched(model):  # spread over devices: no second copy; rewrite in place, undo after
            chai_model, undo = model, rewrite_in_place(model, mapping, membership)
        else:
            chai_model = build_chai(model, mapping, membership)
        try:
            chai = evaluate(chai_model, tok, prepared, batch_size, f"CHAI {label}".strip(), log)
            kv = measure_kv_cache(chai_model, kv_tokens, kv_decode)
            check_cache_prediction(kv, mapping, membership)
            kv_ctx = kv_at_contexts(chai_model, kv_context, mapping, membership, log)
        finally:
            del chai_model
            if undo is not None:
                undo()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        comparison = {n: compare_task(task_metrics(n, kinds[n]), orig[n], chai[n]) for n in orig}
        out["points"].append({
            "label": label,
            "origin": mapping.origin,
            "membership": membership,
            "mapping_summary": mapping.summary(),
            "mapping_provenance": mapping.provenance,
            "tasks": {n: _public(r) for n, r in chai.items()},
            "comparison": comparison,
            "average_accuracy_change_points": average_accuracy_change(comparison, kinds),
            "kv_cache": kv,
            "kv_cache_saving_pct": round(100 * (1 - kv["bytes_per_token"] / orig_kv["bytes_per_token"]), 3),
            "kv_context": context_savings(out["original"]["kv_context"], kv_ctx),
            "flops": flops_comparison(model, mapping, kv_tokens),
            "wall_s": round(sum(r["wall_s"] for r in chai.values()), 3),
        })
    return out
