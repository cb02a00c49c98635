"""`plan_transforms`: CHAI, span heads and shared layers chosen together under one KV budget at a context.

Calibration windows -> long-context statistics (span mass per head on running text and on the repeated
rows of passage-repeat windows, layer similarity on running text: they seed and prune the candidates) ->
greedy choice by measured KL per cached token freed (`transforms.TransformSelector`) -> a v3 plan. No
reconstruction: refit weights are for CHAI-only plans.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

import torch

from chai_compile import __version__
from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind, Rank, Transform
from chai_compile.errors import ClusteringError
from chai_compile.fingerprint import model_info
from chai_compile.loading import LoadedModel
from chai_compile.mapping import ClusterMapping
from chai_compile.plan.budget import kv_saving
from chai_compile.plan.options import PlanOptions
from chai_compile.plan.planner import PlanResult
from chai_compile.plan.select import Scorer, head_errors
from chai_compile.plan.shared_scores import planning_modules
from chai_compile.plan.transforms import TransformSelector
from chai_compile.profile.calibration import build_calibration, build_recall, recall_passage
from chai_compile.profile.long_context import LONG_SEQ_LEN, long_context_statistics
from chai_compile.profile.options import max_positions
from chai_compile.profile.spans import SINKS, WINDOWS


def plan_transforms(loaded: LoadedModel, opts: PlanOptions, progress: bool = True) -> PlanResult:
    model = loaded.model.eval()
    adapter = adapter_for(model)
    info = model_info(adapter)
    spec = adapter.spec
    opts.check(spec.num_layers)
    positions = max_positions(model.config)
    context = opts.context_for(positions)
    t0 = time.perf_counter()
    seq_len = opts.window(positions, cap=context, default=LONG_SEQ_LEN)  # spans need long windows
    calib = build_calibration(loaded.tokenizer, opts.calib, opts.samples, seq_len, opts.seed)
    scoring = calib.input_ids
    recall = None
    if opts.recall_windows:
        recall = build_recall(loaded.tokenizer, opts.calib, opts.recall_windows, seq_len, opts.seed + 1)
        scoring = torch.cat([scoring, recall.input_ids])
    windows = tuple(w for w in WINDOWS if w < seq_len) or (seq_len // 2,)
    stats = long_context_statistics(adapter, calib.input_ids, sinks=SINKS, windows=windows, progress=progress)
    if recall is not None:  # kept mass on the repeated rows only: where far-reading heads show themselves
        stats.recall_mass = long_context_statistics(adapter, recall.input_ids, sinks=SINKS, windows=windows,
                                                    progress=progress, from_row=recall_passage(seq_len)).span_mass
    scorer = Scorer(model, scoring, opts.batch_size)
    base_kl, base_ppl = scorer.measure()
    max_ppl = None if opts.max_ppl_increase is None else base_ppl * (1 + opts.max_ppl_increase)
    target = opts.kv_target if opts.kv_target is not None else 1.0
    with planning_modules(adapter) as mods:
        # which kept head a head without its K borrows scores from: CHAI candidates only (a forward pass)
        errors = head_errors(model, mods, scoring, opts.batch_size) if Transform.CHAI in opts.transforms else \
            torch.zeros(spec.num_layers, spec.num_heads, spec.num_heads, dtype=torch.float64)
        sel = TransformSelector(mods, errors, stats, context=context, window=seq_len, transforms=opts.transforms,
                                span_mass=opts.span_mass, min_similarity=opts.min_layer_similarity,
                                frozen=opts.dense_layers)
        reachable = sel.reachable()
        if opts.kv_target is not None and reachable < opts.kv_target:
            raise ClusteringError(
                f"--kv-target {opts.kv_target} cannot be met at --context {context} with "
                f"--transforms {','.join(opts.transforms)}: the best reachable is {100 * reachable:.1f}% KV saving",
                fix=f"pass --kv-target {reachable:.3f} or less, add transforms, or lower --span-mass / "
                    "--min-layer-similarity")
        steps = sel.run_profile(scorer, target, (base_kl, base_ppl)) if opts.rank == Rank.PROFILE else \
            sel.run(scorer, target, opts.per_round, max_ppl, progress=progress)
        layers = [sel.layer_mapping(i) for i in range(spec.num_layers)]
    mapping = ClusterMapping.build(info, layers, _provenance(opts, calib, context))
    saving = kv_saving(mapping, context)
    kinds = {k.value: sum(lm.kind == k for lm in mapping.layers) for k in LayerKind}
    report = {
        "model": info.architecture,
        "planner": "profile-mass-spans" if opts.rank == Rank.PROFILE else "measured-kl-greedy-transforms",
        "budget": {"kv_target": opts.kv_target, "max_ppl_increase": opts.max_ppl_increase, "context": context,
                   "transforms": [str(t) for t in opts.transforms]},
        "kv_cache_saving": saving, "target_met": opts.kv_target is None or saving >= opts.kv_target - 1e-9,
        "best_reachable_bound": reachable, "layer_kinds": kinds,
        "span_kv_heads": sum(sum(1 for g in range(spec.num_kv_heads)
                                 if all(sp is not None for sp in lm.spans[g * spec.group_size:
                                                                          (g + 1) * spec.group_size]))
                             for lm in mapping.layers if lm.kind == LayerKind.SPAN),
        "calibration": {"source": calib.source, "tokens_sha256": calib.sha256, "windows": len(scoring),
                        "scoring_windows": len(scoring), "seq_len": seq_len,
                        "recall_windows": 0 if recall is None else len(recall.input_ids),
                        "recall_tokens_sha256": None if recall is None else recall.sha256},
        "statistics": stats.summary(opts.span_mass),
        "original": {"kl": base_kl, "ppl": base_ppl},
        "rounds": [dataclasses.asdict(s) for s in steps],
        "stages": {"selected": {"kl": steps[-1].kl, "ppl": steps[-1].ppl}},
        "total_s": round(time.perf_counter() - t0, 2),
    }
    return PlanResult(mapping, {}, report)


def _provenance(opts: PlanOptions, calib: Any, context: int) -> dict[str, Any]:
    settings = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(opts).items()
                if k != "calib"}
    settings["transforms"] = [str(t) for t in opts.transforms]
    settings["context"] = context
    return {"tool": "chai-compile", "tool_version": __version__, "planner": "measured-kl-greedy-transforms",
            "calibration": {"source": calib.source, "tokens_sha256": calib.sha256}, "settings": settings}
