"""ONNX export of stories260K, portable and fused: checker, ORT CPU parity, greedy tokens, sliced Q/K, bad inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from chai_compile.errors import ExportError, FingerprintMismatchError, OutputPathError
from tests.conftest import STORIES, STORIES_MHA
from tests.test_rewrite import paired_mapping

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
pytestmark = needs_stories


@pytest.fixture(scope="module")
def mapping_file(stories, tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "mapping.json"
    paired_mapping(stories.model).write(path)
    return path


@pytest.fixture(scope="module")
def portable(mapping_file, tmp_path_factory):
    """Through the CLI path (export + checker + manifest + built-in validation)."""
    from chai_compile.export.cli import run_export

    out = tmp_path_factory.mktemp("exp") / "portable"
    man = run_export(str(STORIES), str(mapping_file), False, "onnx", "portable", "fp32", 23, str(out), False,
                     log=lambda m: None)
    return out, man


@pytest.fixture(scope="module")
def fused(stories, mapping_file, tmp_path_factory):
    from chai_compile.export.onnx_export import export_decoder
    from chai_compile.mapping import ClusterMapping
    from chai_compile.rewrite import apply_mapping

    chai = apply_mapping(copy.deepcopy(stories.model), ClusterMapping.read(mapping_file))
    out = tmp_path_factory.mktemp("exp") / "fused"
    out.mkdir()
    export_decoder(chai, out, attention="fused")
    return out, chai


def test_portable_manifest_validation_and_checker(portable):
    from chai_compile.export.clean import check

    out, man = portable
    check(out / "model.onnx")
    v = man["validation"]
    assert v["passed"] and v["greedy_identical"] and v["greedy_steps"] == 32
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    assert {i["name"] for i in man["inputs"]} >= {"input_ids", "attention_mask", "position_ids",
                                                  "past_key_values.0.key", "past_key_values.4.value"}
    assert man["outputs"][0]["name"] == "logits" and man["outputs"][1]["name"] == "present.0.key"
    assert (out / "mapping.json").is_file() and man["files"]["model.onnx"]["sha256"]
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())


def test_portable_sliced_qk_and_kept_k_cache(portable, stories):
    """The optimizer folds W^T into fresh names, so count weights: 2D initializers hold exactly the rewritten
    model's matrices, i.e. the original's minus the dropped Q/K rows (no full Q/K left behind)."""
    import onnx

    from chai_compile.mapping import ClusterMapping

    out, man = portable
    mapping = ClusterMapping.read(out / "mapping.json")
    model = onnx.load(str(out / "model.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}["chai.mapping"])["layers"]
    onnx_2d = sum(int(np.prod(i.dims)) for i in model.graph.initializer if len(i.dims) == 2)
    orig_2d = sum(p.numel() for p in stories.model.parameters() if p.dim() == 2)
    m, hidden = mapping.model, stories.model.config.hidden_size
    dropped = sum(((m.num_heads - lm.num_clusters) + (m.num_kv_heads - len(mapping.kept_k_heads(i)))) * m.head_dim
                  * hidden for i, lm in enumerate(mapping.layers) if lm.kind == "clustered")
    assert dropped > 0 and onnx_2d == orig_2d - dropped
    for i, lm in enumerate(mapping.layers):
        kin = next(v for v in man["inputs"] if v["name"] == f"past_key_values.{i}.key")
        want = len(mapping.kept_k_heads(i)) if lm.kind == "clustered" else m.num_kv_heads
        assert kin["shape"][1] == want


def test_dense_gqa_attention_reads_the_cache_unrepeated(portable, stories):
    """stories260K has 8 query heads over 4 KV heads: its dense layer's Attention node must take the present
    K/V (Concat of past and new, KV heads only), not a copy repeated to the query heads."""
    import onnx

    out, _ = portable
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert stories.model.config.num_key_value_heads < stories.model.config.num_attention_heads
    outputs = {o.name for o in model.graph.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert attention, "the dense layer should export as one Attention node"
    for node in attention:
        assert node.input[1] in outputs and node.input[2] in outputs, list(node.input[:3])


def test_fused_graph_nodes_and_ort_parity(fused, stories, mapping_file):
    import onnx

    from chai_compile.export.ort_runner import OrtDecoder
    from chai_compile.export.validate import validate
    from chai_compile.kernels import fused_op
    from chai_compile.layout import cluster_layout
    from chai_compile.mapping import ClusterMapping

    out, chai = fused
    onnx.checker.check_model(str(out / "model.onnx"))
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == fused_op.OP_TYPE]
    assert len(nodes) == 4 and all(n.domain == fused_op.DOMAIN for n in nodes)  # layer 0 is dense
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"chai"
    fused_op.validate_attributes({k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()})
    mapping = ClusterMapping.read(mapping_file)
    for layer, node in zip(range(1, 5), nodes, strict=True):  # the graph's indices are the layout's
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        lay = cluster_layout(mapping, layer)
        assert (a["cluster_offsets"], a["k_head_index"], a["v_head_index"]) == (
            list(lay.cluster_offsets), list(lay.k_head_index), list(lay.v_head_index))
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[nodes[0].input[5]].op_type == "Cast"  # int64 mask -> int32 at the node (contract)
    report = validate(chai, OrtDecoder(out), stories.tokenizer)
    assert report["passed"] and report["greedy_identical"], report
    assert max(report["max_abs_diff_past0"], report["max_abs_diff_past"]) <= 1e-4


@pytest.fixture(scope="module")
def inplace(stories, tmp_path_factory, ort_ops_library):
    """Fused export with the in-place cache, validated on the compiled op. Layer 0 is dense: it becomes an
    identity-clustered node (one head per cluster), since every layer must share its buffer."""
    from chai_compile.export.cli import run_export

    path = tmp_path_factory.mktemp("map") / "layer0_dense.json"
    paired_mapping(stories.model, dense=(0,)).write(path)
    out = tmp_path_factory.mktemp("exp") / "inplace"
    man = run_export(str(STORIES), str(path), False, "onnx", "fused", "fp32", 23, str(out), False,
                     log=lambda m: None, kv_cache="inplace")
    return out, man


def test_inplace_export_runs_on_the_compiled_op_with_shared_buffers(inplace, ort_ops_library):
    from chai_compile.export.ort_runner import OrtDecoder

    out, man = inplace
    v = man["validation"]
    assert man["kv_cache"] == "inplace" and v["passed"] and v["greedy_identical"], v
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    import onnx

    from chai_compile.kernels import fused_op

    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == fused_op.OP_TYPE]
    assert len(nodes) == 5  # all layers, the dense one as H clusters of one head
    first = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert first["num_clusters"] == first["num_heads"] and first["past_present_share_buffer"] == 1
    dec = OrtDecoder(out)
    assert dec.kv_cache == "inplace" and dec.fused_op_runner == str(ort_ops_library)
    ids = np.array([[5, 9, 14, 3], [7, 7, 2, 11]])
    mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(4), (2, 4)).copy()
    cache = dec.empty_cache(2, capacity=8)
    logits, after = dec.step(ids, mask, pos, cache)
    assert all(a is c for a, c in zip(after, cache, strict=True))  # the same buffers came back, written
    assert np.abs(cache[0].numpy()[:, :, :4]).max() > 0 and not cache[0].numpy()[:, :, 4:].any()
    # The Python reference op (a copy per step, no IO-bound aliasing) computes the same logits.
    ref = OrtDecoder(out, op_library="python")
    ref_logits, _ = ref.step(ids, mask, pos, ref.empty_cache(2, capacity=8))
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_inplace_buffer_too_small_is_one_line(inplace):
    from chai_compile.export.ort_runner import OrtDecoder

    dec = OrtDecoder(inplace[0])
    ids = np.array([[5, 9, 14, 3]])
    with pytest.raises(ExportError) as info:
        dec.step(ids, np.ones_like(ids), np.arange(4)[None], dec.empty_cache(1, capacity=2))
    line = info.value.one_line()
    assert "shared cache buffer holds 2 rows" in line and "\n" not in line


def test_inplace_needs_the_fused_form(tmp_path, mapping_file):
    with pytest.raises(ExportError, match="needs the fused form"):
        _run(tmp_path, mapping_file, kv_cache="inplace")


def test_ort_decoder_is_a_verify_backend(portable, stories):
    from chai_compile.export.ort_runner import OrtDecoder
    from chai_compile.verify.scoring import LogitsBackend

    dec = OrtDecoder(portable[0])
    assert isinstance(dec, LogitsBackend)
    ids = torch.randint(3, 500, (2, 6))
    assert dec.logits(ids, torch.ones_like(ids), 2).shape == (2, 4, stories.model.config.vocab_size)
    assert np.isfinite(dec.logits(ids, torch.ones_like(ids), 0)).all()


# ---- bad input: one-line errors, nothing written ------------------------------------------------
def _run(tmp_path, mapping, **kw):
    from chai_compile.export.cli import run_export

    args = dict(model=str(STORIES), mapping_path=str(mapping), no_mapping=False, fmt="onnx", attention="portable",
                dtype="fp32", opset=23, out=str(tmp_path / "out"), overwrite=False, log=lambda m: None)
    args.update(kw)
    return run_export(**args)


def test_old_opset_refused(tmp_path, mapping_file):
    with pytest.raises(ExportError, match="opset 17"):
        _run(tmp_path, mapping_file, opset=17)
    assert not any(tmp_path.iterdir())


def test_existing_out_refused(tmp_path, mapping_file):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputPathError, match="already exists"):
        _run(tmp_path, mapping_file)


@pytest.mark.skipif(not STORIES_MHA.is_dir(), reason="stories260K-mha missing")
def test_mapping_from_another_model_refused(tmp_path):
    from chai_compile.loading import load_model

    other = tmp_path / "other.json"
    paired_mapping(load_model(str(STORIES_MHA)).model).write(other)
    with pytest.raises(FingerprintMismatchError):
        _run(tmp_path, other)
    assert [p.name for p in tmp_path.iterdir()] == ["other.json"]


def test_unwritable_out_refused(tmp_path, mapping_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if (ro / "probe").parent.stat().st_mode & 0o200 == 0 and __import__("os").access(ro, __import__("os").W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(OutputPathError):
            from chai_compile.export.cli import run_export
            from chai_compile.fileio import staged_output_dir

            with staged_output_dir(ro / "sub" / "out"):
                pass
            run_export  # noqa: B018
    finally:
        ro.chmod(0o700)


def test_cli_one_line_error(tmp_path, mapping_file):
    from click.testing import CliRunner

    from chai_compile.cli import main

    r = CliRunner().invoke(main, ["export", str(STORIES), "--mapping", str(mapping_file), "--opset", "12",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "opset 12 is too old" in r.output and len(r.output.strip().splitlines()) == 1


def test_fp16_fused_export_without_a_cuda_provider_says_validation_was_skipped(tmp_path, mapping_file):
    import onnxruntime as ort
    from click.testing import CliRunner

    from chai_compile.cli import main

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu validates float16 fused graphs on its CUDA provider")
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["export", str(STORIES), "--mapping", str(mapping_file), "--attention", "fused",
                                  "--dtype", "fp16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert "validation skipped: float16 fused nodes run on ONNX Runtime's CUDA execution provider" in last
    assert json.loads((out / "manifest.json").read_text())["validation"]["passed"] is None


def test_artifact_files_are_hashed_in_the_manifest(portable):
    import hashlib

    out, man = portable
    assert man["external_data"] == "model.onnx.data"
    for name in ("model.onnx", "model.onnx.data", "mapping.json"):
        data = (out / name).read_bytes()
        assert man["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_artifact_dir_through_the_cli(portable, tmp_path):
    """`chai-compile verify ARTIFACT_DIR`: logits, greedy tokens and a task through ONNX Runtime, report files."""
    from click.testing import CliRunner

    from chai_compile.cli import main

    report = tmp_path / "report"
    r = CliRunner().invoke(main, ["verify", str(portable[0]), "--tasks", "piqa", "--limit", "12", "--out", str(report)])
    assert r.exit_code == 0, r.output
    res = json.loads((report / "verify-artifact.json").read_text())
    assert res["passed"] and res["validation"]["greedy_identical"]
    piqa = res["tasks"]["piqa"]
    assert piqa["n"] == 12 and piqa["equal"] and piqa["onnxruntime"] == piqa["torch"]
    assert "| piqa | 12 |" in (report / "verify-artifact.md").read_text()
    # An export directory carries its own mapping: a second one is a one-line usage error.
    r = CliRunner().invoke(main, ["verify", str(portable[0]), "--mapping", str(portable[0] / "mapping.json")])
    assert r.exit_code != 0 and "--mapping is not used with an export directory" in r.output
    assert len(r.output.strip().splitlines()) == 1
