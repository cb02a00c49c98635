"""`verify-artifact` (and `verify EXPORT_DIR`): an export directory against the PyTorch model it came from.

Every file is checked against the sealed manifest first; then logits, greedy tokens and, on request,
task accuracy through ONNX Runtime against PyTorch. It lives in the verify stage, which may import export;
export never imports verify.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from chai_compile.choices import GREEDY_STEPS, DType
from chai_compile.errors import ExportError, ValidationFailed
from chai_compile.fileio import claim_output_dir


@click.command("verify-artifact")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_spec", default=None, help="PyTorch model (default: the manifest's source).")
@click.option("--tasks", "tasks_text", default=None, help="Comma-separated task names run through ONNX Runtime.")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--steps", type=click.IntRange(min=1), default=GREEDY_STEPS, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", "out", default=None, type=click.Path(), help="Write verify-artifact.json and .md here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def verify_artifact(artifact: str, model_spec: str | None, tasks_text: str | None, limit: int | None, steps: int,
                    as_json: bool, out: str | None, overwrite: bool) -> None:
    """Check an export directory against PyTorch: logits, greedy tokens, and tasks through ONNX Runtime.

    `chai-compile verify ARTIFACT_DIR` runs the same check; this command adds --model and --steps."""
    check_artifact(artifact, model_spec, tasks_text, limit, steps, as_json, out, overwrite)


def is_artifact(path: str) -> bool:
    """An export directory (what `chai-compile export` writes), as opposed to a model spec."""
    return (Path(path) / "manifest.json").is_file()


def check_artifact(artifact: str, model_spec: str | None, tasks_text: str | None, limit: int | None, steps: int,
                   as_json: bool, out: str | None, overwrite: bool) -> None:
    """Validate ARTIFACT against PyTorch, write the report, exit non-zero (ValidationFailed) on a mismatch."""
    from chai_compile.export.manifest import verify_files

    verify_files(artifact)  # every file against the manifest, before anything reads them
    with contextlib.ExitStack() as stack:
        if out:  # locked and checked before the minutes of work
            stack.enter_context(claim_output_dir(out, overwrite))
        result = run_verify_artifact(artifact, model_spec, tasks_text, limit, steps,
                                     log=lambda m: click.echo(m, err=True))
        if out:
            _write_verify_artifact(out, overwrite, artifact, result)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    if not result["passed"]:
        raise ValidationFailed(f"artifact {artifact} disagrees with PyTorch", fix="see the report above")


def _write_verify_artifact(out: str, overwrite: bool, artifact: str, result: dict[str, Any]) -> None:
    from chai_compile.fileio import staged_output_dir, write_json

    v = result["validation"]
    lines = [f"# verify-artifact {artifact}", "",
             f"passed: **{result['passed']}**; max abs logit diff {v['max_abs_diff_past0']:.3g} (past 0), "
             f"{v['max_abs_diff_past']:.3g} (past > 0), {v['max_abs_diff_left_padded']:.3g} (left padded), "
             f"tolerance {v['atol']}; greedy {v['greedy_steps_matching']}/{v['greedy_steps']} steps identical", ""]
    if "tasks" in result:
        lines += ["| task | n | metric | ONNX Runtime | PyTorch | identical predictions | equal |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in result["tasks"].items():
            for k, val in t["onnxruntime"].items():
                lines.append(f"| {name} | {t['n']} | {k} | {val:.4f} | {t['torch'][k]:.4f} | "
                             f"{t['identical_predictions']} | {t['equal']} |")
    with staged_output_dir(out, overwrite) as stage:
        write_json(stage / "verify-artifact.json", result)
        (stage / "verify-artifact.md").write_text("\n".join(lines) + "\n")


def run_verify_artifact(artifact: str, model_spec: str | None, tasks_text: str | None, limit: int | None,
                        steps: int = GREEDY_STEPS, log: Any = print) -> dict[str, Any]:
    from chai_compile.export import validate
    from chai_compile.export.cli import load_source
    from chai_compile.export.manifest import verify_files
    from chai_compile.export.ort_runner import OrtDecoder

    if not is_artifact(artifact):
        raise ExportError("not an export directory (no manifest.json)", value=artifact)
    man = verify_files(artifact)
    mapping_file = Path(artifact) / "mapping.json"
    from chai_compile.mapping import ClusterMapping

    mapping = ClusterMapping.read(mapping_file) if mapping_file.is_file() else None
    tokenizer, ref = load_source(model_spec or man["source_model"], mapping)
    dec = OrtDecoder(artifact)
    report = validate.validate(ref, dec, tokenizer, dtype=man.get("dtype", DType.FLOAT32), steps=steps)
    log(f"logits/greedy: {json.dumps({k: v for k, v in report.items() if k != 'greedy_text'})}")
    result: dict[str, Any] = {"validation": report, "passed": bool(report["passed"])}
    if tasks_text:
        from chai_compile.verify.compare import evaluate
        from chai_compile.verify.scoring import prepare
        from chai_compile.verify.tasks import parse_task_list, resolve_tasks

        tasks = resolve_tasks(parse_task_list(tasks_text))
        prepared = [prepare(t, tokenizer, ref, limit=limit) for t in tasks]
        ort_res = evaluate(dec, tokenizer, prepared, label="onnxruntime", log=log)
        pt_res = evaluate(ref, tokenizer, prepared, label="torch", log=log)
        tasks_out = {}
        for name in ort_res:
            keys = [k for k in ("acc", "acc_norm", "ppl") if k in ort_res[name]]
            same_preds = (ort_res[name]["predictions"] == pt_res[name]["predictions"]
                          if "predictions" in ort_res[name] else None)  # perplexity tasks have none
            tasks_out[name] = {"onnxruntime": {k: ort_res[name][k] for k in keys},
                               "torch": {k: pt_res[name][k] for k in keys}, "n": ort_res[name]["n"],
                               "identical_predictions": same_preds}
            accs_equal = all(ort_res[name][k] == pt_res[name][k] for k in keys if k != "ppl")
            ppl_close = "ppl" not in keys or abs(ort_res[name]["ppl"] / pt_res[name]["ppl"] - 1) < 1e-3
            tasks_out[name]["equal"] = accs_equal and ppl_close
            result["passed"] = result["passed"] and tasks_out[name]["equal"]
        result["tasks"] = tasks_out
    return result
