"""Span layers in the portable ONNX export: the bounded cache layout, parity with the rewritten PyTorch model
(prefill, token by token, chunks that evict, left padding), the runner's greedy against generate(), the cache
bytes against the plan's arithmetic, stories260K plans through the CLI, and the refused forms."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from chai_compile.choices import LayerKind
from chai_compile.mapping import ClusterMapping, LayerMapping, Span
from chai_compile.rewrite import apply_mapping
from tests.conftest import STORIES
from tests.test_rewrite_transforms import one_line, plans, tiny3

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
TOL = 1e-5  # fp32 graph vs fp32 rewrite on a 64-wide model: ~2e-7 seen

# MHA, two layers: layer 0 all span heads, 5 bounded groups (sinks 0 included, spans differing inside a group's
# union), no unbounded head; layer 1 a KV head with mixed span/full readers per head (MHA: each KV head has
# one reader, so heads 0 and 5 are full and the rest bounded).
MHA_SPANS = ((Span(0, 3), Span(0, 3), Span(2, 2), Span(2, 2), Span(1, 6), Span(0, 1), Span(0, 3), Span(3, 4)),
             (None, Span(0, 2), Span(1, 3), Span(1, 3), Span(0, 5), None, Span(4, 1), Span(0, 2)))


def mha_model_and_plan() -> tuple[torch.nn.Module, ClusterMapping]:
    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    info = model_info(adapter_for(model))
    return model, ClusterMapping.build(info, [LayerMapping(i, LayerKind.SPAN, spans=sp)
                                              for i, sp in enumerate(MHA_SPANS)])


def exported(tmp_path_factory, model: torch.nn.Module, plan: ClusterMapping, name: str):
    from chai_compile.export.onnx_export import cache_spec, export_decoder, provenance_metadata
    from chai_compile.export.ort_runner import OrtDecoder

    chai = apply_mapping(copy.deepcopy(model), plan)
    out = tmp_path_factory.mktemp(name)
    meta = provenance_metadata(plan, source=name, attention="portable", dtype="float32", opset=23,
                               cache=cache_spec(chai))
    export_decoder(chai, out, metadata=meta)
    return chai, plan, OrtDecoder(out)


@pytest.fixture(scope="module", params=["gqa-mixed", "mha-span"])
def case(request, tmp_path_factory):
    """GQA: clustered layer 0, span layer 1 (KV head 0 bounded with 4 different spans, KV head 1 read by a full
    head too: unbounded), shared layer 2. MHA: two span layers (MHA_SPANS)."""
    if request.param == "gqa-mixed":
        model = tiny3()
        return exported(tmp_path_factory, model, plans(model)["mixed"], request.param)
    return exported(tmp_path_factory, *mha_model_and_plan(), request.param)


def ids_and_mask(vocab: int = 97, length: int = 20, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(1)).numpy()
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def run_chunks(dec, ids: np.ndarray, mask: np.ndarray, bounds: list[int]) -> tuple[np.ndarray, list]:
    """The decoder over ids in chunks [bounds[i], bounds[i+1]), cache carried: logits [B, S, V], last cache."""
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    past, outs = dec.empty_cache(ids.shape[0]), []
    for a, b in zip(bounds, bounds[1:], strict=False):
        logits, past = dec.step(ids[:, a:b], mask[:, :b], pos[:, a:b], past)
        outs.append(logits)
    return np.concatenate(outs, 1), past


def test_graph_cache_layout(case):
    """Bounded groups as their own tensors (heads = the group's KV heads), plain key/value with the unbounded
    heads only; the metadata is the model's CacheSpec and says which KV heads, sinks and window."""
    from chai_compile.export.onnx_export import cache_spec

    chai, plan, dec = case
    spec = cache_spec(chai)
    assert dec.cache == spec and json.loads(dec.metadata["chai.cache"])["bounded"]
    m = plan.model
    for lm in plan.layers:
        i = lm.index
        groups = spec.bounded[i]
        if lm.kind != LayerKind.SPAN:
            assert groups == ()
            continue
        g = m.num_heads // m.num_kv_heads
        bounded = [kv for kv in range(m.num_kv_heads) if all(sp is not None for sp in lm.spans[kv * g:(kv + 1) * g])]
        assert sorted(kv for grp in groups for kv in grp.kv_heads) == bounded
        assert dec.inputs[f"past_key_values.{i}.key"].shape[1] == m.num_kv_heads - len(bounded)
        for n, grp in enumerate(groups):
            spans = [lm.spans[kv * g + j] for kv in grp.kv_heads for j in range(g)]
            assert (grp.sinks, grp.window) == (max(s.sinks for s in spans), max(s.window for s in spans))
            assert dec.inputs[f"past_key_values.{i}.value_span.{n}"].shape[1] == len(grp.kv_heads)


@pytest.mark.parametrize("pad", [0, 7])
def test_logits_match_the_rewrite_in_every_decode_mode(case, pad):
    """One prefill, token by token, and chunks that cross the bounds (the smallest capacity is 2): the same
    logits as the rewritten model's full forward, left padding included (real positions only)."""
    chai, _, dec = case
    check_every_decode_mode(chai, dec, pad)


def check_every_decode_mode(chai, dec, pad: int) -> None:
    """The graph's logits over four chunkings of one padded batch equal the rewritten model's full forward."""
    ids, mask = ids_and_mask(pad=pad)
    with torch.no_grad():
        want = chai(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    for bounds in ([0, 20], list(range(21)), [0, 9, 10, 11, 16, 20], [0, 3, 4, 12, 20]):
        got, _ = run_chunks(dec, ids, mask, bounds)
        assert np.abs(got - want)[real].max() < TOL, bounds


def generate(model: torch.nn.Module, ids: torch.Tensor, steps: int, **kwargs) -> np.ndarray:
    """generate()'s greedy new tokens, not stopping at EOS (the runner's greedy does not)."""
    config = copy.deepcopy(model.generation_config)
    # No stop token: an empty list (None falls back to the model's EOS)
    config.eos_token_id, config.max_new_tokens, config.do_sample, config.pad_token_id = [], steps, False, 0
    with torch.no_grad():
        out = model.generate(ids, generation_config=config, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def test_runner_greedy_equals_generate_with_left_padding(case):
    chai, _, dec = case
    ids, mask = ids_and_mask(length=10, pad=4)
    want = generate(chai, torch.tensor(ids), 24, attention_mask=torch.tensor(mask))
    assert np.array_equal(dec.greedy(ids, 24, attention_mask=mask), want)


def cache_bytes(dec, past: list) -> list[tuple[int, int]]:
    """(K, V) bytes per layer of the runner's cache tensors (bounded groups counted in their layer)."""
    out = [[0, 0] for _ in range(dec.num_layers)]
    for name, t in zip(dec.past_inputs, past, strict=True):
        layer, kind = re.match(r"past_key_values\.(\d+)\.(key|value)", name).groups()
        out[int(layer)][kind == "value"] += t.nbytes
    return [tuple(x) for x in out]


def test_cache_bytes_after_steps_equal_the_plan(case):
    """Batch 1 after a 3-token prompt and N steps: every layer's K and V bytes are the plan's, before and after
    the bounded groups stop growing."""
    _, plan, dec = case
    ids, _ = ids_and_mask(length=18)
    _, past = dec.step(ids[:1, :3], np.ones((1, 3)), np.arange(3)[None], dec.empty_cache(1))
    for t in range(3, 18):
        assert cache_bytes(dec, past) == plan.cache_bytes(t, elem_bytes=4), t
        _, past = dec.step(ids[:1, t:t + 1], np.ones((1, t + 1)), np.array([[t]]), past)
    assert cache_bytes(dec, past) == plan.cache_bytes(18, elem_bytes=4)


# ---- refused forms --------------------------------------------------------------------------------
# The fused form exports span layers too (tests/test_export_fused_spans.py); only TensorRT refuses them.
@needs_stories
def test_cli_refuses_a_tensorrt_span_export(stories, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from chai_compile.cli import main
    from chai_compile.export import tensorrt

    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: None)  # the refusal comes first on any machine
    monkeypatch.setenv("CHAI_TRT_PLUGIN", str(STORIES / "config.json"))  # any existing file
    plans(stories.model)["span"].write(tmp_path / "span.json")
    r = CliRunner().invoke(main, ["export", str(STORIES), "--mapping", str(tmp_path / "span.json"), "--format",
                                  "tensorrt", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("chai-compile: error:")]
    assert len(err) == 1 and "the TensorRT export of a span layer" in err[0], r.output
    assert "fix: export the portable form" in err[0] and not (tmp_path / "out").exists()


def test_other_runtimes_refuse_bounded_caches():
    from chai_compile.errors import ExportError
    from chai_compile.runtime.heads import cache_heads

    shapes = {"past_key_values.0.key": [1, 2, "past", 8], "past_key_values.0.value": [1, 2, "past", 8],
              "past_key_values.0.key_span.0": [1, 2, "r", 8], "past_key_values.0.value_span.0": [1, 2, "r", 8]}
    with pytest.raises(ExportError) as e:
        cache_heads(shapes)
    assert "bounded span caches" in one_line(e) and "OrtDecoder" in one_line(e)


# ---- stories260K through the CLI -------------------------------------------------------------------
def export_cli(plan_path, out) -> dict:
    from chai_compile.export.cli import run_export

    return run_export(str(STORIES), str(plan_path), False, "onnx", "portable", "fp32", 23, str(out), False,
                      log=lambda m: None)


def planned_stories_plan(out) -> ClusterMapping:
    """The planner's CHAI + span + shared plan for stories260K at 30% KV of a 512-token context, written to out."""
    from click.testing import CliRunner

    from chai_compile.cli import main

    r = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.3", "--transforms", "chai,span,shared",
                                  "--out", str(out), "--samples", "2", "--seq-len", "256", "--context", "512"])
    assert r.exit_code == 0, r.output
    plan = ClusterMapping.read(out / "plan.json")
    assert any(lm.kind == LayerKind.SPAN for lm in plan.layers)
    return plan


def check_stories_export(stories, man: dict, out, plan: ClusterMapping) -> None:
    """Validation passed over a generation past every bound; the runner's greedy is generate()'s; the cache
    bytes after a 300-token run are the plan's."""
    from chai_compile.export.ort_runner import OrtDecoder

    v = man["validation"]
    bound = max((sp.sinks + sp.window for lm in plan.layers for sp in lm.spans if sp is not None), default=0)
    assert v["passed"] and v["greedy_identical"] and v["prompt_tokens"] + v["greedy_steps"] - 1 > bound
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    dec = OrtDecoder(out)
    chai = apply_mapping(copy.deepcopy(stories.model), plan)
    ids = stories.tokenizer(["Once upon a time, there was a little dog"], return_tensors="pt")["input_ids"]
    want = generate(chai, ids, 300 - ids.shape[1])
    assert np.array_equal(dec.greedy(ids.numpy(), 300 - ids.shape[1]), want)
    past = dec.empty_cache(1)
    seq = np.concatenate([ids.numpy(), want], 1)
    _, past = dec.step(seq[:, :50], np.ones((1, 50)), np.arange(50)[None], past)
    for t in range(50, 300):
        _, past = dec.step(seq[:, t:t + 1], np.ones((1, t + 1)), np.array([[t]]), past)
    assert cache_bytes(dec, past) == plan.cache_bytes(300, elem_bytes=4)


@needs_stories
def test_stories_planned_span_plan_exports_and_validates(stories, tmp_path):
    """A `chai-compile plan --transforms chai,span,shared` plan (the planner picks span layers here)."""
    from click.testing import CliRunner

    from chai_compile.cli import main

    plan = planned_stories_plan(tmp_path / "p")
    man = export_cli(tmp_path / "p" / "plan.json", tmp_path / "out")
    check_stories_export(stories, man, tmp_path / "out", plan)
    # `chai-compile verify` on the export directory runs it through the same runner
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output


@needs_stories
def test_stories_clustered_span_shared_plan_exports_and_validates(stories, tmp_path):
    """CHAI layer 0, span layers 1-3 (bounds of 2 to 7 tokens: evicting all along), layer 4 shared from 0."""
    plan = plans(stories.model)["mixed"]
    assert {lm.kind for lm in plan.layers} == {LayerKind.CLUSTERED, LayerKind.SPAN, LayerKind.SHARED}
    plan.write(tmp_path / "mixed.json")
    man = export_cli(tmp_path / "mixed.json", tmp_path / "out")
    check_stories_export(stories, man, tmp_path / "out", plan)
