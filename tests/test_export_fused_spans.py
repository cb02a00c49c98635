"""Span layers in the fused ONNX export (one ClusteredAttention node per head group, bounded caches as rings):
parity with the rewritten PyTorch model in every decode mode (prefill, token by token, chunks that evict, left
padding) under both cache contracts, the runner's greedy against generate(), the cache bytes against the plan,
shared layers left portable in the same graph, stories260K plans through the CLI, and the refused forms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from chai_compile.choices import ExportFormat, KVCacheMode, LayerKind
from chai_compile.kernels import fused_op
from chai_compile.rewrite import apply_mapping
from tests.conftest import STORIES
from tests.test_export_spans import (
    TOL,
    cache_bytes,
    check_every_decode_mode,
    check_stories_export,
    generate,
    ids_and_mask,
    mha_model_and_plan,
    planned_stories_plan,
    run_chunks,
)
from tests.test_rewrite_transforms import one_line, plans, tiny3

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")


def exported_fused(tmp_path_factory, model, plan, name: str, kv_cache: str = KVCacheMode.CONCAT):
    from chai_compile.export.onnx_export import cache_spec, export_decoder, provenance_metadata
    from chai_compile.export.ort_runner import OrtDecoder

    chai = apply_mapping(copy.deepcopy(model), plan)
    out = tmp_path_factory.mktemp(name)
    meta = provenance_metadata(plan, source=name, attention="fused", dtype="float32", opset=23,
                               cache=cache_spec(chai), kv_cache=kv_cache)
    export_decoder(chai, out, attention="fused", metadata=meta, kv_cache=kv_cache)
    return chai, plan, OrtDecoder(out, op_library="compiled"), out


@pytest.fixture(scope="module", params=["gqa-mixed", "mha-span", "mha-span-inplace"])
def case(request, tmp_path_factory, ort_ops_library):
    """GQA: clustered layer 0 (the source of shared layer 2: left portable), span layer 1 (a bounded group of
    4 different spans and an unbounded group read by a span head too). MHA: two span layers, one without an
    unbounded head (tests/test_export_spans.py MHA_SPANS), with the concat and the in-place cache."""
    if request.param == "gqa-mixed":
        model = tiny3()
        return exported_fused(tmp_path_factory, model, plans(model)["mixed"], request.param)
    kv = KVCacheMode.INPLACE if request.param.endswith("inplace") else KVCacheMode.CONCAT
    return exported_fused(tmp_path_factory, *mha_model_and_plan(), request.param, kv)


def nodes(out) -> list:
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    return [n for n in graph.node if n.op_type == fused_op.OP_TYPE and n.domain == fused_op.DOMAIN]


def test_one_node_per_head_group_with_the_group_ring(case):
    """Each span layer is one node per head group (the rewrite's groups), whose ring is the group's union of
    spans and whose clusters carry their query heads' spans; clustered non-source layers are nodes too."""
    chai, plan, dec, out = case
    from chai_compile.export.onnx_export import cache_spec

    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes(out)]
    spec = cache_spec(chai)
    sources = {lm.source for lm in plan.layers if lm.kind == LayerKind.SHARED}
    want = []
    for lm in plan.layers:
        if lm.kind == LayerKind.SPAN:
            unbounded = spec.k_heads[lm.index] > 0
            want += [(0, 0)] * unbounded + [(g.sinks, g.window) for g in spec.bounded[lm.index]]
        elif lm.kind == LayerKind.CLUSTERED and lm.index not in sources or lm.kind == LayerKind.DENSE and \
                dec.kv_cache == KVCacheMode.INPLACE:
            want.append((0, 0))
    assert sorted((a["ring_sinks"], a["ring_window"]) for a in attrs) == sorted(want)
    spans = sorted((sp.sinks, sp.window) for lm in plan.layers if lm.kind == LayerKind.SPAN for sp in lm.spans if sp)
    assert sorted(x for a in attrs for x in zip(a["span_sinks"], a["span_window"], strict=True) if x[1]) == spans
    assert dec.fused_op_runner.endswith(".so")
    from chai_compile.export.ort_runner import _has_span_nodes

    # The CUDA kernel has no span path: the runner keeps such graphs on the CPU unless told otherwise.
    assert _has_span_nodes(onnx.load(str(out / "model.onnx"), load_external_data=False))


@pytest.mark.parametrize("pad", [0, 7])
def test_logits_match_the_rewrite_in_every_decode_mode(case, pad):
    """One prefill, token by token (past every ring's wrap), and chunks longer than a window with a past."""
    chai, _, dec, _ = case
    check_every_decode_mode(chai, dec, pad)


def test_runner_greedy_equals_generate_with_left_padding(case):
    chai, _, dec, _ = case
    ids, mask = ids_and_mask(length=10, pad=4)
    want = generate(chai, torch.tensor(ids), 24, attention_mask=torch.tensor(mask))
    assert np.array_equal(dec.greedy(ids, 24, attention_mask=mask), want)


def test_cache_bytes_after_steps_equal_the_plan(case):
    """Concat: every layer's K and V bytes are the plan's, before and after the rings stop growing. In place:
    the rings are buffers of sinks + window rows from the start, the rest of the capacity asked for."""
    _, plan, dec, _ = case
    ids, _ = ids_and_mask(length=18)
    past = dec.empty_cache(1, capacity=18)
    _, past = dec.step(ids[:1, :3], np.ones((1, 3)), np.arange(3)[None], past)
    for t in range(3, 18):
        want = plan.cache_bytes(18 if dec.kv_cache == KVCacheMode.INPLACE else t, elem_bytes=4)
        got = cache_bytes(dec, [p.numpy() if hasattr(p, "numpy") else p for p in past])
        assert got == want, t
        _, past = dec.step(ids[:1, t:t + 1], np.ones((1, t + 1)), np.array([[t]]), past)


def test_python_op_runs_the_same_graph(case):
    """Without the compiled library the onnxruntime-extensions op runs the span nodes through the reference."""
    pytest.importorskip("onnxruntime_extensions")
    from chai_compile.export.ort_runner import OrtDecoder

    _, _, dec, out = case
    py = OrtDecoder(out, op_library="python")
    assert py.fused_op_runner == "python-reference"
    ids, mask = ids_and_mask(pad=7)
    bounds = [0, 9, 10, 11, 16, 20]
    got, _ = run_chunks(py, ids, mask, bounds)
    want, _ = run_chunks(dec, ids, mask, bounds)
    assert np.abs(got - want)[mask.astype(bool)].max() < TOL


# ---- refused forms ----------------------------------------------------------------------------------
def test_inplace_cache_refuses_shared_layers_in_one_line(tmp_path):
    from chai_compile.errors import ExportError
    from chai_compile.export.onnx_export import export_decoder

    model = tiny3()
    chai = apply_mapping(copy.deepcopy(model), plans(model)["mixed"])
    with pytest.raises(ExportError) as e:
        export_decoder(chai, tmp_path, attention="fused", kv_cache="inplace")
    line = one_line(e)
    assert "layer 2: the in-place KV cache has no shared layers" in line
    assert "fix: export with --kv-cache concat" in line


def test_a_plan_with_nothing_to_fuse_is_refused_in_one_line(tmp_path):
    """Dense layers and a shared one reading a dense source: every layer stays portable, so no fused graph."""
    from chai_compile.errors import ExportError
    from chai_compile.export.onnx_export import export_decoder

    model = tiny3()
    chai = apply_mapping(copy.deepcopy(model), plans(model)["shared-dense"])
    with pytest.raises(ExportError) as e:
        export_decoder(chai, tmp_path, attention="fused")
    assert "found no clustered or span layer to fuse" in one_line(e) and "fix: use --attention portable" in one_line(e)


def test_exportable_kinds_per_form():
    from chai_compile.export.cli import exportable_kinds

    assert set(exportable_kinds("fused")) == set(LayerKind)
    assert LayerKind.SHARED not in exportable_kinds("fused", KVCacheMode.INPLACE)
    assert LayerKind.SPAN in exportable_kinds("fused", KVCacheMode.INPLACE)
    assert LayerKind.SPAN not in exportable_kinds("fused", KVCacheMode.CONCAT, ExportFormat.TENSORRT)


@needs_stories
def test_cli_refuses_an_inplace_shared_export_before_loading(stories, tmp_path):
    from click.testing import CliRunner

    from chai_compile.cli import main

    plans(stories.model)["mixed"].write(tmp_path / "mixed.json")
    r = CliRunner().invoke(main, ["export", str(STORIES), "--mapping", str(tmp_path / "mixed.json"), "--attention",
                                  "fused", "--kv-cache", "inplace", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("chai-compile: error:")]
    assert len(err) == 1 and "the fused export with the in-place KV cache of a shared layer" in err[0], r.output
    assert "fix: export the portable form" in err[0] and not (tmp_path / "out").exists()


# ---- stories260K through the CLI: validated against PyTorch, greedy past every ring -------------------
def export_fused_cli(plan_path, out, kv_cache: str = KVCacheMode.CONCAT) -> dict:
    from chai_compile.export.cli import run_export

    return run_export(str(STORIES), str(plan_path), False, "onnx", "fused", "fp32", 23, str(out), False,
                      log=lambda m: None, kv_cache=kv_cache)


@needs_stories
def test_stories_clustered_span_shared_plan_exports_fused_and_validates(stories, tmp_path, ort_ops_library):
    """CHAI layer 0 (the shared layer's source: portable), span layers 1-3 as nodes, layer 4 shared."""
    plan = plans(stories.model)["mixed"]
    plan.write(tmp_path / "mixed.json")
    man = export_fused_cli(tmp_path / "mixed.json", tmp_path / "out")
    assert len(nodes(tmp_path / "out")) >= 3  # layers 1-3: one node per head group
    check_stories_export(stories, man, tmp_path / "out", plan)


@needs_stories
def test_stories_planned_span_plan_exports_fused_and_validates(stories, tmp_path, ort_ops_library):
    """A `chai-compile plan --transforms chai,span,shared` plan (the planner picks span layers here), fused."""
    plan = planned_stories_plan(tmp_path / "p")
    man = export_fused_cli(tmp_path / "p" / "plan.json", tmp_path / "out")
    check_stories_export(stories, man, tmp_path / "out", plan)


@needs_stories
def test_stories_span_plan_exports_fused_inplace_and_validates(stories, tmp_path, ort_ops_library):
    """Dense layer 0 and span layers 1-4, every layer a node, the rings bound in place."""
    from chai_compile.export.ort_runner import OrtDecoder

    plan = plans(stories.model)["span"]
    plan.write(tmp_path / "span.json")
    man = export_fused_cli(tmp_path / "span.json", tmp_path / "out", KVCacheMode.INPLACE)
    v = man["validation"]
    assert v["passed"] and v["greedy_identical"]
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    dec = OrtDecoder(tmp_path / "out")
    chai = apply_mapping(copy.deepcopy(stories.model), plan)
    ids = stories.tokenizer(["Once upon a time, there was a little dog"], return_tensors="pt")["input_ids"]
    want = generate(chai, ids, 120 - ids.shape[1])
    assert dec.kv_cache == KVCacheMode.INPLACE and np.array_equal(dec.greedy(ids.numpy(), 120 - ids.shape[1]), want)
