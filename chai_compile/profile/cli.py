"""`chai-compile profile`: measure head redundancy and freeze a cluster mapping."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from chai_compile.choices import FEATURES, METHODS, REPRESENTATIVES, DType
from chai_compile.cli_parse import dtype_option, expand_ranges, parse_int_list, parse_ranges
from chai_compile.errors import UsageError
from chai_compile.placement_options import device_map_options, parsed


def _clusters(text: str | None) -> int | list[int] | None:
    if text is None or text.strip() == "auto":
        return None
    values = parse_int_list(text, "--clusters")
    return values[0] if len(values) == 1 and "," not in text else values


def _layers_and_heads(config) -> tuple[int | None, int | None]:
    return getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)


def _placement(model) -> dict:
    from chai_compile.device_map import placement

    where = placement(model)
    return {"placement": where} if where else {}


@click.command()
@click.argument("model")
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration text: .txt or .jsonl file, or 'builtin' (offline corpus shipped with Python).")
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--samples", default=32, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--first-n", default=5, show_default=True, help="Tokens in the first-N attention maps.")
@click.option("--rows", "rows_per_sample", default=16, show_default=True,
              help="Sampled query rows per sequence.")
@click.option("--features", type=click.Choice(FEATURES), default="rows", show_default=True,
              help="Which attention features decide clusters.")
@click.option("--method", type=click.Choice(METHODS), default="agglomerative", show_default=True)
@click.option("--clusters", default="auto", show_default=True,
              help="'auto' (knee per layer), one count for all layers, or a comma list per layer.")
@click.option("--kv-target", type=float, default=None,
              help="Free this fraction of the KV cache (0-0.5) by dropping the best-covered K heads "
                   "anywhere in the model; overrides --clusters.")
@click.option("--dense-layers", default="", help="Layers left dense, e.g. 0-3,7.")
@click.option("--representative", type=click.Choice(REPRESENTATIVES), default="auto", show_default=True,
              help="auto = kv-min for GQA models, medoid otherwise.")
@dtype_option()
@click.option("--device", default="cpu", show_default=True)
@device_map_options
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def profile(model: str, calib: str, text_field: str, samples: int, seq_len: int, seed: int, batch_size: int,
            first_n: int, rows_per_sample: int, features: str, method: str, clusters: str, kv_target: float | None,
            dense_layers: str,
            representative: str, dtype: DType, device: str, device_map: str | None, max_memory: str | None,
            out_dir: str,
            overwrite: bool, as_json: bool) -> None:
    """Profile MODEL (hub id, directory, .gguf, or smollm2-135m) and write a cluster mapping + report."""

    from chai_compile.fileio import claim_output_dir, write_json
    from chai_compile.profile.options import ProfileOptions, check_options, check_static, max_positions

    dense = parse_ranges(dense_layers, "--dense-layers")  # expanded only once checked against the model
    opts = ProfileOptions(calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                          first_n=first_n, rows_per_sample=rows_per_sample, text_field=text_field,
                          features=features, method=method, clusters=_clusters(clusters), representative=representative,
                          kv_target=kv_target)
    check_static(opts)
    placed = parsed(device_map, max_memory)
    with claim_output_dir(out_dir, overwrite) as claim:  # locked before anything heavy is imported or loaded
        from chai_compile.loading import load_model, peek_config
        from chai_compile.profile.measure import profile_model
        from chai_compile.profile.report import markdown, plots, savings

        config = peek_config(model)
        if config is not None:  # sizes checked from config.json, before the weights are loaded
            layers, heads = _layers_and_heads(config)
            if layers and heads:
                check_options(dataclasses.replace(opts, dense_layers=expand_ranges(dense, layers, "--dense-layers")),
                              layers, heads, max_positions(config))
        loaded = load_model(model, dtype=dtype, device=device, **placed)
        layers, _ = _layers_and_heads(loaded.model.config)
        if dense and not layers:
            raise UsageError("--dense-layers: the model's config does not say how many layers it has",
                             fix="drop --dense-layers")
        opts = dataclasses.replace(opts, dense_layers=expand_ranges(dense, layers or 0, "--dense-layers"))
        data, mapping = profile_model(loaded, opts)
        used = data.calibration["samples"]
        if used < samples:
            click.echo(f"chai-compile: warning: the calibration text holds {used} sequences of {seq_len} tokens; "
                       f"using {used} of the {samples} requested by --samples", err=True)
        summary = savings(mapping, context=seq_len)
        with claim.stage() as stage:
            mapping.write(stage / "mapping.json")
            write_json(stage / "profile.json", {"model": model, "summary": summary, "profile": data.to_dict(),
                                                **_placement(loaded.model)})
            (stage / "report.md").write_text(markdown(summary, mapping, f"chai-compile profile: {model}"))
            plots(stage, data.similarity[features], data.sse, data.knee, mapping)
    if as_json:
        click.echo(json.dumps({"out": out_dir, "summary": summary, "timings": data.timings}, indent=1))
    else:
        click.echo(f"clusters per layer: {summary['clusters_per_layer']}", err=False)
        click.echo(f"K-cache heads kept: {summary['k_heads_kept']}/{summary['k_heads_total']} "
                   f"(K-cache -{summary['k_cache_saving_pct']}%, total KV-cache -{summary['kv_cache_saving_pct']}%)")
        click.echo(f"Q/K projection FLOPs -{summary['qk_projection_flops_per_token']['saving_pct']}%, "
                   f"score FLOPs -{summary['score_flops_per_token']['saving_pct']}%")
        click.echo(f"capture {data.timings['capture_s']:.1f} s, peak RSS {data.timings['peak_rss_mb']:.0f} MB")
        click.echo(f"wrote {out_dir}/mapping.json, profile.json, report.md, *.png", file=sys.stdout)
