"""`plan_model`: budget -> measured-loss choice of shared scores -> reconstruction -> plan and weights."""

from __future__ import annotations

import dataclasses
import enum
import math
import resource
import time
from typing import Any

import torch

from chai_compile import __version__
from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.device_map import peak_memory_mb, placement, reset_peaks
from chai_compile.errors import ClusteringError
from chai_compile.fingerprint import model_info
from chai_compile.loading import LoadedModel
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
from chai_compile.plan.distill import distill
from chai_compile.plan.options import PlanOptions, Refit
from chai_compile.plan.refit import refit_output, refit_queries
from chai_compile.plan.select import Scorer, head_errors, select
from chai_compile.plan.shared_scores import SharedScoresAttention, planning_modules
from chai_compile.plan.weights import LayerWeights, PlanWeights
from chai_compile.profile.calibration import build_calibration
from chai_compile.profile.options import max_positions


@dataclasses.dataclass
class PlanResult:
    mapping: ClusterMapping
    weights: PlanWeights
    report: dict[str, Any]


def plan_model(loaded: LoadedModel, opts: PlanOptions, progress: bool = True) -> PlanResult:
    model = loaded.model.eval()
    adapter = adapter_for(model)
    info = model_info(adapter)
    spec = adapter.spec
    opts.check(spec.num_layers)
    reset_peaks()
    t0 = time.perf_counter()
    positions = max_positions(model.config)
    # CHAI's saving does not depend on the context; a stated one is checked and caps the window.
    seq_len = opts.window(positions, cap=opts.context_for(positions) if opts.context is not None else None)
    calib = build_calibration(loaded.tokenizer, opts.calib, max(opts.samples, opts.refit_samples), seq_len, opts.seed)
    windows = calib.input_ids
    scoring = windows[: opts.samples]
    total_k = spec.num_layers * spec.num_kv_heads
    reachable = opts.reachable_k_heads(spec.num_layers, spec.num_kv_heads)
    to_drop = math.ceil(opts.kv_target * 2 * total_k - 1e-9) if opts.kv_target is not None else reachable
    if to_drop > reachable:
        raise ClusteringError(
            f"--kv-target {opts.kv_target} cannot be met: every clustered layer keeps at least one K head, so the "
            f"best reachable is {100 * reachable / (2 * total_k):.1f}% KV saving",
            fix=f"pass --kv-target {reachable / (2 * total_k):.3f} or less, or keep fewer --dense-layers")
    scorer = Scorer(model, scoring, opts.batch_size)  # the original's reference, before any swap
    base_kl, base_ppl = scorer.measure()
    max_ppl = None if opts.max_ppl_increase is None else base_ppl * (1 + opts.max_ppl_increase)
    stages: dict[str, Any] = {}
    with planning_modules(adapter) as mods:
        errors = head_errors(model, mods, scoring, opts.batch_size)
        rounds = select(model, adapter, mods, scorer, errors, k_heads_to_drop=to_drop, per_round=opts.per_round,
                        max_ppl=max_ppl, frozen_layers=opts.dense_layers, progress=progress)
        t_select = time.perf_counter() - t0
        # The last round already measured the selected plan; no second pass over the scoring windows.
        stages["selected"] = {"kl": rounds[-1].kl, "ppl": rounds[-1].ppl, "elapsed_s": round(t_select, 2)}
        if opts.refit in (Refit.QUERIES, Refit.ALL):
            fitted = refit_queries(model, mods, windows, opts.batch_size, steps=opts.query_steps, progress=progress)
            stages["queries"] = _keep_if_better(scorer, stages, mods, ("q_weight", "q_bias"), t0, fitted=fitted)
        if opts.refit in (Refit.OUTPUT, Refit.ALL):
            fitted = refit_output(model, mods, windows, opts.batch_size, progress=progress)
            stages["output"] = _keep_if_better(scorer, stages, mods, ("o_weight",), t0, fitted=fitted)
        if opts.refit == Refit.ALL and opts.distill_steps > 0:
            run = distill(model, mods, windows[opts.samples :], scoring, opts.distill_batch, opts.distill_steps,
                          lr=opts.distill_lr, progress=progress)
            stages["distill"] = _stage(scorer, time.perf_counter() - t0, kept=run["kept_step"] > 0, **run)
        mapping = _mapping(info, mods, spec.group_size, opts, calib)
        weights = _weights(mods)
    dropped = rounds[-1].k_heads_dropped
    report = {
        "model": info.architecture, "budget": {"kv_target": opts.kv_target, "max_ppl_increase": opts.max_ppl_increase},
        "k_heads_dropped": dropped, "k_heads_total": total_k, "kv_cache_saving": dropped / (2 * total_k),
        "target_met": opts.kv_target is None or dropped >= to_drop,
        "calibration": {"source": calib.source, "tokens_sha256": calib.sha256, "windows": len(windows),
                        "scoring_windows": len(scoring), "seq_len": seq_len},
        "original": {"kl": base_kl, "ppl": base_ppl},
        "rounds": [dataclasses.asdict(r) for r in rounds], "stages": stages,
        "select_s": round(t_select, 2), "total_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **({"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if torch.cuda.is_available() else {}),
        "peak_mb": peak_memory_mb(), "placement": placement(model),  # per device, for models spread over several
    }
    return PlanResult(mapping, weights, report)


def _stage(scorer: Scorer, elapsed: float, **extra: Any) -> dict[str, Any]:
    kl, ppl = scorer.measure()
    return {"kl": kl, "ppl": ppl, "elapsed_s": round(elapsed, 2), **extra}


def _keep_if_better(scorer: Scorer, stages: dict[str, Any], mods: list[SharedScoresAttention],
                    fields: tuple[str, ...], t0: float, fitted: int) -> dict[str, Any]:
    """Measure a correction; undo it when it does not lower the calibration KL (it must pay to be kept)."""
    before = [s for s in stages.values() if s.get("kept", True)][-1]
    stage = _stage(scorer, time.perf_counter() - t0, fitted=fitted)
    stage["kept"] = stage["kl"] < before["kl"]
    if not stage["kept"]:
        for m in mods:
            for f in fields:
                setattr(m, f, None)
    return stage


def _mapping(info, mods: list[SharedScoresAttention], group: int, opts: PlanOptions, calib) -> ClusterMapping:
    layers = []
    for m in mods:
        if m.source == list(range(m.num_heads)):
            layers.append(LayerMapping(m.layer, LayerKind.DENSE))
            continue
        clusters: dict[int, list[int]] = {}
        for h, r in enumerate(m.source):
            clusters.setdefault(r, []).append(h)
        groups = tuple(Cluster(tuple(hs), r) for r, hs in clusters.items())
        layers.append(LayerMapping(m.layer, LayerKind.CLUSTERED, groups))
    settings = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(opts).items()
                if k != "calib"}
    provenance = {"tool": "chai-compile", "tool_version": __version__, "planner": "measured-kl-greedy",
                  "calibration": {"source": calib.source, "tokens_sha256": calib.sha256}, "settings": settings}
    return ClusterMapping.build(info, layers, provenance)


def _weights(mods: list[SharedScoresAttention]) -> PlanWeights:
    out: PlanWeights = {}
    for m in mods:
        lw = LayerWeights()
        if m.q_weight is not None:
            d = m.head_dim
            for h in m.refit_heads:
                lw.q_rows[h] = (m.q_weight[h * d : (h + 1) * d].detach().clone(),
                                None if m.q_bias is None else m.q_bias[h * d : (h + 1) * d].detach().clone())
        if m.o_weight is not None:
            lw.o_weight = m.o_weight.detach().clone()
        if lw.q_rows or lw.o_weight is not None:
            out[m.layer] = lw
    return out
