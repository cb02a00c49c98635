"""`chai-compile verify` (original vs CHAI, side by side) and `chai-compile sweep` (trade-off curve)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chai_compile.choices import DType, Membership
from chai_compile.cli_parse import choice_option, dtype_option, parse_int_list
from chai_compile.errors import MappingError, UsageError, ValidationFailed
from chai_compile.fileio import claim_output_dir
from chai_compile.placement_options import device_map_options, parsed


def _log(msg: str) -> None:
    click.echo(f"chai-compile: {msg}", err=True)


def _eval_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by verify and sweep (applied bottom-up, so listed here in reverse help order)."""
    options = [
        click.option("--tasks", "tasks_text", default=None,
                     help="Comma list of tasks or 'all' (default: all, or only the --task ones). Tasks: piqa, "
                          "hellaswag, arc_easy, arc_challenge, boolq, copa, openbookqa, lambada, wikitext2; "
                          "long context (not in 'all'): wikitext2-4k (4096-token windows), passkey."),
        click.option("--task", "task_files", multiple=True, metavar="NAME=PATH",
                     help="Evaluate a file in task NAME's format (repeatable); PATH may be hf:[ID[:CONFIG][@SPLIT]] "
                          "for a Hugging Face dataset."),
        click.option("--data-dir", default=None, type=click.Path(),
                     help="Folder of the shared eval files (default: $CHAI_COMPILE_EVAL_DATA or ../shared/data/eval)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="First N items per task (windows for perplexity tasks)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        choice_option("--membership", enum=Membership, default=Membership.STATIC,
                      help="static: the frozen mapping; dynamic: clusters chosen per request from the first 5 tokens."),
        click.option("--window", type=click.IntRange(min=2), default=1024, show_default=True,
                     help="Perplexity window in tokens (capped at the model's context)."),
        click.option("--stride", type=click.IntRange(min=1), default=None,
                     help="Perplexity window stride [default: window/2]."),
        click.option("--kv-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Prefill length for the measured KV-cache bytes."),
        click.option("--kv-decode", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Greedy decode steps after that prefill before the cache is measured (a generation)."),
        click.option("--kv-context", "kv_context_text", default=None, metavar="N,N,...",
                     help="Also measure the KV-cache bytes after a prefill of each length, e.g. 4096,8192."),
        click.option("--passkey-lengths", "passkey_text", default=None, metavar="N,N,...",
                     help="Context lengths of the passkey task, e.g. 1k,2k [default: 1k,2k,4k,8k capped at the "
                          "model's positions; stated lengths above them are refused]."),
        dtype_option(),
        click.option("--device", default="cpu", show_default=True),
        click.option("--overwrite", is_flag=True, help="Replace an existing output directory."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _tasks(tasks_text: str | None, task_files: tuple[str, ...], data_dir: str | None,
           passkey_lengths: tuple[int, ...] | None = None):
    from chai_compile.verify.tasks import parse_task_list, parse_task_option, resolve_tasks

    overrides = dict(parse_task_option(t) for t in task_files)
    names = parse_task_list(tasks_text) if tasks_text else ([] if overrides else parse_task_list("all"))
    return resolve_tasks(names, overrides, data_dir, passkey_lengths)


def _long_tasks(tasks_text: str | None, task_files: tuple[str, ...], data_dir: str | None,
                passkey_text: str | None, kv_context_text: str | None):
    """The tasks, with the passkey lengths and the KV contexts parsed (shared by verify and sweep)."""
    from chai_compile.verify.passkey import parse_lengths

    passkey_lengths = parse_lengths(passkey_text, "--passkey-lengths") if passkey_text else None
    kv_context = parse_lengths(kv_context_text, "--kv-context", UsageError) if kv_context_text else ()
    tasks = _tasks(tasks_text, task_files, data_dir, passkey_lengths)
    if passkey_lengths and not any(t.kind == "passkey" for t in tasks):
        _log("--passkey-lengths has no effect without --tasks passkey")
    return tasks, passkey_lengths, kv_context


def _check_out(out_dir: str | None, overwrite: bool) -> None:
    """Check and lock --out before the expensive part; click releases the lock when the command ends."""
    if out_dir:
        click.get_current_context().with_resource(claim_output_dir(out_dir, overwrite))


def _write_outputs(out_dir: str, overwrite: bool, name: str, result: dict, md: str, plot) -> None:
    """NAME.json, NAME.md and NAME.png (and passkey.png when passkey ran), written into a staged directory
    renamed into place."""
    from chai_compile.fileio import staged_output_dir
    from chai_compile.verify.long_context import passkey_plot
    from chai_compile.verify.report import dumps

    with staged_output_dir(out_dir, overwrite) as stage:
        (stage / f"{name}.json").write_text(dumps(result))
        (stage / f"{name}.md").write_text(md)
        plot(result, stage / f"{name}.png")
        heatmap = passkey_plot(result, stage / "passkey.png")
    _log(f"wrote {out_dir}/{name}.json, {name}.md, {name}.png" + (", passkey.png" if heatmap else ""))


@click.command()
@click.argument("model")
@click.option("--mapping", "mapping_path", default=None, type=click.Path(),
              help="Cluster mapping (mapping.json from `profile`). Without it only the original is evaluated.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="Exit 1 if an accuracy falls more than X points, or a perplexity rises more than X %.")
@click.option("--out", "out_dir", default=None, type=click.Path(),
              help="Write verify.json, verify.md and verify.png here (must not exist).")
@_eval_options
@device_map_options
def verify(model: str, mapping_path: str | None, max_drop: float | None, out_dir: str | None, tasks_text: str | None,
           task_files: tuple[str, ...], data_dir: str | None, limit: int | None, batch_size: int,
           membership: Membership, window: int, stride: int | None, kv_tokens: int, kv_decode: int,
           kv_context_text: str | None, passkey_text: str | None, dtype: DType, device: str, overwrite: bool,
           as_json: bool, device_map: str | None = None, max_memory: str | None = None) -> None:
    """Evaluate MODEL and its CHAI rewrite side by side: task accuracy, perplexity, KV-cache bytes, FLOPs, time.

    MODEL may also be an export directory: the artifact is then checked against its PyTorch source
    (logits, greedy tokens, and --tasks run through ONNX Runtime), as `chai-compile verify-artifact`."""
    from chai_compile.verify.artifact import GREEDY_STEPS, check_artifact, is_artifact

    if is_artifact(model):
        if mapping_path:
            raise MappingError("--mapping is not used with an export directory (its mapping.json is)",
                              value=mapping_path, fix="drop --mapping")
        check_artifact(model, None, tasks_text, limit, GREEDY_STEPS, as_json, out_dir, overwrite)
        return
    from chai_compile.loading import load_model
    from chai_compile.mapping import ClusterMapping
    from chai_compile.verify.compare import max_drop_violations
    from chai_compile.verify.report import dumps, verify_markdown, verify_plot

    placed = parsed(device_map, max_memory)
    _check_out(out_dir, overwrite)
    tasks, passkey_lengths, kv_context = _long_tasks(tasks_text, task_files, data_dir, passkey_text, kv_context_text)
    mapping = ClusterMapping.read(mapping_path) if mapping_path else None
    if max_drop is not None and mapping is None:
        _log("--max-drop has no effect without --mapping")
    loaded = load_model(model, dtype, device, **placed)

    from chai_compile.verify.compare import compare_loaded

    core = compare_loaded(loaded, [(Path(mapping_path).stem, mapping)] if mapping else [], tasks,
                          membership=membership, limit=limit, batch_size=batch_size, window=window, stride=stride,
                          kv_tokens=kv_tokens, kv_decode=kv_decode, kv_context=kv_context, log=_log)
    result: dict[str, Any] = {
        "model": model, "mapping_path": mapping_path, "membership": membership,
        "settings": {"limit": limit, "batch_size": batch_size, "dtype": dtype, "device": device,
                     "window": window, "stride": stride, "kv_tokens": kv_tokens, "kv_decode": kv_decode,
                     "passkey_lengths": passkey_lengths, "kv_context": list(kv_context),
                     "device_map": device_map, "max_memory": max_memory},
        **core,
    }
    violations: list[str] = []
    if max_drop is not None and mapping is not None:
        kinds = {t: i["kind"] for t, i in core["task_info"].items()}
        violations = max_drop_violations(core["points"][0]["comparison"], kinds, max_drop)
        result["max_drop"] = {"threshold": max_drop, "violations": violations}

    md = verify_markdown(result)
    if out_dir:
        _write_outputs(out_dir, overwrite, "verify", result, md, verify_plot)
    click.echo(dumps(result) if as_json else md, nl=False)
    if violations:
        raise ValidationFailed(f"CHAI exceeds --max-drop {max_drop:g}: " + "; ".join(violations))


@click.command()
@click.argument("model")
@click.option("--profile", "profile_dir", default=None, type=click.Path(),
              help="A `chai-compile profile` output directory (mapping.json + profile.json); mappings are derived "
                   "from its similarity at every --clusters x --dense-prefix budget without re-running the model.")
@click.option("--clusters", "clusters_text", default="2,3,4,6", show_default=True,
              help="Clusters per clustered layer, comma list (with --profile).")
@click.option("--dense-prefix", "dense_text", default="0,4,8", show_default=True,
              help="Number of leading layers kept dense, comma list (with --profile).")
@click.option("--no-default", is_flag=True, help="Leave out the profile directory's own mapping (knee budget).")
@click.option("--mappings", "mapping_paths", multiple=True, type=click.Path(),
              help="Extra mapping files or directories of them (repeatable); each is one point of the curve.")
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Write sweep.json, sweep.md and sweep.png here (must not exist).")
@_eval_options
def sweep(model: str, profile_dir: str | None, clusters_text: str, dense_text: str, no_default: bool,
          mapping_paths: tuple[str, ...], out_dir: str, tasks_text: str | None, task_files: tuple[str, ...],
          data_dir: str | None, limit: int | None, batch_size: int, membership: Membership, window: int,
          stride: int | None, kv_tokens: int, kv_decode: int, kv_context_text: str | None, passkey_text: str | None,
          dtype: DType, device: str, overwrite: bool, as_json: bool) -> None:
    """Verify mappings of MODEL at several budgets and plot measured KV-cache saving against accuracy change.

    The original is evaluated once; each mapping is applied to a copy and scored on the same requests.
    """
    from chai_compile.errors import MappingError
    from chai_compile.verify.report import dumps, sweep_markdown, sweep_plot
    from chai_compile.verify.sweep import collect_mappings, mappings_from_profile
    from chai_compile.verify.sweep import sweep as run_sweep

    _check_out(out_dir, overwrite)
    if not profile_dir and not mapping_paths:
        raise MappingError("sweep needs mappings", fix="pass --profile PROFILE_DIR and/or --mappings FILE_OR_DIR")
    tasks, _, kv_context = _long_tasks(tasks_text, task_files, data_dir, passkey_text, kv_context_text)
    mappings = []
    if profile_dir:
        mappings += mappings_from_profile(profile_dir, parse_int_list(clusters_text, "--clusters", minimum=1),
                                          parse_int_list(dense_text, "--dense-prefix", minimum=0),
                                          include_default=not no_default)
    if mapping_paths:
        mappings += collect_mappings(mapping_paths)
    _log(f"sweeping {len(mappings)} mappings: {', '.join(label for label, _ in mappings)}")
    result = run_sweep(model, mappings, tasks, limit, batch_size=batch_size, membership=membership, dtype=dtype,
                       device=device, window=window, stride=stride, kv_tokens=kv_tokens, kv_decode=kv_decode,
                       kv_context=kv_context, log=_log)
    if profile_dir:
        result["profile_dir"] = profile_dir
    md = sweep_markdown(result)
    _write_outputs(out_dir, overwrite, "sweep", result, md, sweep_plot)
    click.echo(dumps(result) if as_json else md, nl=False)
