"""Span heads and shared layers, profiled and planned with CHAI on stories260K: the statistics' sizes and
invariants, the planning module against a direct masked computation (float64), the combined planner
meeting a KV target at a context with a valid v3 plan, the KV arithmetic, and one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.cli import main
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, Span
from chai_compile.plan.budget import kv_saving
from chai_compile.plan.shared_scores import Positions, planning_modules
from chai_compile.profile.layer_similarity import LayerSimilarity
from chai_compile.profile.long_context import long_context_statistics
from chai_compile.profile.spans import SpanMass
from tests.conftest import STORIES

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")]
SMALL = ["--samples", "2", "--seq-len", "256", "--context", "512"]


@pytest.fixture(scope="module")
def stats(stories):
    from chai_compile.profile.calibration import build_calibration

    ids = build_calibration(stories.tokenizer, "builtin", 2, 512, 0).input_ids
    return long_context_statistics(adapter_for(stories.model), ids, sinks=(0, 4, 16), windows=(64, 128, 256, 512),
                                   chunk=100, progress=False)


def test_statistics_sizes_and_invariants(stats):
    assert stats.span_mass.shape == (5, 8, 3, 4) and stats.similarity.shape == (5, 5, 8)
    measured = stats.span_mass[..., :3]  # s + w < 512
    assert stats.span_mass[..., 3].isnan().all()  # a 512-token window leaves nothing out of 512 tokens
    assert not measured.isnan().any() and (measured >= 0).all() and (measured <= 1 + 1e-9).all()
    assert (measured.diff(dim=-1) >= -1e-9).all()  # more recent tokens keep more mass
    assert (measured.diff(dim=-2) >= -1e-9).all()  # and so do more sinks
    sim = stats.similarity
    assert torch.equal(sim.diagonal(dim1=0, dim2=1), torch.ones(8, 5, dtype=torch.float64))
    lower = sim[torch.ones(5, 5, dtype=torch.bool).tril(-1)]
    assert (lower >= 0).all() and (lower < 1).all() and sim[0, 1].isnan().all()
    assert stats.summary()["heads_within"]["s4+w256"] == stats.heads_within(0.9, 4, 256)


def test_span_mass_and_similarity_match_brute_force():
    g = torch.Generator().manual_seed(0)
    t, h = 40, 3
    p = torch.randn(h, t, t, generator=g, dtype=torch.float64)
    p = p.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    mass = SpanMass(1, h, (0, 2), (4, 8), t)
    for r0 in range(0, t, 7):  # uneven chunks
        mass.add(0, p[:, r0 : r0 + 7], r0)
    rows = range(10, t)  # beyond the largest s + w = 10
    for a, s in enumerate((0, 2)):
        for b, w in enumerate((4, 8)):
            want = torch.stack([p[:, i, :s].sum(-1) + p[:, i, i - w + 1 : i + 1].sum(-1) for i in rows]).mean(0)
            assert torch.allclose(mass.mean()[0, :, a, b], want, atol=1e-12)
    late = SpanMass(1, h, (0, 2), (4, 8), t, from_row=25)  # recall windows: the repeated rows only
    late.add(0, p, 0)
    want = torch.stack([p[:, i, i - 3 : i + 1].sum(-1) for i in range(25, t)]).mean(0)
    assert torch.allclose(late.mean()[0, :, 0, 0], want, atol=1e-12)
    sim = LayerSimilarity(3, h)
    q = p.flip(-1).tril().softmax(-1)
    sim.add(torch.stack([p, p, q]).float())
    res = sim.result()
    assert torch.allclose(res[1, 0], torch.ones(h, dtype=torch.float64))  # identical maps: perfect
    want = 1 - 0.5 * (q - p).abs().sum(-1).mean(-1)
    assert torch.allclose(res[2, 0], want, atol=1e-6)


def test_a_head_reading_far_back_on_repeated_passages_gets_no_span():
    from chai_compile.profile.long_context import LongContextStats
    from chai_compile.profile.spans import smallest_span

    text = torch.full((1, 2, 1, 2), 0.95, dtype=torch.float64)  # both heads local on running text
    recall = text.clone()
    recall[0, 1] = torch.tensor([0.3, 0.95])  # head 1 copies from far back at w64: only w128 keeps its mass
    stats = LongContextStats(256, 1, (4,), (64, 128), text, torch.ones(1, 1, 2), recall_mass=recall)
    kept = stats.kept_mass()
    assert smallest_span(stats.span_mass[0], [0, 1], (4,), (64, 128), 0.9, 256) == (4, 64)
    assert smallest_span(kept[0], [0, 1], (4,), (64, 128), 0.9, 256) == (4, 128)
    assert smallest_span(kept[0], [0], (4,), (64, 128), 0.9, 256) == (4, 64)
    assert stats.heads_within(0.9, 4, 64) == 1


def _direct(model, layer: int, x: torch.Tensor, pe, spans: list[Span | None] | None, probs_in=None):
    """Layer `layer`'s attention written out head by head: band mask per span, or given probabilities."""
    a = adapter_for(model)
    p, s = a.projections(layer), a.spec
    b, t, _ = x.shape
    v = torch.nn.functional.linear(x, p.v_weight, p.v_bias).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
    if probs_in is None:
        q = torch.nn.functional.linear(x, p.q_weight, p.q_bias).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = torch.nn.functional.linear(x, p.k_weight, p.k_bias).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = a.position(q * p.q_scale, k, Positions(pe))
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        maps = []
        for hd in range(s.num_heads):
            allowed = j <= i
            sp = spans[hd] if spans else None
            if sp is not None:
                allowed = allowed & ((j < sp.sinks) | (i - j < sp.window))
            sc = q[:, hd] @ k[:, hd // s.group_size].transpose(-1, -2) * a.scaling()
            maps.append(sc.masked_fill(~allowed, float("-inf")).softmax(-1))
        probs_in = torch.stack(maps, 1)
    out = torch.stack([probs_in[:, hd] @ v[:, hd // s.group_size] for hd in range(s.num_heads)], 1)
    y = torch.nn.functional.linear(out.transpose(1, 2).reshape(b, t, -1), p.o_weight, p.o_bias)
    return y, probs_in


def test_planning_module_spans_and_sharing_equal_a_direct_computation(stories):
    model = copy.deepcopy(stories.model).double()
    model.set_attn_implementation("eager")
    ids = stories.tokenizer("Once upon a time, there was a little girl named Lily who loved the sea and the sun "
                            "and the big blue sky", return_tensors="pt").input_ids
    spans = [Span(1, 4), Span(1, 4), None, None, Span(0, 6), Span(0, 6), Span(2, 3), Span(2, 3)]
    seen: dict[int, tuple] = {}
    with torch.no_grad(), planning_modules(adapter_for(model)) as mods:
        from chai_compile.plan.shared_scores import ProbStore

        store = ProbStore()
        store.sources = {1}
        for m in mods:
            m.store = store
            m.capture = lambda mod, x, pe, probs, v, heads, y: seen.__setitem__(mod.layer, (x, pe, y))
        mods[1].spans = spans
        mods[3].shared_from = 1
        model(ids)
        # the planning module's probabilities are fp32 by design (float64 model around them): fp32-tight bounds
        x1, pe1, y1 = seen[1]
        want1, probs1 = _direct(model, 1, x1, pe1, spans)
        assert (y1 - want1).abs().max().item() < 1e-6
        x3, pe3, y3 = seen[3]
        want3, _ = _direct(model, 3, x3, pe3, None, probs_in=probs1)
        assert (y3 - want3).abs().max().item() < 1e-6
        mods[1].spans = None  # without the band the outputs move: the mask was exercised
        model(ids)
        assert (seen[1][2] - want1).abs().max().item() > 1e-3


def test_kv_arithmetic_counts_gqa_spans_and_sharing(stories):
    from chai_compile.fingerprint import model_info

    info = model_info(adapter_for(stories.model))  # 5 layers, 8 query heads, 4 KV heads, head_dim 8
    half = (Span(4, 60),) * 2 + (None, Span(4, 60)) + (Span(4, 28), Span(0, 64)) * 2
    layers = [LayerMapping(0, LayerKind.DENSE), LayerMapping(1, LayerKind.SHARED, source=0),
              LayerMapping(2, LayerKind.SPAN, spans=half),
              LayerMapping(3, LayerKind.CLUSTERED, tuple(Cluster((h, h ^ 2), h) for h in (0, 1, 4, 5))),
              LayerMapping(4, LayerKind.DENSE)]
    plan = ClusterMapping.build(info, layers)
    c, per = 512, 8 * 2  # tokens; head_dim x fp16 bytes
    # span layer: KV head 0 -> 64, head 1 -> full (a null head), heads 2-3 -> max sinks 4 + max window 64
    assert plan.cache_bytes(c, 2) == [(4 * c * per, 4 * c * per), (0, 4 * c * per),
                                       ((64 + c + 68 + 68) * per, (64 + c + 68 + 68) * per),
                                       (2 * c * per, 4 * c * per), (4 * c * per, 4 * c * per)]
    native = 2 * 5 * 4 * c
    assert kv_saving(plan, c) == pytest.approx(1 - (8 * c + 4 * c + 2 * (c + 200) + 6 * c + 8 * c) / native)
    # batches multiply every count, the span bound too (it holds per sequence)
    assert plan.cache_bytes(3 * c, 2, batch=3) == [(3 * k, 3 * v) for k, v in plan.cache_bytes(c, 2)]


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.3", "--transforms", "chai,span,shared",
                                    "--min-layer-similarity", "0.2", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    return out


def test_combined_plan_meets_the_target_at_the_context(combined):
    mapping = ClusterMapping.read(combined / "plan.json")
    assert mapping.schema_version == 3 and mapping.weights is None
    assert kv_saving(mapping, 512) >= 0.3 - 1e-9
    assert ClusterMapping.from_dict(json.loads(mapping.to_json())) == mapping  # the v3 round trip
    report = json.loads((combined / "plan_report.json").read_text())
    assert report["target_met"] and report["budget"]["context"] == 512
    assert report["kv_cache_saving"] == pytest.approx(kv_saving(mapping, 512))
    for lm in mapping.layers:  # one kind per layer, spans tested on the windows (s + w < 256)
        if lm.kind == LayerKind.SPAN:
            assert all(sp is None or sp.sinks + sp.window < 256 for sp in lm.spans)
    assert (combined / "plan_rounds.png").stat().st_size > 0 and "span" in (combined / "plan_report.md").read_text()
    # span heads are scored on passage-repeat windows too (the default with spans): 2 of them beside the text
    cal = report["calibration"]
    assert cal["recall_windows"] == 2 and cal["scoring_windows"] == 2 + 2 and len(cal["recall_tokens_sha256"]) == 64


def test_recall_windows_repeat_a_calibration_passage(stories):
    from chai_compile.profile.calibration import build_calibration, build_recall, recall_passage

    tok = stories.tokenizer
    rec = build_recall(tok, "builtin", samples=3, seq_len=101, seed=1)
    assert recall_passage(101) == 76  # 3/4 of the window: beyond any span a 101-token window offers (w <= 64)
    passage = build_calibration(tok, "builtin", 3, 76, 1).input_ids
    assert rec.input_ids.shape == (3, 101)
    skip = 1 if tok.bos_token_id is not None else 0
    assert torch.equal(rec.input_ids[:, :76], passage)
    assert torch.equal(rec.input_ids[:, 76:], passage[:, skip:skip + 25])  # the repeat, no second BOS
    assert rec.sha256 != build_recall(tok, "builtin", samples=3, seq_len=101, seed=2).sha256


def test_profile_ranked_span_plan_meets_the_target_without_measuring_candidates(tmp_path, monkeypatch):
    from chai_compile.plan.select import Scorer

    calls = []
    measure = Scorer.measure
    monkeypatch.setattr(Scorer, "measure", lambda self: calls.append(1) or measure(self))
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.3", "--transforms", "span",
                                    "--rank", "profile", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    mapping = ClusterMapping.read(out / "plan.json")
    report = json.loads((out / "plan_report.json").read_text())
    assert report["planner"] == "profile-mass-spans" and report["target_met"]
    assert kv_saving(mapping, 512) >= 0.3 - 1e-9
    assert {lm.kind for lm in mapping.layers} <= {LayerKind.SPAN, LayerKind.DENSE}
    assert len(calls) == 2  # the original and the chosen plan: no forward pass per candidate
    assert report["rounds"][-1]["accepted"] and report["rounds"][-1]["kl"] > report["rounds"][0]["kl"]


def test_shared_only_plan_writes_shared_layers(tmp_path):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.1", "--transforms", "shared",
                                    "--min-layer-similarity", "0.1", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    mapping = ClusterMapping.read(out / "plan.json")
    shared = [lm for lm in mapping.layers if lm.kind == LayerKind.SHARED]
    assert shared and all(mapping.layers[lm.source].kind != LayerKind.SHARED for lm in shared)
    assert kv_saving(mapping, 512) == pytest.approx(0.1 * len(shared))  # each drops 1/10: half its layer's cache


def test_one_round_never_accepts_a_shared_layer_reading_another_accepted_in_it(tmp_path):
    # with 4 acceptances a round, the round that makes layer 3 shared (or a source) must then skip candidates
    # such as shared(4<-3) that it offered when it began: before the fix this plan failed its own validation
    # ("layer 4: source layer 3 is itself shared")
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.2", "--transforms", "shared",
                                    "--per-round", "4", "--min-layer-similarity", "0.01", "--out", str(out),
                                    *SMALL])
    assert res.exit_code == 0, res.output
    mapping = ClusterMapping.read(out / "plan.json")
    shared = {lm.index: lm.source for lm in mapping.layers if lm.kind == LayerKind.SHARED}
    assert len(shared) == 2 and not set(shared.values()) & set(shared)
    assert kv_saving(mapping, 512) == pytest.approx(0.2)


@pytest.mark.parametrize("args, words", [
    (["--kv-target", "0.3", "--transforms", "span", "--context", "1024"], "above the 512 positions"),
    (["--kv-target", "0.2", "--context", "1024"], "above the 512 positions"),  # CHAI alone checks it too
    (["--kv-target", "0.3", "--transforms", "chai,sliding"], "unknown --transforms name 'sliding'"),
    (["--kv-target", "0.3", "--transforms", "shared", "--context", "512"], "best reachable is 0.0%"),
    (["--kv-target", "0.6", "--transforms", "chai,shared"], "between 0 and 0.5"),
    (["--kv-target", "0.3", "--transforms", "span", "--refit", "all"], "--refit is for CHAI-only plans"),
    (["--kv-target", "0.2", "--recall-samples", "2"], "--recall-samples is for plans with spans"),
    (["--kv-target", "0.3", "--transforms", "chai,span", "--rank", "profile"], "--rank profile orders span"),
    (["--max-ppl-increase", "0.1", "--transforms", "span", "--rank", "profile"], "--rank profile plans to a"),
    (["--kv-target", "0.3", "--transforms", "span", "--recall-samples", "-1"], "--recall-samples must be 0 or more"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--samples", "1", "--seq-len", "128", *args,
                                    "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("chai-compile: error:")]
    assert len(lines) == 1 and words in lines[0] and "; fix: " in lines[0], res.output
    assert not out.exists()


def test_profile_long_writes_statistics_and_plots(tmp_path):
    out = tmp_path / "long"
    res = CliRunner().invoke(main, ["profile-long", str(STORIES), "--samples", "1", "--windows", "32,64",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "long_context.json").read_text())
    assert doc["seq_len"] == 512 and len(doc["span_mass"]) == 5 and len(doc["layer_similarity"][0]) == 5
    assert {"layer_similarity.png", "span_mass.png"} <= {p.name for p in out.iterdir()}
    bad = CliRunner().invoke(main, ["profile-long", str(STORIES), "--seq-len", "600", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "above the model's 512 positions" in bad.output
