"""Shared layers and span layers in the PyTorch rewrite.

Accuracy is measured in float64 against `kernels/reference.py` fed with the original model's projections
of the inputs each rewritten layer received: a span head is one cluster under its own allowed-key mask
(real tokens, causal, sinks plus window); a shared layer is the source's clusters with the shared
layer's V. Decode consistency (prefill vs token by token, fp32), cache bytes against the plan's
prediction, generate() with left padding against per-sequence generate, and the one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.compat import model_forward
from chai_compile.errors import ExportError, MappingError
from chai_compile.fingerprint import model_info
from chai_compile.kernels.reference import clustered_attention
from chai_compile.layout import cluster_layout
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, Span
from chai_compile.rewrite import ClusteredAttention, RewriteError, apply_mapping, kv_cache_bytes
from tests.conftest import STORIES

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def tiny3(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Three layers (a source, a span layer, a shared layer), GQA 8 query heads on 2 KV heads."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation("eager")
    return model


# KV head 0 read only by span heads (bounded: 2 sinks + 5 window), KV head 1 by a full head too.
SPANS = (Span(2, 3), Span(1, 5), Span(0, 4), Span(2, 1), None, Span(1, 2), Span(3, 3), Span(0, 6))


def plans(model: nn.Module) -> dict[str, ClusterMapping]:
    """Span and shared plans over every layer count (the last layer shared, or a span layer)."""
    info = model_info(adapter_for(model))
    h, n = info.num_heads, info.num_layers
    pairs = LayerMapping(0, LayerKind.CLUSTERED, tuple(Cluster((i, i + 1), i + 1) for i in range(0, h, 2)))
    span = tuple(SPANS[i % len(SPANS)] for i in range(h))
    dense = [LayerMapping(i, LayerKind.DENSE) for i in range(n)]
    return {
        "span": ClusterMapping.build(info, [*dense[:1], *(LayerMapping(i, LayerKind.SPAN, spans=span)
                                                          for i in range(1, n))]),
        "shared-dense": ClusterMapping.build(info, [*dense[:-1], LayerMapping(n - 1, LayerKind.SHARED, source=0)]),
        "mixed": ClusterMapping.build(info, [pairs, *(LayerMapping(i, LayerKind.SPAN, spans=span)
                                                      for i in range(1, n - 1)),
                                             LayerMapping(n - 1, LayerKind.SHARED, source=0)]),
    }


def left_padded(vocab: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


# ---- float64 reference -----------------------------------------------------------------------
def allowed_keys(mask: torch.Tensor, span: Span | None) -> torch.Tensor:
    """[B, 1, S, T]: query i may read key j (real-token indices; sinks and window counted in real tokens)."""
    real = torch.where(mask.bool(), mask.cumsum(1) - 1, -1)
    i, j = real[:, :, None], real[:, None, :]
    ok = (i >= 0) & (j >= 0) & (j <= i)
    if span is not None:
        ok &= (j < span.sinks) | (j > i - span.window)
    return ok[:, None]


def projections(adapter, layer: int, call) -> tuple[torch.Tensor, ...]:
    q, k = adapter.queries_keys(layer, call)
    p = adapter.projections(layer)
    x = call.hidden_states
    v = nn.functional.linear(x, p.v_weight, p.v_bias).view(*x.shape[:2], -1, q.shape[-1]).transpose(1, 2)
    return q, k, v


def reference(orig: nn.Module, plan: ClusterMapping, calls: dict, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """The float64 output (after o_proj) of `layer` of `plan`, from the original weights and its inputs."""
    adapter = adapter_for(orig)
    lm, g, scale = plan.layers[layer], plan.model.group_size, adapter.scaling()
    _, _, v = projections(adapter, layer, calls[layer])
    if lm.kind == LayerKind.SPAN:
        q, k, _ = projections(adapter, layer, calls[layer])
        heads = [clustered_attention(q[:, h : h + 1], k, v, allowed_keys(mask, sp), [0, 1], [h // g], [h // g], scale)
                 for h, sp in enumerate(lm.spans)]
        out = torch.cat(heads, 1)
    else:  # shared: the source's clusters (a dense source: every head its own), this layer's V
        q, k, _ = projections(adapter, lm.source, calls[lm.source])
        lay = cluster_layout(plan, lm.source)
        k_heads = [lay.kept_k_heads[j] for j in lay.k_head_index]
        out = clustered_attention(q[:, list(lay.representatives)], k, v, allowed_keys(mask, None),
                                  lay.cluster_offsets, k_heads, lay.v_head_index, scale)
        out = out[:, list(lay.inverse_permutation)]
    p = adapter.projections(layer)
    return nn.functional.linear(out.transpose(1, 2).flatten(2), p.o_weight, p.o_bias)


@pytest.mark.parametrize("name", ["span", "shared-dense", "mixed"])
def test_layers_match_float64_reference(name):
    """Without padding: in float64, transformers' eager softmax (fp32) turns a padding row's float64-minimum
    mask into -inf and NaN, which 0-weight products carry into real rows (padding is tested below)."""
    orig = tiny3(torch.float64)
    plan = plans(orig)[name]
    chai = apply_mapping(copy.deepcopy(orig), plan)
    ids, _ = left_padded(97)  # 24 tokens: every window (at most 6) is passed
    mask = torch.ones_like(ids)
    calls, outs, adapter = {}, {}, adapter_for(chai)
    for i, layer in enumerate(adapter.decoder_layers()):
        attn = layer.self_attn
        attn.register_forward_pre_hook(lambda m, a, kw, i=i: calls.__setitem__(i, adapter.call_inputs(a, kw)),
                                       with_kwargs=True)
        attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
    with torch.no_grad():
        chai(input_ids=ids, attention_mask=mask)
        checked = [i for i, lm in enumerate(plan.layers) if lm.kind in (LayerKind.SPAN, LayerKind.SHARED)]
        for i in checked:
            # The rewrite's softmax is fp32 (as eager's) whatever the model's dtype: ~1e-7 relative rounding.
            assert (outs[i] - reference(orig, plan, calls, mask, i)).abs().max().item() < 1e-7, (name, i)
        if name == "span":  # the check discriminates: full attention is far from the span layer's output
            full = dataclasses.replace(plan.layers[1], spans=(None,) * 8)
            plan_full = dataclasses.replace(plan, layers=(plan.layers[0], full, *plan.layers[2:]))
            assert (outs[1] - reference(orig, plan_full, calls, mask, 1)).abs().max().item() > 1e-3
    assert checked


@pytest.mark.parametrize("name", ["span", "shared-dense", "mixed"])
def test_left_padded_rows_equal_unpadded_forward(name):
    """Sinks and windows count a sequence's real tokens: a left-padded row gives its unpadded logits."""
    orig = tiny3()
    chai = apply_mapping(copy.deepcopy(orig), plans(orig)[name])
    ids, mask = left_padded(97)
    with torch.no_grad():
        batch = chai(input_ids=ids, attention_mask=mask).logits
        for b in range(2):
            real = mask[b].bool()
            alone = chai(input_ids=ids[b : b + 1, real]).logits[0]
            assert (batch[b, real] - alone).abs().max().item() < TOL, (name, b)


# ---- decode consistency and cache bytes --------------------------------------------------------
def decode_diff(model: nn.Module, ids: torch.Tensor) -> tuple[float, DynamicCache]:
    """Max |logit diff| of token-by-token decode and of a split prefill against the full forward."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = torch.cat([model_forward(model, cache, input_ids=ids[:, t : t + 1]).logits
                           for t in range(ids.shape[1])], 1)
        split_cache = DynamicCache(config=model.config)
        p = ids.shape[1] // 2 + 1
        split = torch.cat([model_forward(model, split_cache, input_ids=ids[:, :p]).logits,
                           model_forward(model, split_cache, input_ids=ids[:, p:]).logits], 1)
    return max((steps - full).abs().max().item(), (split - full).abs().max().item()), cache


def measured(cache: DynamicCache) -> list[tuple[int, int]]:
    return [(p["key_bytes"], p["value_bytes"]) for p in kv_cache_bytes(cache)["per_layer"]]


@pytest.mark.parametrize("name", ["span", "shared-dense", "mixed"])
def test_tiny_decode_consistency_and_cache_bytes(name):
    orig = tiny3()
    plan = plans(orig)[name]
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    diff, cache = decode_diff(apply_mapping(copy.deepcopy(orig), plan), ids)
    assert diff < TOL, diff
    assert measured(cache) == plan.cache_bytes(ids.numel(), elem_bytes=4, batch=2)


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
@pytest.mark.parametrize("name", ["span", "shared-dense", "mixed"])
def test_stories260k_decode_consistency_and_cache_bytes(stories, name):
    """Tolerance: 1e-5, or twice the original's own cached-vs-full difference (fp32 at logit scale 22)."""
    orig = copy.deepcopy(stories.model)
    orig.set_attn_implementation("eager")
    plan = plans(orig)[name]
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    floor, _ = decode_diff(orig, ids)
    diff, cache = decode_diff(apply_mapping(copy.deepcopy(orig), plan), ids)
    assert diff <= max(TOL, 2 * floor), (diff, floor)
    assert measured(cache) == plan.cache_bytes(ids.numel(), elem_bytes=4, batch=2)


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
def test_verify_cache_check_accepts_span_and_shared_plans(stories):
    """verify's measured-vs-predicted check (batch 1, the way verify measures) passes for the new kinds."""
    from chai_compile.verify.measure import check_cache_prediction, measure_kv_cache

    for name in ("mixed", "shared-dense"):
        plan = plans(stories.model)[name]
        kv = measure_kv_cache(apply_mapping(copy.deepcopy(stories.model), plan), tokens=48, decode_steps=3)
        check_cache_prediction(kv, plan)


def test_bounded_heads_stop_growing():
    orig = tiny3()
    plan = plans(orig)["span"]
    chai = apply_mapping(copy.deepcopy(orig), plan)
    spans0 = SPANS[:4]  # the query heads of KV head 0, all span heads: it keeps the union of their spans
    bound = max(s.sinks for s in spans0) + max(s.window for s in spans0)
    cache, sizes = DynamicCache(config=chai.config), []
    with torch.no_grad():
        for t in range(2 * bound + 3):
            model_forward(chai, cache, input_ids=torch.tensor([[5 + t]]))
            sizes.append(kv_cache_bytes(cache)["per_layer"][1]["key_shape"])
    bounded = [s[0][2] for s in sizes]  # group 0: KV head 0
    full = [s[1][2] for s in sizes]
    assert bounded == [min(t + 1, bound) for t in range(len(sizes))]
    assert full == list(range(1, len(sizes) + 1))
    assert not cache.is_croppable  # what assisted generation reads before cropping a cache


# ---- generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["span", "mixed"])
def test_generate_left_padding_equals_per_sequence(name, impl):
    """Under both mask conventions (eager: additive float; sdpa: bool or none); beam search reorders the
    span cache's rows (shape only: beams are not compared)."""
    orig = tiny3()
    chai = apply_mapping(copy.deepcopy(orig), plans(orig)[name])
    chai.set_attn_implementation(impl)
    ids, mask = left_padded(97, length=12)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = chai.generate(ids, attention_mask=mask, **gen)
        for b in range(2):
            real = ids[b : b + 1, mask[b].bool()]
            alone = chai.generate(real, attention_mask=torch.ones_like(real), **gen)
            assert torch.equal(batch[b, -alone.shape[1] :], alone[0]), b
        beams = chai.generate(ids, attention_mask=mask, num_beams=3, num_return_sequences=2, **gen)
    assert beams.shape == (4, 12 + 8)


# ---- bad input -----------------------------------------------------------------------------------
def unvalidated(model: nn.Module, layers: list[LayerMapping]) -> ClusterMapping:
    return ClusterMapping(model_info(adapter_for(model)), tuple(layers))  # what a plan built in code can be


def one_line(e: pytest.ExceptionInfo) -> str:
    text = e.value.one_line()
    assert "\n" not in text and "fix:" in text
    return text


def test_span_layers_of_one_forward_share_their_step_tables(monkeypatch):
    """The real indices and the ring rows are built by the first span layer of a forward and reused by the
    others (a decode step is launch-bound); a new forward builds them again, and the decode stays exact."""
    from chai_compile.rewrite import span_step

    built = []
    real_valid_keys = span_step._valid_keys
    monkeypatch.setattr(span_step, "_valid_keys", lambda *a: built.append(1) or real_valid_keys(*a))
    orig = tiny3()
    model = apply_mapping(copy.deepcopy(orig), plans(orig)["span"])  # layers 1 and 2 are span layers
    ids, mask = left_padded(97, 12)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model_forward(model, cache, input_ids=ids[:, :8], attention_mask=mask[:, :8])
        assert len(built) == 1
        # kept on the cache until the next forward: the rotary table only, never the decoder's (4D) mask
        assert [torch.is_tensor(x) for x in cache._chai_span_step.key] == [True, False, False, False, False]
        steps = [model_forward(model, cache, input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1]).logits
                 for t in range(8, 12)]
        assert len(built) == 5
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 8:]
    live = mask[:, 8:].bool()
    assert (torch.cat(steps, 1) - full)[live].abs().max().item() < TOL


def test_a_full_ring_is_written_in_place_and_survives_reordering():
    """Once a bounded group's ring is full a decode step overwrites one row of the same buffers (no copy of the
    ring); a batch reorder (beam search, generate's batch selection) gives new tensors, from which the next
    store builds a ring again. Rows always hold what the ring rule says."""
    from chai_compile.kernels import span_ring
    from chai_compile.rewrite.span_cache import HeadGroup, SpanCacheLayer

    g = torch.Generator().manual_seed(0)
    b, steps, sinks, window = 2, 14, 2, 4
    keys = torch.randn(b, 1, steps, 8, generator=g)
    layer = SpanCacheLayer((HeadGroup((0,), sinks, window),))
    layer.lazy_initialization(keys[:, :, :0], keys[:, :, :0])
    order = torch.arange(b)  # which original row each cache row holds
    pointers = []
    for t in range(steps):
        if t == 9:
            order = order.flip(0)
            layer.reorder_cache(torch.tensor([1, 0]))
        k = keys[order, :, t : t + 1]
        layer.store(0, k, -k, torch.full((b, 1), t), torch.full((b,), t + 1), 1)
        layer.advance(torch.full((b,), t + 1), 1)
        pointers.append(layer.entries[0][0].data_ptr())
        ck, cv, ci = layer.past(0)
        held = span_ring.row_index(ci.shape[1], torch.full((b,), t + 1), sinks, window)
        assert torch.equal(ci, held) and ck.shape[2] == min(t + 1, sinks + window)
        for row in range(b):
            assert torch.equal(ck[row, 0], keys[order[row], 0, held[row]]) and torch.equal(cv, -ck)
    full = sinks + window  # steps 6..8 and 10..13 write in place; 9 rebuilds after the reorder
    assert len(set(pointers[full - 1 : 9])) == 1 and len(set(pointers[9:])) == 1 and pointers[9] != pointers[8]


def test_rewrite_refuses_bad_shared_and_span_layers():
    orig = tiny3()
    dense = [LayerMapping(i, LayerKind.DENSE) for i in range(3)]
    cases = [
        ([LayerMapping(0, LayerKind.SHARED, source=2), *dense[1:]], MappingError, "must be an earlier layer"),
        ([*dense[:2], LayerMapping(2, LayerKind.SHARED, source=7)], MappingError, "must be an earlier layer"),
        ([dense[0], LayerMapping(1, LayerKind.SPAN, spans=SPANS[:3]), dense[2]], MappingError, "one span per"),
        ([dense[0], LayerMapping(1, LayerKind.SPAN, spans=(Span(-1, 3),) * 8), dense[2]], MappingError, "sinks"),
        ([dense[0], LayerMapping(1, LayerKind.SPAN, spans=SPANS), LayerMapping(2, LayerKind.SHARED, source=1)],
         RewriteError, "not span layer 1"),
    ]
    for layers, error, text in cases:
        model = copy.deepcopy(orig)
        with pytest.raises(error) as e:
            apply_mapping(model, unvalidated(orig, layers))
        assert text in one_line(e)
        assert not any(isinstance(m, ClusteredAttention) for m in model.modules())  # left as it was


def test_fused_export_refusals_of_span_and_shared_plans(tmp_path):
    """The fused form carries span and shared layers out with the concat cache (tests/test_export_fused_spans.py);
    the in-place cache has no shared layers, and a plan with nothing to fuse has no fused graph."""
    from chai_compile.export.onnx_export import export_decoder

    orig = tiny3()
    for name, kv, text in (("mixed", "inplace", "layer 2: the in-place KV cache has no shared layers"),
                           ("shared-dense", "concat", "the fused form found no clustered or span layer to fuse")):
        chai = apply_mapping(copy.deepcopy(orig), plans(orig)[name])
        with pytest.raises(ExportError) as e:
            export_decoder(chai, tmp_path / name, attention="fused", kv_cache=kv)
        assert text in one_line(e) and "fix: " in one_line(e)


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
def test_cli_export_of_a_shared_plan(stories, tmp_path):
    """Portable: validated against PyTorch (logits within 1e-4, same greedy tokens), layer 4's K cache has
    zero heads. In-place fused exports of shared plans are refused before the model loads."""
    from chai_compile.export.cli import run_export
    from chai_compile.mapping import UnsupportedLayerKindError

    plans(stories.model)["shared-dense"].write(tmp_path / "shared-dense.json")
    man = run_export(str(STORIES), str(tmp_path / "shared-dense.json"), False, "onnx", "portable", "fp32", 23,
                     str(tmp_path / "out"), False, log=lambda m: None)
    v = man["validation"]
    assert v["passed"] and v["greedy_identical"]
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    heads = {i.name: i.type.tensor_type.shape.dim[1].dim_value for i in graph.input if i.name.startswith("past")}
    assert heads["past_key_values.4.key"] == 0 and heads["past_key_values.4.value"] == 4  # the shared layer
    assert heads["past_key_values.0.key"] == 4
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    with pytest.raises(UnsupportedLayerKindError) as e:
        run_export(str(STORIES), str(tmp_path / "shared-dense.json"), False, "onnx", "fused", "fp32", 23,
                   str(tmp_path / "shared-inplace"), False, log=lambda m: None, kv_cache="inplace")
    assert "the fused export with the in-place KV cache of a shared layer" in one_line(e)
    assert not (tmp_path / "shared-inplace").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["span", "mixed"])
def test_cuda_matches_cpu(name):
    """Same plan on the GPU: fp32 logits as on the CPU, fp16 decode consistent with its prefill."""
    orig = tiny3()
    plan = plans(orig)[name]
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    cpu = apply_mapping(copy.deepcopy(orig), plan)
    gpu = apply_mapping(copy.deepcopy(orig), plan).cuda()
    with torch.no_grad():
        want = cpu(input_ids=ids).logits
        got = gpu(input_ids=ids.cuda()).logits.cpu()
    assert (want - got).abs().max().item() < 1e-4
    diff, cache = decode_diff(gpu.half(), ids.cuda())
    assert diff < 1e-2, diff
    assert measured(cache) == plan.cache_bytes(ids.numel(), elem_bytes=2, batch=2)
