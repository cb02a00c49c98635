"""`chai-compile plan`: choose shared scores under a budget by measured loss, refit, write the plan."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import click

from chai_compile.choices import BUILTIN_CALIBRATION, DType, Rank, Transform
from chai_compile.cli_parse import dtype_option
from chai_compile.errors import ClusteringError, UsageError
from chai_compile.placement_options import device_map_options, parsed
from chai_compile.plan.options import PlanOptions, Refit

if TYPE_CHECKING:
    from chai_compile.fileio import OutputClaim
    from chai_compile.plan.planner import PlanResult

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "plan.weights.safetensors"


@click.command()
@click.argument("model")
@click.option("--kv-target", type=float, default=None,
              help="Free this fraction of the native KV cache at --context (GQA counted; below 0.5 without spans).")
@click.option("--transforms", default=Transform.CHAI.value, show_default=True,
              help=f"Comma list of {', '.join(Transform.values())}: CHAI K-head drops, span heads (sinks + recent "
                   "window: K and V bounded), shared layers (an earlier layer's probabilities: no K).")
@click.option("--context", type=int, default=None,
              help="Context the saving is stated at (a span saves 1 - (s+w)/context) [default: the model's positions].")
@click.option("--span-mass", default=0.9, show_default=True,
              help="Offer a span only where every query head of its KV head keeps this much attention mass.")
@click.option("--min-layer-similarity", default=0.5, show_default=True,
              help="Offer a shared layer only for sources at this head-mean similarity (1 - TV) or more.")
@click.option("--rank", type=click.Choice(Rank.values()), default=Rank.MEASURED.value, show_default=True,
              help="measured: KL of every candidate by a forward pass; profile: span candidates by the attention "
                   "mass they leave out (no forward pass per candidate; --transforms span only).")
@click.option("--recall-samples", type=int, default=None,
              help="Scoring windows that repeat a passage (far-reaching heads cost KL when bounded). "
                   "Default: 2 with span heads, else 0.")
@click.option("--max-ppl-increase", type=float, default=None,
              help="Stop before calibration perplexity rises by more than this fraction (0.05 = 5%).")
@click.option("--calib", default=BUILTIN_CALIBRATION, show_default=True,
              help="Calibration text (.txt/.jsonl or 'builtin'); WikiText-2 valid is a good choice. Never an eval set.")
@click.option("--samples", default=4, show_default=True, help="Scoring windows: every candidate is measured on these.")
@click.option("--refit-samples", default=32, show_default=True, help="Windows for reconstruction.")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per calibration window [default: 1024, or the model's positions if fewer].")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--per-round", default=4, show_default=True,
              help="K heads accepted per greedy round (fewer: slower, closer to one-at-a-time greedy).")
@click.option("--refit", type=click.Choice([r.value for r in Refit]), default=None,
              help="Reconstruction after the choice: shared queries, W_o, or none; all = both, then distillation "
                   "[default: all for CHAI alone, none with spans or shared layers (not reconstructed yet)].")
@click.option("--query-steps", default=150, show_default=True, help="Adam steps of the shared-query fit.")
@click.option("--distill-steps", default=200, show_default=True,
              help="End-to-end distillation steps of the refit weights after the layer-local refits (0: off).")
@click.option("--distill-batch", default=4, show_default=True, help="Windows per distillation step.")
@click.option("--distill-lr", default=5e-5, show_default=True, help="Adam learning rate of the distillation.")
@click.option("--dense-layers", default="", help="Layers never touched, e.g. 0-1.")
@click.option("--seed", default=0, show_default=True)
@dtype_option()
@click.option("--device", default="cpu", show_default=True)
@device_map_options
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def plan(model: str, kv_target: float | None, transforms: str, context: int | None, span_mass: float,
         min_layer_similarity: float, rank: str, recall_samples: int | None, max_ppl_increase: float | None, calib: str,
         samples: int, refit_samples: int, seq_len: int | None, batch_size: int, per_round: int, refit: str | None,
         query_steps: int, distill_steps: int, distill_batch: int, distill_lr: float, dense_layers: str,
         seed: int, dtype: DType, device: str, device_map: str | None, max_memory: str | None,
         out_dir: str, overwrite: bool) -> None:
    """Plan MODEL under one budget; writes plan.json (+ refit weights), plan_report.{json,md}, plan_rounds.png."""
    from chai_compile.cli_parse import expand_ranges, parse_ranges
    from chai_compile.fileio import claim_output_dir, write_json

    dense = parse_ranges(dense_layers, "--dense-layers")
    chosen = _transforms(transforms)
    chai_only = set(chosen) == {Transform.CHAI}
    opts = PlanOptions(calib=calib, kv_target=kv_target, max_ppl_increase=max_ppl_increase, samples=samples,
                       refit_samples=refit_samples, seq_len=seq_len, batch_size=batch_size, per_round=per_round,
                       refit=Refit(refit or (Refit.ALL if chai_only else Refit.NONE)), query_steps=query_steps,
                       distill_steps=distill_steps, distill_batch=distill_batch, distill_lr=distill_lr, seed=seed,
                       transforms=chosen, context=context, span_mass=span_mass,
                       min_layer_similarity=min_layer_similarity, recall_samples=recall_samples,
                       rank=Rank(rank))
    opts.check()  # budget and sizes before anything heavy is imported or loaded
    placed = parsed(device_map, max_memory)
    with claim_output_dir(out_dir, overwrite) as claim:
        from chai_compile.loading import load_model
        from chai_compile.plan.combined import plan_transforms
        from chai_compile.plan.planner import plan_model
        from chai_compile.plan.report import markdown, rounds_plot
        from chai_compile.plan.weights import write_weights

        loaded = load_model(model, dtype=dtype, device=device, **placed)
        layers = loaded.model.config.num_hidden_layers
        opts = dataclasses.replace(opts, dense_layers=tuple(expand_ranges(dense, layers, "--dense-layers")))
        res = plan_transforms(loaded, opts) if opts.combined else plan_model(loaded, opts)
        r = res.report
        if not r["target_met"]:
            why = (f"within --max-ppl-increase {max_ppl_increase}" if max_ppl_increase is not None
                   else "(no candidate left)")
            raise ClusteringError(
                f"--kv-target {kv_target} cannot be met {why}: the best reachable is "
                f"{100 * r['kv_cache_saving']:.1f}% KV saving",
                fix="lower --kv-target" + (" or raise --max-ppl-increase" if max_ppl_increase is not None else "")
                    + (", or state the context you serve and let span heads share the budget (--transforms "
                       "chai,span,shared --context N)" if chai_only else ""))
        if opts.combined:
            _write_combined(claim, res, model, out_dir)
            return
        with claim.stage() as stage:
            mapping = res.mapping
            if res.weights:
                mapping = dataclasses.replace(mapping, weights=write_weights(res.weights, stage / WEIGHTS_FILE))
            mapping.write(stage / PLAN_FILE)
            report = {"model": model, "summary": mapping.summary(), **r}
            write_json(stage / "plan_report.json", report)
            (stage / "plan_report.md").write_text(markdown(report))
            rounds_plot(report, stage / "plan_rounds.png")
    click.echo(f"K heads dropped: {r['k_heads_dropped']}/{r['k_heads_total']} "
               f"(KV cache -{100 * r['kv_cache_saving']:.1f}%)")
    for name, st in r["stages"].items():
        click.echo(f"{name:>9}: calibration KL {st['kl']:.4f}, perplexity {st['ppl']:.3f} "
                   f"(original {r['original']['ppl']:.3f})" + ("" if st.get("kept", True) else " -- not kept"))
    click.echo(f"wrote {out_dir}/{PLAN_FILE}" + (f", {WEIGHTS_FILE}" if res.weights else "")
               + f", plan_report.json, plan_report.md, plan_rounds.png ({r['total_s']:.0f} s)")


def _transforms(text: str) -> tuple[Transform, ...]:
    try:
        return tuple(Transform.parse(t.strip(), "--transforms name") for t in text.split(","))  # type: ignore[misc]
    except ValueError as e:
        raise UsageError(str(e), fix=f"pass a comma list of {', '.join(Transform.values())}") from None


def _write_combined(claim: OutputClaim, res: PlanResult, model: str, out_dir: str) -> None:
    """The combined planner's outputs: plan.json (v3, no weights), plan_report.{json,md}, plan_rounds.png."""
    from chai_compile.fileio import write_json
    from chai_compile.plan.report import transforms_markdown, transforms_plot

    r = res.report
    with claim.stage() as stage:
        res.mapping.write(stage / PLAN_FILE)
        report = {"model": model, "summary": res.mapping.summary(), **r}
        write_json(stage / "plan_report.json", report)
        (stage / "plan_report.md").write_text(transforms_markdown(report))
        transforms_plot(report, stage / "plan_rounds.png")
    kinds = ", ".join(f"{v} {k}" for k, v in r["layer_kinds"].items() if v)
    click.echo(f"KV cache -{100 * r['kv_cache_saving']:.1f}% at {r['budget']['context']} tokens ({kinds} layers; "
               f"{r['span_kv_heads']} span KV heads); calibration KL {r['stages']['selected']['kl']:.4f}, "
               f"perplexity {r['stages']['selected']['ppl']:.3f} (original {r['original']['ppl']:.3f})")
    click.echo(f"wrote {out_dir}/{PLAN_FILE}, plan_report.json, plan_report.md, plan_rounds.png ({r['total_s']:.0f} s)")
