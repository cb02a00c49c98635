"""Bad input on the command line: one stderr line `chai-compile: error: <problem>; fix: <fix>`, exit 2,
no traceback, nothing left behind. Checks that need no model run first; the rest use stories260K."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chai_compile.cli import main
from tests.conftest import REPO, STORIES

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")


def run(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: object, needle: str, code: int = 2) -> str:
    """The single error line, after checking exit code, shape and that nothing else was printed to stderr."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("chai-compile: error: ") and "; fix: " in line, line
    assert needle in line, line
    assert "Traceback" not in result.output
    return line


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def mapping_dict() -> dict:
    """A valid mapping document for a 2-layer, 8-head, 4-KV-head model (no model needed)."""
    from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, ModelInfo

    info = ModelInfo("LlamaForCausalLM", "llama", 2, 8, 4, 8, 64, "c" * 64, "a" * 64, ((1.0,) * 12, (2.0,) * 12))
    layers = [LayerMapping(0, "dense"),
              LayerMapping(1, "clustered", (Cluster((0, 4, 5), 4), Cluster((1, 2, 3), 2), Cluster((6, 7), 7)))]
    return ClusterMapping.build(info, layers, {"calibration": "test"}).to_dict()


# ---- click's own usage errors ---------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["profile"], "Missing argument 'MODEL'"),
    (["profile", "m", "--bogus"], "No such option '--bogus'"),
    (["profile", "m", "--out", "o", "--samples", "many"], "'many' is not a valid integer"),
    (["export", "m", "--out", "o", "--dtype", "int3"], "'int3' is not one of"),
    (["profile", "m", "--out", "o", "--dtype", "int3"], "'int3' is not one of"),
    (["export", "m", "--out", "o", "--dtype", "bf16"], "'bf16' is not one of"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_click_usage_errors_are_one_line(tmp_path, args, needle):
    line = one_line_error(run(*args), needle)
    assert "see `chai-compile" in line


# ---- mapping files --------------------------------------------------------------------------------

def _edited(tmp_path: Path, edit) -> Path:
    d = mapping_dict()
    edit(d)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("raw, needle", [
    (b'{"format": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"format": ' + b"9" * 5000 + b"}", "5000-digit integer"),
    (b'{"format": NaN}', "holds NaN"),
    (b'{"format": 1e999}', "holds 1e999"),
    (b'{"format": "chai', "not valid JSON"),
])
def test_mapping_file_that_is_not_sane_json(tmp_path, raw, needle):
    p = tmp_path / "m.json"
    p.write_bytes(raw)
    one_line_error(run("inspect", p), needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(model=[1, 2]), "model must be an object"),
    (lambda d: d["model"].update(architecture=5), "'architecture' must be a string"),
    (lambda d: d["model"].update(num_layers=2.0), "'num_layers' must be an integer"),
    (lambda d: d["model"].update(num_heads="8"), "'num_heads' must be an integer"),
    (lambda d: d["model"].update(fingerprint=[]), "model.fingerprint must be an object"),
    (lambda d: d["model"]["fingerprint"].update(config_sha256=5), "'config_sha256' must be a string"),
    (lambda d: d["model"]["fingerprint"].update(qk_sha256="fake"), "qk_sha256 must be 64 lowercase hex"),
    (lambda d: d["model"]["fingerprint"].update(qk_head_norms="x"), "qk_head_norms must be a list"),
    (lambda d: d["model"]["fingerprint"].update(qk_head_norms=[["a"] * 12] * 2), "not a finite norm"),
    (lambda d: d["model"]["fingerprint"].update(qk_head_norms=[[1.0] * 3] * 2), "list of 12 numbers"),
    (lambda d: d["model"]["fingerprint"].update(qk_head_norms=[[-1.0] * 12] * 2), "not a finite norm"),
    (lambda d: d.update(provenance="x"), "'provenance' must be an object"),
    (lambda d: d.update(provenance=[1]), "'provenance' must be an object"),
    (lambda d: d.update(layers={"0": 1}), "'layers' must be a list"),
    (lambda d: d["layers"].__setitem__(0, 5), "layer 0 must be an object"),
    (lambda d: d["layers"][0].update(index="0"), "'index' must be an integer"),
    (lambda d: d["layers"][1].update(clusters=5), "'clusters' must be a list"),
    (lambda d: d["layers"][1]["clusters"].__setitem__(0, [0, 4]), "cluster 0 must be an object"),
    (lambda d: d["layers"][1]["clusters"][0].update(members="045"), "'members' must be a list"),
    (lambda d: d["layers"][1]["clusters"][0].update(members=[0, 4, True]), "head indices must be integers"),
    (lambda d: d["layers"][1]["clusters"][0].update(representative=None), "'representative' must be an integer"),
    (lambda d: d["layers"][1].update(kept_k_heads="0,1"), "kept_k_heads must be a list"),
    (lambda d: d["layers"][1].update(kept_k_heads=[[0]]), "kept_k_heads entry must be an integer"),
    (lambda d: d["layers"][1].update(kept_k_heads=[0, 99]), "kept_k_heads entry must be in 0..3"),
    (lambda d: d.update(schema_version=True), "schema_version True is not supported"),
])
def test_mapping_field_of_the_wrong_type(tmp_path, edit, needle):
    one_line_error(run("inspect", _edited(tmp_path, edit)), needle)


def test_mapping_claiming_a_trillion_heads_is_refused_without_allocating(tmp_path):
    """4 KB files: sizes are bounded and compared with what the file lists before anything is built."""
    def huge(d):
        d["model"].update(num_heads=10**12)
    one_line_error(run("inspect", _edited(tmp_path, huge)), "'num_heads' must be in 1..4096")

    def all_dense(d):  # no clusters to count: the bound alone must stop it
        d["model"].update(num_heads=10**12, num_kv_heads=10**12)
        d["model"]["fingerprint"]["qk_head_norms"] = []
        d["layers"] = [{"index": 0, "kind": "dense"}, {"index": 1, "kind": "dense"}]
    path = _edited(tmp_path, all_dense)
    assert path.stat().st_size < 4096
    one_line_error(run("inspect", path), "must be in 1..4096")

    def listed_twice(d):  # in range, but more members than heads
        d["layers"][1]["clusters"][1]["members"] = [1, 2, 3, 1, 2, 3]
    one_line_error(run("inspect", _edited(tmp_path, listed_twice)), "exactly one cluster")


# ---- options checked before the model is loaded (the model path does not even exist) ---------------

@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1"),
    (["--first-n", "-2"], "--first-n must be a whole number of at least 1"),
    (["--rows", "0"], "--rows must be a whole number of at least 1"),
    (["--samples", "0"], "--samples must be a whole number of at least 1"),
    (["--clusters", "0"], "--clusters must be at least 1"),
    (["--clusters", "2,0,3"], "--clusters must be at least 1"),
    (["--kv-target", "0.7"], "--kv-target must be between 0 and 0.5"),
    (["--kv-target", "0"], "--kv-target must be between 0 and 0.5"),
    (["--dense-layers", "0-x"], "--dense-layers must be non-negative integers or ranges"),
    (["--dense-layers", "-3"], "--dense-layers must be non-negative integers or ranges"),
    (["--dense-layers", "5-2"], "runs backwards"),
    (["--dense-layers", "0-100000000000"], "--dense-layers must be non-negative integers or ranges"),
])
def test_profile_option_refused_before_loading(tmp_path, args, needle):
    one_line_error(run("profile", "/no/such/model", "--out", tmp_path / "out", *args), needle)
    assert listing(tmp_path) == []


def test_unwritable_out_is_refused_before_loading(tmp_path, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits: let the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    try:
        one_line_error(run("profile", "/no/such/model", "--out", ro / "sub" / "out"), "cannot write to")
        one_line_error(run("export", "/no/such/model", "--no-mapping", "--out", ro / "out"), "cannot write to")
    finally:
        ro.chmod(0o700)
    assert listing(tmp_path) == ["ro"]


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        one_line_error(run("profile", "/no/such/model", "--out", f, *extra), "is a file, not a directory")
        one_line_error(run("export", "/no/such/model", "--no-mapping", "--out", f, *extra), "is a file")
    assert f.read_text() == "keep me" and listing(tmp_path) == ["out"]


@pytest.mark.parametrize("opset, needle", [("99", "opset 99 is newer than the exporter supports"),
                                           ("12", "opset 12 is too old")])
def test_export_opset_out_of_range(tmp_path, opset, needle):
    one_line_error(run("export", "/no/such/model", "--no-mapping", "--opset", opset, "--out", tmp_path / "o"), needle)
    assert listing(tmp_path) == []


# ---- with stories260K -----------------------------------------------------------------------------

@needs_stories
@pytest.mark.parametrize("args, needle", [
    (["--dense-layers", "0-100000"], "--dense-layers index out of range 0..4"),
    (["--clusters", "99"], "more clusters than heads"),
    (["--seq-len", "4096"], "--seq-len 4096 is above the model's 512 positions"),
    (["--device", "gpu"], "unknown --device"),
    (["--device", "meta"], "unsupported --device"),
])
def test_profile_option_checked_against_the_model(tmp_path, args, needle):
    one_line_error(run("profile", STORIES, "--out", tmp_path / "out", *args), needle)
    assert listing(tmp_path) == []


@needs_stories
def test_device_cuda_without_a_gpu(tmp_path):
    import torch

    device, needle = ("cuda:99", "CUDA GPU(s) are visible") if torch.cuda.is_available() else (
        "cuda", "no CUDA GPU is visible")
    one_line_error(run("profile", STORIES, "--device", device, "--out", tmp_path / "o"), needle)
    assert listing(tmp_path) == []


def _broken_model(tmp_path: Path, kind: str) -> Path:
    import struct

    d = tmp_path / f"model-{kind}"
    shutil.copytree(STORIES, d)
    st = d / "model.safetensors"
    st.chmod(0o644)
    good = STORIES.joinpath("model.safetensors").read_bytes()
    if kind == "truncated":
        st.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        st.write_bytes(bytes(range(256)) * 64)
    else:  # a valid file holding other tensors: transformers would fill the model with random weights
        header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        st.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return d


@needs_stories
@pytest.mark.parametrize("kind, needle", [("truncated", "could not load model"), ("garbage", "could not load model"),
                                          ("other-tensors", "lacks or mis-shapes")])
def test_broken_checkpoint(tmp_path, kind, needle):
    model = _broken_model(tmp_path, kind)
    one_line_error(run("profile", model, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@needs_stories
def test_calibration_that_is_not_utf8(tmp_path):
    calib = tmp_path / "latin1.txt"
    calib.write_bytes("Café au lait, déjà vu. ".encode("latin-1") * 50)
    one_line_error(run("profile", STORIES, "--calib", calib, "--out", tmp_path / "out"), "is not UTF-8 text: byte 3")
    assert listing(tmp_path) == ["latin1.txt"]


@needs_stories
def test_samples_above_the_calibration_warns_with_numbers_and_outputs_are_0644(tmp_path):
    import os

    calib = tmp_path / "small.txt"
    calib.write_text("Once upon a time there was a little dog who liked to run in the park. " * 12)
    old = os.umask(0o022)
    try:
        r = run("profile", STORIES, "--calib", calib, "--samples", "50", "--seq-len", "32", "--out", tmp_path / "p")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "of the 50 requested by --samples" in warn[0], r.stderr
    used = json.loads((tmp_path / "p" / "profile.json").read_text())["profile"]["calibration"]["samples"]
    assert 0 < used < 50 and f"using {used} of the 50" in warn[0]
    out = tmp_path / "p"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["mapping.json", "profile.json", "report.md", "similarity.png", "knee_curves.png", "clusters_per_layer.png"],
        0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "small.txt"]  # no lock file, no staging


def test_cli_does_not_import_heavy_modules_for_help():
    code = ("import sys\nfrom chai_compile.cli import main, COMMANDS\n"
            "for args in [['--help'], *[[c, '--help'] for c in COMMANDS]]:\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
            "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'sklearn', 'matplotlib', 'numpy'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "[]"
    assert "verify-artifact" in proc.stdout and "--kv-target" in proc.stdout
