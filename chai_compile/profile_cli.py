"""`chai-compile profile`: measure head redundancy and freeze a cluster mapping."""

from __future__ import annotations

import json
import sys

import click

from chai_compile.clustering import METHODS, REPRESENTATIVES
from chai_compile.errors import ClusteringError
from chai_compile.fileio import check_output_dir, staged_output_dir, write_json
from chai_compile.profile import FEATURES, ProfileOptions, profile_model


def _int_list(text: str | None, what: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    if not text:
        return []
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ClusteringError(f"{what} must be integers or ranges like 0-3,7", value=text) from None
    return out


def _clusters(text: str | None) -> int | list[int] | None:
    if text is None or text == "auto":
        return None
    values = _int_list(text, "--clusters")
    return values[0] if len(values) == 1 and "," not in text else values


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
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--device-map", default=None, help="'auto' spreads a large model over GPUs (accelerate).")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def profile(model: str, calib: str, text_field: str, samples: int, seq_len: int, seed: int, batch_size: int,
            first_n: int, rows_per_sample: int, features: str, method: str, clusters: str, kv_target: float | None,
            dense_layers: str,
            representative: str, dtype: str, device: str, device_map: str | None, out_dir: str,
            overwrite: bool, as_json: bool) -> None:
    """Profile MODEL (hub id, directory, .gguf, or smollm2-135m) and write a cluster mapping + report."""

    from chai_compile.loading import load_model
    from chai_compile.report import markdown, plots, savings

    opts = ProfileOptions(calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                          first_n=first_n, rows_per_sample=rows_per_sample, text_field=text_field,
                          features=features, method=method, clusters=_clusters(clusters),
                          dense_layers=_int_list(dense_layers, "--dense-layers"), representative=representative,
                          kv_target=kv_target)
    check_output_dir(out_dir, overwrite)  # fail before the expensive part
    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
    data, mapping = profile_model(loaded, opts)
    summary = savings(mapping, context=seq_len)
    with staged_output_dir(out_dir, overwrite=overwrite) as stage:
        mapping.write(stage / "mapping.json")
        write_json(stage / "profile.json", {"model": model, "summary": summary, "profile": data.to_dict()})
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
