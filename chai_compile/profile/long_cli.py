"""`chai-compile profile-long`: span mass per head and layer-to-layer similarity on long windows."""

from __future__ import annotations

import sys

import click

from chai_compile.choices import BUILTIN_CALIBRATION, SPAN_SINKS, SPAN_WINDOWS, DType
from chai_compile.cli_parse import dtype_option, parse_int_list
from chai_compile.errors import CalibrationError, UsageError

STATS_FILE = "long_context.json"


def _ints(text: str, option: str, minimum: int) -> tuple[int, ...]:
    values = parse_int_list(text, option, minimum)
    if not values:
        raise UsageError(f"{option} needs at least one value", fix=f"e.g. {option} 4,16")
    return tuple(sorted(set(values)))


@click.command("profile-long")
@click.argument("model")
@click.option("--calib", default=BUILTIN_CALIBRATION, show_default=True,
              help="Calibration text (.txt/.jsonl or 'builtin'); never an evaluation set.")
@click.option("--samples", default=2, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per window [default: 2048, or the model's positions if fewer].")
@click.option("--sinks", default=",".join(map(str, SPAN_SINKS)), show_default=True, help="Sink-token counts s.")
@click.option("--windows", default=",".join(map(str, SPAN_WINDOWS)), show_default=True, help="Recent-window lengths w.")
@click.option("--threshold", default=0.9, show_default=True,
              help="Mass a head must keep to count as within a span in the summary.")
@click.option("--chunk", default=64, show_default=True, help="Query rows per chunk (memory: L x H x chunk x T).")
@click.option("--seed", default=0, show_default=True)
@dtype_option()
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def profile_long(model: str, calib: str, samples: int, seq_len: int | None, sinks: str, windows: str,
                 threshold: float, chunk: int, seed: int, dtype: DType, device: str, out_dir: str,
                 overwrite: bool) -> None:
    """Long-context profile of MODEL: writes long_context.json, layer_similarity.png, span_mass.png."""
    from chai_compile.fileio import claim_output_dir, write_json

    sink_list, window_list = _ints(sinks, "--sinks", 0), _ints(windows, "--windows", 1)
    for name, v in (("--samples", samples), ("--chunk", chunk), ("--seq-len", seq_len)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1", value=v, fix=f"pass {name} 1 or more")
    if not 0 < threshold <= 1:
        raise UsageError("--threshold must be in (0, 1]", value=threshold, fix="pass e.g. --threshold 0.9")
    with claim_output_dir(out_dir, overwrite) as claim:
        from chai_compile.adapters import adapter_for
        from chai_compile.loading import load_model
        from chai_compile.profile.calibration import build_calibration
        from chai_compile.profile.long_context import LONG_SEQ_LEN, long_context_statistics, plots
        from chai_compile.profile.options import max_positions

        loaded = load_model(model, dtype=dtype, device=device)
        positions = max_positions(loaded.model.config)
        if seq_len is not None and positions is not None and seq_len > positions:
            raise CalibrationError(f"--seq-len {seq_len} is above the model's {positions} positions",
                                   value=seq_len, fix=f"pass --seq-len {positions} or less")
        t = seq_len or min(LONG_SEQ_LEN, positions or LONG_SEQ_LEN)
        ids = build_calibration(loaded.tokenizer, calib, samples, t, seed).input_ids
        stats = long_context_statistics(adapter_for(loaded.model), ids, sinks=sink_list, windows=window_list,
                                        chunk=chunk)
        doc = stats.to_dict()
        doc["summary"] = stats.summary(threshold)
        with claim.stage() as stage:
            command = "chai-compile " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["profile-long"] else None
            write_json(stage / STATS_FILE, {"model": model, "calibration": calib, "command": command, **doc})
            plots(stats, stage)
    s = doc["summary"]
    click.echo(f"{len(ids)} window(s) of {t} tokens; query heads keeping >= {threshold:.0%} of their mass "
               f"(of {s['query_heads']}): " + ", ".join(f"{k}: {v}" for k, v in s["heads_within"].items()))
    click.echo("most similar layers (layer <- source: 1 - TV): " + ", ".join(
        f"{p['layer']}<-{p['source']}: {p['similarity']:.3f}" for p in s["top_layer_pairs"][:5]))
    click.echo(f"wrote {out_dir}/{STATS_FILE}, layer_similarity.png, span_mass.png")
