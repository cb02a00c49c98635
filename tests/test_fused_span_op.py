"""The fused node's span path (ring caches, per-cluster spans): the float64 reference against an independent
statement of the span rule, the ring against a full-length cache, and the compiled CPU op and the Python op
against the reference over a whole sequence (decode past the ring's wrap, prefill with a past longer than the
window, left padding, GQA, both cache contracts); bad span attributes as one line."""

from __future__ import annotations

import pytest
import torch

from chai_compile.export import ort_ops
from chai_compile.kernels import fused_op, span_ring
from chai_compile.kernels.reference import clustered_attention

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from tests.test_ort_ops import node_graph  # noqa: E402  (after the skips: it imports onnx at module level)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16
# A span layer's group node (one cluster per query head, GQA 2:1) and a clustered node with spans.
GROUP = dict(num_heads=4, cluster_offsets=[0, 1, 2, 3, 4], k_head_index=[0, 0, 1, 1], v_head_index=[0, 0, 1, 1],
             num_k_heads=2, num_v_heads=2, span_sinks=[1, 0, 2, 1], span_window=[3, 2, 4, 4])
CLUSTERED = dict(num_heads=6, cluster_offsets=[0, 2, 3, 6], k_head_index=[0, 1, 1], v_head_index=[0, 0, 1, 1, 2, 2],
                 num_k_heads=2, num_v_heads=3, span_sinks=[1, 0, 2], span_window=[3, 4, 2])
RING = dict(ring_sinks=2, ring_window=4)  # 6 rows: the spans above fit inside
LENGTH, PAD = 22, 3  # row 0 of the batch starts with 3 padding slots
# Chunk bounds: a prefill, decode steps that wrap the ring, a 5-token chunk with a past (longer than the
# window: it overwrites ring rows its own first queries read), decode again.
BOUNDS = [0, 4, *range(5, 12), 17, *range(18, LENGTH + 1)]


def attrs_of(layer: dict, ring: bool, share: int = 0) -> dict:
    return fused_op.node_attributes(**layer, head_dim=D, scale=D ** -0.5, past_present_share_buffer=share,
                                    **(RING if ring else {}))


def sequence(layer: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, hk, hv = len(layer["cluster_offsets"]) - 1, layer["num_k_heads"], layer["num_v_heads"]
    mask = torch.ones(2, LENGTH, dtype=torch.int32)
    mask[0, :PAD] = 0
    return {"query": torch.randn(2, c, LENGTH, D, generator=g), "key": torch.randn(2, hk, LENGTH, D, generator=g),
            "value": torch.randn(2, hv, LENGTH, D, generator=g), "attention_mask": mask}


def independent(layer: dict, seq: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, LENGTH, H*d]: every position at once, the span rule written out on real-token indices."""
    mask = seq["attention_mask"].bool()
    real = torch.where(mask, mask.long().cumsum(1) - 1, -1)
    i, j = real[:, None, :, None], real[:, None, None, :]
    sk = torch.tensor(layer["span_sinks"])[None, :, None, None]
    w = torch.tensor(layer["span_window"])[None, :, None, None]
    allowed = (i >= 0) & (j >= 0) & (j <= i) & ((j < sk) | (j > i - w))
    out = clustered_attention(seq["query"], seq["key"], seq["value"], allowed, layer["cluster_offsets"],
                              layer["k_head_index"], layer["v_head_index"], D ** -0.5)
    return out.permute(0, 2, 1, 3).flatten(2)


def run_sequence(step, layer: dict, ring: bool, share: int, seq: dict[str, torch.Tensor]):
    """Feed the sequence chunk by chunk through step(feeds) -> (out, pk, pv); returns outputs [B, LENGTH, H*d]
    and the caches after each chunk."""
    hk, hv = layer["num_k_heads"], layer["num_v_heads"]
    rows = (RING["ring_sinks"] + RING["ring_window"]) if ring else LENGTH
    pk, pv = (torch.zeros(2, n, rows if share else 0, D) for n in (hk, hv))
    outs, caches = [], []
    for a, b in zip(BOUNDS, BOUNDS[1:], strict=False):
        feeds = {"query": seq["query"][:, :, a:b], "key": seq["key"][:, :, a:b], "value": seq["value"][:, :, a:b],
                 "past_key": pk, "past_value": pv, "attention_mask": seq["attention_mask"][:, :b]}
        out, pk, pv = step(feeds)
        outs.append(torch.as_tensor(out))
        pk, pv = torch.as_tensor(pk), torch.as_tensor(pv)
        caches.append((pk, pv))
    return torch.cat(outs, 1), caches


def reference_step(attrs: dict):
    def step(feeds):
        return fused_op.clustered_attention_reference(*(feeds[n] for n in fused_op.INPUTS), **attrs)
    return step


def real_rows(out: torch.Tensor, seq: dict) -> torch.Tensor:
    return out[seq["attention_mask"].bool()]


@pytest.mark.parametrize("layer", [GROUP, CLUSTERED], ids=["group", "clustered"])
@pytest.mark.parametrize("ring, share", [(True, 0), (True, 1), (False, 0), (False, 1)])
def test_reference_follows_the_span_rule_whatever_the_cache(layer, ring, share):
    seq = sequence(layer)
    got, caches = run_sequence(reference_step(attrs_of(layer, ring, share)), layer, ring, share, seq)
    want = independent(layer, seq)
    assert (real_rows(got, seq) - real_rows(want, seq)).abs().max() < 1e-12
    if ring and not share:  # the ring stops growing at sinks + window rows
        assert [pk.shape[2] for pk, _ in caches][-1] == 6 and max(pk.shape[2] for pk, _ in caches) == 6


def test_ring_rows_hold_what_the_ring_rule_says():
    """After the whole sequence each ring row holds the key of the real token span_ring.row_index names."""
    seq = sequence(GROUP)
    _, caches = run_sequence(reference_step(attrs_of(GROUP, True)), GROUP, True, 0, seq)
    pk = caches[-1][0]
    mask = seq["attention_mask"].bool()
    held = span_ring.row_index(6, mask.sum(1), 2, 4)
    for b in range(2):
        keys = seq["key"][b][:, mask[b]]  # real tokens only
        for row, r in enumerate(held[b].tolist()):
            assert torch.equal(pk[b, :, row], keys[:, r])


# ---- the compiled CPU op and the Python op ------------------------------------------------------------
def graph(attrs: dict) -> bytes:
    return node_graph(attrs, name="span0")


def compiled_step(library, attrs: dict):
    opts = ort.SessionOptions()
    ort_ops.register(opts, library)
    sess = ort.InferenceSession(graph(attrs), opts, providers=["CPUExecutionProvider"])

    def step(feeds):
        return sess.run(None, {n: t.numpy() for n, t in feeds.items()})
    return step


@pytest.mark.parametrize("layer", [GROUP, CLUSTERED], ids=["group", "clustered"])
@pytest.mark.parametrize("ring, share", [(True, 0), (True, 1), (False, 0), (False, 1)])
def test_compiled_op_matches_the_reference_over_a_sequence(ort_ops_library, layer, ring, share):
    attrs = attrs_of(layer, ring, share)
    seq = sequence(layer, seed=1)
    want, want_caches = run_sequence(reference_step(attrs), layer, ring, share, seq)
    got, got_caches = run_sequence(compiled_step(ort_ops_library, attrs), layer, ring, share, seq)
    assert (real_rows(got, seq) - real_rows(want.float(), seq)).abs().max() < 1e-5
    for (gk, gv), (wk, wv) in zip(got_caches, want_caches, strict=True):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)


def test_python_op_runs_the_span_path():
    pytest.importorskip("onnxruntime_extensions")
    from chai_compile.export.ort_python_op import ort_ready_model
    from chai_compile.export.ort_runner import _extensions_library

    attrs = attrs_of(GROUP, True)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(_extensions_library())
    sess = ort.InferenceSession(ort_ready_model(onnx.load_from_string(graph(attrs))), opts,
                                providers=["CPUExecutionProvider"])
    seq = sequence(GROUP, seed=2)
    got, _ = run_sequence(lambda f: sess.run(None, {n: t.numpy() for n, t in f.items()}), GROUP, True, 0, seq)
    want, _ = run_sequence(reference_step(attrs), GROUP, True, 0, seq)
    assert (real_rows(got, seq) - real_rows(want.float(), seq)).abs().max() < 1e-6


# ---- bad input: one line ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, text", [
    ({"span_window": [3, 2, 4, 9]}, "every cluster needs a span inside it"),
    ({"ring_sinks": 1, "ring_window": 0}, "ring_sinks 0 without a ring"),
    ({"span_sinks": [1, 0]}, "span_sinks and span_window"),
    ({"causal": 0}, "span attributes need causal = 1"),
])
def test_bad_span_attributes_are_one_line_in_python_and_in_the_library(ort_ops_library, change, text):
    attrs = {**attrs_of(GROUP, True), **change}
    with pytest.raises(ValueError, match="span|ring"):
        fused_op.validate_attributes(dict(attrs))
    with pytest.raises(Exception) as info:
        compiled_step(ort_ops_library, attrs)
    err = ort_ops.run_error(info.value)
    assert err is not None and "\n" not in str(err) and "span0" in str(err), str(info.value)
    assert text.split()[0] in str(err)


def test_a_ring_past_of_the_wrong_size_is_one_line(ort_ops_library):
    step = compiled_step(ort_ops_library, attrs_of(GROUP, True))
    seq = sequence(GROUP)
    feeds = {"query": seq["query"][:, :, 9:10], "key": seq["key"][:, :, 9:10], "value": seq["value"][:, :, 9:10],
             "past_key": torch.zeros(2, 2, 9, D), "past_value": torch.zeros(2, 2, 9, D),
             "attention_mask": seq["attention_mask"][:, :10]}
    with pytest.raises(Exception) as info:
        step(feeds)
    err = ort_ops.run_error(info.value)
    assert err is not None and "past_key holds 9 rows" in str(err) and "min(past, sinks + window) = 6" in str(err)
