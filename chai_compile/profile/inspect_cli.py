"""`chai-compile inspect`: validate a mapping file (and optionally its fit to a model) and summarise it."""

from __future__ import annotations

import json

import click

from chai_compile.mapping import ClusterMapping


@click.command()
@click.argument("mapping_path", type=click.Path())
@click.option("--model", default=None, help="Also check the mapping's fingerprint against this model.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(mapping_path: str, model: str | None, as_json: bool) -> None:
    """Validate MAPPING_PATH; exit non-zero naming the problem if it is malformed or for another model."""
    from chai_compile.profile.report import savings

    mapping = ClusterMapping.read(mapping_path)
    if model:
        from chai_compile.adapters import adapter_for
        from chai_compile.fingerprint import model_info
        from chai_compile.loading import load_model

        mapping.check_model(model_info(adapter_for(load_model(model).model)))
    summary = savings(mapping)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(f"{mapping_path}: valid chai-compile mapping for {mapping.model.architecture} "
                   f"({mapping.model.num_layers} layers); clusters per layer {summary['clusters_per_layer']}; "
                   f"K-cache -{summary['k_cache_saving_pct']}%, KV-cache -{summary['kv_cache_saving_pct']}%"
                   + (f"; matches {model}" if model else ""))
