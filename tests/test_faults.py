"""Faults around a run: concurrent runs into one --out, SIGTERM and SIGKILL mid-run, a changed export
directory, fingerprints that must not match, wrapped exporter errors, and library noise."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chai_compile.errors import ExportError, FingerprintMismatchError, MappingError, root_cause
from tests.conftest import REPO, STORIES
from tests.test_bad_input import listing, one_line_error, run

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "chai_compile"]


def wait_for(predicate, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def stages(root: Path, name: str) -> list[Path]:
    return sorted(root.glob(f".{name}.*.partial"))


# ---- one --out, two runs; SIGTERM; SIGKILL ----------------------------------------------------------

@needs_stories
def test_second_run_into_one_out_fails_at_once_and_sigterm_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([*CLI, "export", str(STORIES), "--no-mapping", "--out", str(out)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / ".out.lock").exists())
        one_line_error(run("profile", STORIES, "--out", out, "--overwrite"), "another chai-compile run is writing")
        assert first.poll() is None  # refused while the first run still works, not after it
        wait_for(lambda: stages(tmp_path, "out") or first.poll() is not None)
        assert stages(tmp_path, "out"), first.communicate()
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, err
    errors = [ln for ln in err.splitlines() if ln.startswith("chai-compile: error:")]
    assert errors == [
        "chai-compile: error: terminated by SIGTERM, nothing was written; fix: re-run the command"], err
    assert "Traceback" not in err
    assert listing(tmp_path) == []


HOLDER = """
import sys, time
from chai_compile.fileio import claim_output_dir
with claim_output_dir(sys.argv[1]) as claim, claim.stage() as stage:
    (stage / "half-written.bin").write_bytes(bytes(1000))
    print("staged", flush=True)
    time.sleep(600)
"""


def test_sigkilled_run_is_swept_by_the_next(tmp_path):
    from chai_compile.fileio import staged_output_dir

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "staged"
        with pytest.raises(Exception, match="another chai-compile run is writing"):  # lock held
            with staged_output_dir(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no handler runs, the staging dir and the lock file stay
        holder.wait()
    assert len(stages(tmp_path, "out")) == 1 and (tmp_path / ".out.lock").exists()
    other = tmp_path / ".out.x.stage-abcdefgh.partial"  # staging of another target, `out.x`: not ours to sweep
    other.mkdir()
    with staged_output_dir(out) as stage:
        (stage / "result.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.x.stage-abcdefgh.partial", "out"]
    assert (out / "result.txt").read_text() == "done"


def test_overwrite_replaces_only_when_the_new_output_is_complete(tmp_path):
    from chai_compile.fileio import staged_output_dir

    out = tmp_path / "out"
    with staged_output_dir(out) as stage:
        (stage / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as stage:
        (stage / "a.txt").write_text("second")
        raise RuntimeError("failed half-way")
    assert (out / "a.txt").read_text() == "first" and listing(tmp_path) == ["out", "out/a.txt"]


# ---- an export directory that changed after it was written ------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real export through the real entry point (the original stories260K: independent of the mapping)."""
    if not STORIES.is_dir():
        pytest.skip("stories260K missing")
    out = tmp_path_factory.mktemp("artifact") / "exp"
    proc = subprocess.run([*CLI, "export", str(STORIES), "--no-mapping", "--out", str(out)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_export_prints_only_its_own_lines_and_writes_ordinary_permissions(artifact):
    out, proc = artifact
    prefixes = ("running the PyTorch model", "exporting ", "validation: ")
    assert [ln for ln in proc.stderr.splitlines() if not ln.startswith(prefixes)] == [], proc.stderr
    assert proc.stdout.startswith("wrote ") and len(proc.stdout.splitlines()) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


def _tampered(artifact_dir: Path, tmp_path: Path, tamper) -> Path:
    copy = tmp_path / "exp"
    shutil.copytree(artifact_dir, copy)
    tamper(copy)
    return copy


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(d: Path, fn) -> None:
    man = json.loads((d / "manifest.json").read_text())
    fn(man)
    (d / "manifest.json").write_text(json.dumps(man, indent=1))


@pytest.mark.parametrize("tamper, needle", [
    (lambda d: _flip(d / "model.onnx.data", 12345), "model.onnx.data changed: its sha256 differs"),
    (lambda d: (d / "model.onnx.data").open("ab").write(b"\0"), "model.onnx.data changed: "),
    (lambda d: _flip(d / "model.onnx", 200), "model.onnx changed: its sha256 differs"),
    (lambda d: (d / "model.onnx.data").unlink(), "model.onnx.data is missing"),
    (lambda d: _edit_manifest(d, lambda m: m["validation"].update(passed=True, max_abs_diff_past=0.0)),
     "manifest.json was edited"),
    (lambda d: _edit_manifest(d, lambda m: m["files"].pop("model.onnx.data")), "manifest.json was edited"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("files")), "lacks required keys: files"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("manifest_sha256")), "lacks required keys: manifest_sha256"),
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:300]), "not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "is not a manifest object"),
])
def test_verify_names_the_file_that_changed(artifact, tmp_path, tamper, needle):
    from chai_compile.export.manifest import verify_files

    verify_files(artifact[0])  # the original is intact
    copy = _tampered(artifact[0], tmp_path, tamper)
    before = listing(tmp_path)
    one_line_error(run("verify", copy), needle)
    one_line_error(run("verify-artifact", copy, "--out", tmp_path / "report"), needle)
    assert listing(tmp_path) == before


def test_verify_of_an_intact_export_passes(artifact, tmp_path):
    r = run("verify", artifact[0], "--out", tmp_path / "report")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "report" / "verify-artifact.json").read_text())["passed"]


# ---- fingerprints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_mapping(stories, tmp_path_factory):
    from tests.test_rewrite import paired_mapping

    path = tmp_path_factory.mktemp("map") / "mapping.json"
    paired_mapping(stories.model).write(path)
    return path


@needs_stories
def test_changed_rope_theta_is_another_model(stories_mapping, tmp_path):
    model = tmp_path / "stories-rope"
    shutil.copytree(STORIES, model)
    cfg_path = model / "config.json"
    cfg_path.chmod(0o644)
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"]["rope_theta"] = 500000.0
    cfg_path.write_text(json.dumps(cfg))
    assert run("inspect", stories_mapping, "--model", STORIES).exit_code == 0
    one_line_error(run("inspect", stories_mapping, "--model", model), "config fingerprint differs")


@needs_stories
def test_nan_norms_and_a_fake_hash_do_not_pass_for_a_perturbed_checkpoint(stories, stories_mapping, tmp_path):
    import copy

    import torch

    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from chai_compile.mapping import ClusterMapping

    doc = json.loads(stories_mapping.read_text())
    doc["model"]["fingerprint"]["qk_sha256"] = "0" * 64
    rows = doc["model"]["fingerprint"]["qk_head_norms"]
    doc["model"]["fingerprint"]["qk_head_norms"] = [[float("nan")] * len(r) for r in rows]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))  # json writes NaN, which is not JSON
    with pytest.raises(MappingError, match="holds NaN"):
        ClusterMapping.read(forged)
    one_line_error(run("inspect", forged, "--model", STORIES), "holds NaN")

    # Through the API, where no JSON reader stands in between: NaN norms never agree with anything.
    perturbed = copy.deepcopy(stories.model)
    with torch.no_grad():
        adapter_for(perturbed).projections(1).q_weight.mul_(1.01)
    mine = ClusterMapping.read(stories_mapping)
    nan_info = dataclasses.replace(mine.model, qk_sha256="0" * 64,
                                   qk_head_norms=tuple((float("nan"),) * len(r) for r in mine.model.qk_head_norms))
    forged_mapping = ClusterMapping(nan_info, mine.layers, mine.provenance)
    with pytest.raises(FingerprintMismatchError, match="checkpoint"):
        forged_mapping.check_model(model_info(adapter_for(perturbed)))
    with pytest.raises(FingerprintMismatchError, match="checkpoint"):
        mine.check_model(model_info(adapter_for(perturbed)))


# ---- the exporter's wrapped errors ------------------------------------------------------------------

def test_export_error_names_the_root_cause(monkeypatch, tmp_path):
    import torch

    from chai_compile.export.onnx_export import export_decoder
    from tests.tiny_models import tiny_model

    def failing_export(*args, **kwargs):
        try:
            raise ValueError("Unsupported FX nodes: {'call_function': ['chai.clustered_attention']}")
        except ValueError as e:  # how torch.onnx wraps it: advice first, the cause last
            raise RuntimeError("Failed to convert the exported program to an ONNX model. This is step 3/3 of "
                               "exporting the model to ONNX. Next steps:\n- If there is a missing ONNX function, "
                               "implement it and register it.\n## Exception summary\n\n...") from e

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(ExportError) as e:
        export_decoder(tiny_model("llama"), tmp_path, attention="portable")
    line = e.value.one_line()
    assert "ValueError: Unsupported FX nodes" in line and "chai.clustered_attention" in line
    assert "Next steps" not in line
    assert root_cause(RuntimeError("only one")) == "RuntimeError: only one"
