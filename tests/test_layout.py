"""One layout, one reference: the rewrite, the fused export's node attributes and the Triton kernel plan all
agree with `cluster_layout`, and every form's attention matches kernels/reference.py (rows with an
allowed key; see the masked-row rule there)."""

from __future__ import annotations

import copy

import pytest
import torch

from chai_compile.adapters import adapter_for
from chai_compile.fingerprint import model_info
from chai_compile.kernels import build_plan, fused_op, plan_for_layout
from chai_compile.kernels.reference import clustered_attention
from chai_compile.layout import cluster_layout, layer_layout
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
from chai_compile.rewrite import DynamicClusteredAttention, StaticClusteredAttention, apply_mapping
from tests.test_rewrite import left_padded
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def crossing_mapping(model: torch.nn.Module) -> ClusterMapping:
    """8 heads over 2 KV heads (group 4): clusters cross KV groups, two representatives share K head 1,
    K head 0 is read by none; layer 0 dense."""
    info = model_info(adapter_for(model))
    clusters = (Cluster((0, 5), 5), Cluster((1, 2, 7), 7), Cluster((3,), 3), Cluster((4, 6), 6))
    return ClusterMapping.build(info, [LayerMapping(0, "dense"), LayerMapping(1, "clustered", clusters)])


@pytest.fixture(scope="module")
def gqa():
    model = tiny_model("llama-gqa")
    mapping = crossing_mapping(model)
    return model, mapping, apply_mapping(copy.deepcopy(model), mapping)


def test_the_documented_order(gqa):
    _, mapping, _ = gqa
    lay = cluster_layout(mapping, 1)
    # by (K head of the representative, representative): 3 (K0), 5, 6, 7 (K1); representative first
    assert lay.representatives == (3, 5, 6, 7)
    assert lay.permutation == (3, 5, 0, 6, 4, 7, 1, 2) and lay.cluster_offsets == (0, 1, 3, 5, 8)
    assert lay.kept_k_heads == (0, 1) and lay.k_head_index == (0, 1, 1, 1)
    assert lay.slots_per_k == 3 and lay.slot_of_cluster == (0, 3, 4, 5)


def test_rewrite_uses_the_layout(gqa):
    model, mapping, chai = gqa
    attn = adapter_for(chai).attention(1)
    lay = cluster_layout(mapping, 1)
    assert isinstance(attn, StaticClusteredAttention) and attn.layout == lay
    offs, kidx, vidx = lay.index_tensors()
    assert torch.equal(attn.cluster_offsets, offs) and torch.equal(attn.k_head_index, kidx)
    assert torch.equal(attn.v_head_index, vidx)
    assert attn.slot_of_head.tolist() == list(lay.slot_of_head)
    assert attn.inverse_permutation.tolist() == list(lay.inverse_permutation)
    d = attn.head_dim
    q_rows = adapter_for(model).projections(1).q_weight.view(8, d, -1)[list(lay.representatives)]
    assert torch.equal(attn.q_proj.weight.view(-1, d, q_rows.shape[-1]), q_rows)


def test_fused_export_attributes_are_the_layout(gqa):
    from chai_compile.export.fused import FusedClusteredAttention, prepare_fused
    from chai_compile.export.onnx_export import DecoderWrapper, cache_spec

    _, mapping, chai = gqa
    wrapper, _ = prepare_fused(DecoderWrapper(chai, cache_spec(chai)), kv_cache="inplace")
    fused = [m for m in wrapper.modules() if isinstance(m, FusedClusteredAttention)]
    assert [f.layer_idx for f in fused] == [0, 1]  # the dense layer as its identity layout
    for f in fused:
        lay = cluster_layout(mapping, f.layer_idx)
        a = f.attributes
        assert (a["cluster_offsets"], a["k_head_index"], a["v_head_index"]) == (
            list(lay.cluster_offsets), list(lay.k_head_index), list(lay.v_head_index))
        assert a["num_k_heads"] == len(lay.kept_k_heads) and a["past_present_share_buffer"] == 1
        fused_op.validate_attributes(a)
    # The user's model is untouched: the export replaced modules on its own copy.
    assert isinstance(adapter_for(chai).attention(1), StaticClusteredAttention)
    assert not isinstance(adapter_for(chai).attention(0), StaticClusteredAttention)


@pytest.mark.parametrize("heads,kv", [(8, 2), (8, 8), (6, 3)])
def test_kernel_plan_follows_the_layout(heads, kv):
    g = torch.Generator().manual_seed(heads + kv)
    perm = torch.randperm(heads, generator=g).tolist()
    cuts = [perm[:3], perm[3:4], perm[4:]]
    layer = LayerMapping(0, "clustered", tuple(Cluster(tuple(c), c[-1]) for c in cuts))
    lay = layer_layout(layer, heads, kv)
    plan = plan_for_layout(lay, tile_width=2)
    assert plan.num_heads == heads and plan.num_clusters == lay.num_clusters
    tiles = plan.tiles.tolist()
    for c, kh, count, _, *vheads in tiles:
        assert kh == lay.k_head_index[c]
        members = range(lay.cluster_offsets[c], lay.cluster_offsets[c + 1])
        assert set(vheads[:count]) <= {lay.v_head_index[i] for i in members}
    slot_vhead = {first + j: v for _, _, count, first, *vh in tiles for j, v in enumerate(vh[:count])}
    assert [slot_vhead[s] for s in plan.slot_of_head.tolist()] == list(lay.v_head_index)
    with pytest.raises(ValueError, match="strictly increasing"):
        build_plan(torch.tensor([0, 3, 3, 8]), *lay.index_tensors()[1:])


# ---- every form against the one reference --------------------------------------------------------------
def _captured_call(model, layer: int, ids, mask):
    """The AttentionCall layer `layer`'s module received during a full forward (no cache)."""
    seen = {}
    attn = adapter_for(model).attention(layer)
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.update(call=m.adapter.call_inputs(a, k)),
                                            with_kwargs=True)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return attn, seen["call"]


def _allowed(mask: torch.Tensor, s: int) -> torch.Tensor:
    """[B, 1, S, S] causal & padding: what a full forward attends."""
    return (torch.ones(s, s, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :])


def _compare_rows(got: torch.Tensor, want: torch.Tensor, allowed: torch.Tensor) -> None:
    rows = allowed.any(-1)[:, 0]  # [B, S]: rows with an allowed key
    diff = (got.double() - want).abs().amax(dim=(1, 3))[rows]
    assert diff.max().item() <= 2e-5, diff.max().item()


@pytest.mark.parametrize("family", ["llama-gqa", "gpt_neox"])
def test_static_torch_path_matches_the_reference(family):
    model = tiny_model(family)
    mapping = crossing_mapping(model) if family == "llama-gqa" else ClusterMapping.build(
        model_info(adapter_for(model)), [LayerMapping(0, "dense"), LayerMapping(
            1, "clustered", (Cluster((0, 3), 3), Cluster((1, 2), 1)))])
    chai = apply_mapping(copy.deepcopy(model), mapping)
    ids, mask = left_padded(model.config.vocab_size)
    attn, call = _captured_call(chai, 1, ids, mask)
    from chai_compile.rewrite.static import positioned_qkv

    with torch.no_grad():
        q, k, v = positioned_qkv(attn, call)
        got = attn.scores_path(q, k, v, call.attention_mask)
    allowed = _allowed(mask, ids.shape[1])
    lay = attn.layout
    want = clustered_attention(q, k, v, allowed, *lay.index_tensors(), attn.scale)
    _compare_rows(got, want.index_select(1, torch.tensor(lay.inverse_permutation)), allowed)


def test_dynamic_path_matches_the_reference():
    model = tiny_model("llama-gqa")
    chai = apply_mapping(copy.deepcopy(model), crossing_mapping(model), membership="dynamic")
    ids, mask = left_padded(model.config.vocab_size)
    attn, call = _captured_call(chai, 1, ids, mask)
    assert isinstance(attn, DynamicClusteredAttention)
    with torch.no_grad():
        got = attn.attend(call, None)
        reps, cluster_of_head, _, _ = attn._decide_membership(call)
        h = attn.num_heads
        q_all = attn.heads(torch.nn.functional.linear(call.hidden_states, attn.q_weight, attn.q_bias), h)
        q_all, k = attn.adapter.position(q_all, attn.heads(attn.k_proj(call.hidden_states), attn.num_kv_heads), call)
        v = attn.heads(attn.v_proj(call.hidden_states), attn.num_kv_heads)
    allowed = _allowed(mask, ids.shape[1])
    for b in range(ids.shape[0]):  # membership is per sequence: one layout each
        members = {int(r): tuple(h_ for h_ in range(h) if int(cluster_of_head[b, h_]) == c)
                   for c, r in enumerate(reps[b])}
        lay = layer_layout(LayerMapping(1, "clustered", tuple(Cluster(m, r) for r, m in members.items())),
                           h, attn.num_kv_heads)
        kk = k[b:b + 1, list(lay.kept_k_heads)]
        want = clustered_attention(q_all[b:b + 1, list(lay.representatives)], kk, v[b:b + 1], allowed[b:b + 1],
                                   *lay.index_tensors(), attn.scale)
        _compare_rows(got[b:b + 1], want.index_select(1, torch.tensor(lay.inverse_permutation)), allowed[b:b + 1])


def test_fused_node_matches_the_rewrite(gqa):
    """The export's form run eagerly (the custom op = the contract's reference) gives the rewrite's logits."""
    from chai_compile.export.fused import prepare_fused
    from chai_compile.export.onnx_export import DecoderWrapper, cache_spec

    _, _, chai = gqa
    spec = cache_spec(chai)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        want = chai(ids, attention_mask=mask, use_cache=False).logits
        wrapper, _ = prepare_fused(DecoderWrapper(chai, spec))
        got = wrapper(ids, mask, pos, *spec.empty(2, 0, torch.float32))[0]
    assert (got - want).abs().max().item() <= 1e-5
