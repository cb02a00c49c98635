"""CHAI rewrite: identity property, real clustered mappings against a naive reference, smaller K cache,
generate() on every family with left padding, half precision, dynamic membership, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from chai_compile.adapters import adapter_for, apply_rotary
from chai_compile.compat import model_forward, output_cache
from chai_compile.errors import ChaiError, FingerprintMismatchError
from chai_compile.fingerprint import model_info
from chai_compile.kernels.reference import clustered_attention
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
from chai_compile.rewrite import ClusteredAttention, apply_mapping, average_linkage, kv_cache_bytes
from tests.conftest import STORIES, STORIES_MHA
from tests.tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")


# ---- helpers ---------------------------------------------------------------------------------
def eager_copy(model: nn.Module) -> nn.Module:
    """A private copy on the eager attention path. transformers' own sdpa and eager paths differ by
    ~1.6e-5 on stories260K logits, more than the identity tolerance, so parity is measured against
    eager (the math the clustered module runs); session fixtures are never mutated."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def identity_mapping(model: nn.Module) -> ClusterMapping:
    return ClusterMapping.identity(model_info(adapter_for(model)))


def paired_mapping(model: nn.Module, dense: tuple[int, ...] = (0,), shuffle_reps: bool = True) -> ClusterMapping:
    """A real clustered mapping: heads in pairs (h, h + H/2) so GQA representatives can share a KV head,
    the higher member as representative in odd layers, the listed layers dense."""
    info = model_info(adapter_for(model))
    h = info.num_heads
    layers = []
    for i in range(info.num_layers):
        if i in dense:
            layers.append(LayerMapping(i, "dense"))
            continue
        half = h // 2
        pairs = [(a, a + half) for a in range(half)] if i % 2 == 0 else [(2 * a, 2 * a + 1) for a in range(half)]
        layers.append(LayerMapping(i, "clustered", tuple(
            Cluster(p, p[1] if (shuffle_reps and i % 2) else p[0]) for p in pairs)))
    return ClusterMapping.build(info, layers, {"kind": "test-pairs"})


def stepwise_logits(model: nn.Module, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill then `steps` greedy decode steps through the model's own DynamicCache."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model_forward(model, cache, input_ids=ids).logits
        out.append(logits)
        for _ in range(steps):
            tok = logits[:, -1:].argmax(-1)
            logits = model_forward(model, cache, input_ids=tok).logits
            out.append(logits)
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def left_padded(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3] = 0
    mask[1, :3] = 0  # row 1: three left-padding tokens
    return ids, mask


class NaiveChaiAttention(nn.Module):
    """Independent per-head CHAI reference for Llama-family layers (full sequence, no cache):
    out_h = softmax(q_{r(c(h))} k_{g(r)}^T / sqrt(d) + causal) v_{g(h)}, from the ORIGINAL weights, each head
    gathered by hand (no cluster layout) and the attention computed by the one reference (kernels/reference.py)
    with every head its own cluster."""

    def __init__(self, attn: nn.Module, layer: LayerMapping, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.attn, self.layer = attn, layer
        self.h, self.kv = num_heads, num_kv_heads

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        a, d = self.attn, self.attn.head_dim
        b, t, _ = hidden_states.shape
        group = self.h // self.kv
        cos, sin = position_embeddings
        rep_of = {h: c.representative for c in self.layer.clusters for h in c.members}
        q, k, v = [], [], []
        for h in range(self.h):
            r = rep_of[h]
            q.append(apply_rotary((hidden_states @ a.q_proj.weight[r * d:(r + 1) * d].T)[:, None], cos, sin))
            k.append(apply_rotary((hidden_states @ a.k_proj.weight[(r // group) * d:(r // group + 1) * d].T)[:, None],
                                  cos, sin))
            v.append((hidden_states @ a.v_proj.weight[(h // group) * d:(h // group + 1) * d].T)[:, None])
        every = torch.arange(self.h)
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        out = clustered_attention(torch.cat(q, 1), torch.cat(k, 1), torch.cat(v, 1), causal, torch.arange(self.h + 1),
                                  every, every, d**-0.5)
        return a.o_proj(out.to(hidden_states.dtype).transpose(1, 2).reshape(b, t, self.h * d)), None


def naive_chai(model: nn.Module, mapping: ClusterMapping) -> nn.Module:
    ref = copy.deepcopy(model)
    ad = adapter_for(ref)
    for i, lm in enumerate(mapping.layers):
        if lm.kind == "clustered":
            layer = ad.decoder_layers()[i]
            layer.self_attn = NaiveChaiAttention(layer.self_attn, lm, ad.spec.num_heads, ad.spec.num_kv_heads)
    return ref


# ---- identity on the real models ------------------------------------------------------------
@needs_stories
def test_identity_stories260k(stories):
    orig = eager_copy(stories.model)
    chai = apply_mapping(eager_copy(stories.model), identity_mapping(orig))
    ids = torch.randint(3, orig.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = stepwise_logits(chai, ids, 20)
    diff = max_diff(stepwise_logits(orig, ids, 20), got)
    assert diff <= 1e-5, diff
    # against the model as loaded (sdpa): only transformers' own sdpa-vs-eager rounding remains
    assert max_diff(stepwise_logits(stories.model, ids, 20), got) <= 1e-4


def test_identity_smollm2(smollm2):
    orig = eager_copy(smollm2.model)
    chai = apply_mapping(eager_copy(smollm2.model), identity_mapping(orig))
    ids = smollm2.tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt").input_ids
    got = stepwise_logits(chai, ids, 20)
    diff = max_diff(stepwise_logits(orig, ids, 20), got)
    assert diff <= 1e-5, diff
    # against the model as loaded (sdpa): only transformers' own sdpa-vs-eager rounding remains
    assert max_diff(stepwise_logits(smollm2.model, ids, 20), got) <= 1e-4


@needs_stories
def test_adapter_reads_the_scale_from_a_rewritten_layer_zero(stories):
    # Adapters read the softmax scale from layer 0; building later layers (and exporting) must not depend on
    # layer 0 still being the Hugging Face module.
    chai = apply_mapping(eager_copy(stories.model), identity_mapping(stories.model))
    assert type(adapter_for(chai).attention(0)).__name__ != type(adapter_for(stories.model).attention(0)).__name__
    assert adapter_for(chai).scaling() == adapter_for(stories.model).scaling()


# ---- a real clustered mapping -----------------------------------------------------------------
@needs_stories
def test_clustered_mapping_smaller_and_equals_naive_reference(stories):
    orig = eager_copy(stories.model)
    mapping = paired_mapping(orig, dense=(0, 1))
    chai = apply_mapping(eager_copy(stories.model), mapping)
    info, ad = mapping.model, adapter_for(chai)
    d = info.head_dim

    # Sliced projections: Q rows only for representatives, K rows only for kept KV heads.
    for i, lm in enumerate(mapping.layers):
        attn = ad.attention(i)
        if lm.kind == "dense":
            assert not isinstance(attn, ClusteredAttention)
            continue
        assert isinstance(attn, ClusteredAttention)
        assert attn.q_proj.weight.shape[0] == lm.num_clusters * d < info.num_heads * d
        assert attn.k_proj.weight.shape[0] == len(mapping.kept_k_heads(i)) * d
        assert attn.v_proj.weight.shape[0] == info.num_kv_heads * d
    assert mapping.summary()["k_heads_kept"] < mapping.summary()["k_heads_total"]

    # Against the independent per-head reference, full sequence.
    ids = torch.randint(3, orig.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = naive_chai(orig, mapping)(ids).logits
        got = chai(ids).logits
    assert (ref - got).abs().max().item() <= 1e-4

    # Decode through the cache equals the full-sequence forward (the cache path is consistent).
    steps = stepwise_logits(chai, ids[:, :10], 6)
    with torch.no_grad():
        seq = torch.cat([ids[:, :10]] + [s[:, -1:].argmax(-1) for s in steps[:-1]], dim=1)
        full = chai(seq).logits
    assert (full[:, -1] - steps[-1][:, -1]).abs().max().item() <= 1e-4

    # The cache really holds less K: measured from its tensors, per layer.
    cache_o, cache_c = DynamicCache(config=orig.config), DynamicCache(config=chai.config)
    with torch.no_grad():
        model_forward(orig, cache_o, input_ids=ids)
        model_forward(chai, cache_c, input_ids=ids)
    bo, bc = kv_cache_bytes(cache_o), kv_cache_bytes(cache_c)
    assert bc["value_bytes"] == bo["value_bytes"]
    assert bc["key_bytes"] < bo["key_bytes"]
    for i, layer in enumerate(bc["per_layer"]):
        assert layer["key_shape"] == [2, len(mapping.kept_k_heads(i)), 16, d]
        assert layer["value_shape"] == [2, info.num_kv_heads, 16, d]
    expected_k = sum(len(mapping.kept_k_heads(i)) for i in range(info.num_layers)) * 2 * 16 * d * 4
    assert bc["key_bytes"] == expected_k
    assert bc["total_bytes"] == bc["key_bytes"] + bc["value_bytes"]


# ---- every family: generate with left padding, sdpa and eager masks --------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_every_family(family):
    orig = tiny_model(family)
    ids, mask = left_padded(orig.config.vocab_size)
    gen = dict(max_new_tokens=6, pad_token_id=0, attention_mask=mask)

    # Identity: same greedy tokens as the original, with padding.
    ident = apply_mapping(copy.deepcopy(orig), identity_mapping(orig))
    with torch.no_grad():
        want = orig.generate(ids, do_sample=False, **gen)
        got = ident.generate(ids, do_sample=False, **gen)
    assert torch.equal(want, got)

    # Clustered: greedy generate equals argmax of full (uncached) forwards with the padding mask,
    # under both the eager (additive float) and sdpa (bool / None) mask conventions.
    mapping = paired_mapping(orig)
    chai = apply_mapping(copy.deepcopy(orig), mapping)
    with torch.no_grad():
        out = chai.generate(ids, do_sample=False, return_dict_in_generate=True, **gen)
        seq = ids
        for _ in range(6):
            m = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
            logits = chai(seq, attention_mask=m, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, seq)
    layer1 = kv_cache_bytes(output_cache(out))["per_layer"][1]
    kept = len(mapping.kept_k_heads(1))
    assert layer1["key_shape"][1] == kept and layer1["value_shape"][1] == mapping.model.num_kv_heads

    sdpa = copy.deepcopy(chai)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(sdpa.generate(ids, do_sample=False, **gen), out.sequences)
        torch.manual_seed(0)
        sampled = chai.generate(ids, do_sample=True, top_k=20, **gen)
    assert sampled.shape == (2, ids.shape[1] + 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(dtype):
    orig = tiny_model("llama-gqa")
    ids, mask = left_padded(orig.config.vocab_size)
    mapping = paired_mapping(orig)
    ref = apply_mapping(copy.deepcopy(orig), mapping)
    half = apply_mapping(copy.deepcopy(orig).to(dtype), mapping)
    assert half.model.layers[1].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = half(ids, attention_mask=mask).logits
        out = half.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - want)[mask.bool()].abs().max().item() < 0.05
    assert out.shape == (2, ids.shape[1] + 4)


# ---- dynamic membership ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama-gqa", "gpt_neox"])
def test_dynamic_membership_identity_counts_equal_original(family):
    orig = tiny_model(family)
    ids, mask = left_padded(orig.config.vocab_size)
    dyn = apply_mapping(copy.deepcopy(orig), identity_mapping(orig), membership="dynamic")
    with torch.no_grad():
        want = orig.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = dyn.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        lo = orig(ids, attention_mask=mask).logits
        ld = dyn(ids, attention_mask=mask).logits
    assert torch.equal(want, got)
    assert (lo - ld)[mask.bool()].abs().max().item() <= 1e-5


@needs_stories
def test_dynamic_membership_runs_and_keeps_all_k_heads(stories):
    orig = eager_copy(stories.model)
    mapping = paired_mapping(orig, dense=(0,))
    dyn = apply_mapping(eager_copy(stories.model), mapping, membership="dynamic")
    ids, mask = left_padded(orig.config.vocab_size, seed=3)
    with torch.no_grad():
        out = dyn.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True)
    assert out.sequences.shape == (2, ids.shape[1] + 5)
    for layer in kv_cache_bytes(output_cache(out))["per_layer"]:
        assert layer["key_shape"][1] == mapping.model.num_kv_heads  # saves compute, not memory


def test_average_linkage_matches_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(0)
    feats = torch.rand(3, 12, 25, generator=g, dtype=torch.float64)
    for k in (1, 4, 7, 12):
        labels = average_linkage(feats, k)
        for b in range(feats.shape[0]):
            z = hierarchy.linkage(pdist(feats[b].numpy(), "cosine"), "average")
            ref = hierarchy.fcluster(z, k, "maxclust")
            # Same partition (cluster names differ): heads together in one iff together in the other.
            same_ref = torch.tensor(ref[:, None] == ref[None, :])
            same_got = labels[b][:, None] == labels[b][None, :]
            assert torch.equal(same_ref, same_got), (k, b)
            # Representative naming: each head's label is its cluster's lowest head.
            for h in range(12):
                assert labels[b, h] == min(j for j in range(12) if same_got[h, j])


# ---- bad input ---------------------------------------------------------------------------------
@needs_stories
def test_mapping_for_another_model_is_refused(stories):
    mapping = identity_mapping(stories.model)
    with pytest.raises(FingerprintMismatchError):
        apply_mapping(tiny_model("llama"), mapping)
    if STORIES_MHA.is_dir():
        from chai_compile.loading import load_model

        with pytest.raises(FingerprintMismatchError):
            apply_mapping(load_model(str(STORIES_MHA)).model, mapping)


def test_bad_membership_and_double_rewrite():
    model = tiny_model("llama")
    mapping = identity_mapping(model)
    with pytest.raises(ChaiError, match="membership"):
        apply_mapping(copy.deepcopy(model), mapping, membership="sometimes")
    apply_mapping(model, mapping)
    with pytest.raises(ChaiError):  # rewriting a rewritten model is refused, not silently stacked
        apply_mapping(model, mapping)


def test_kv_cache_bytes_legacy_tuple():
    k, v = torch.zeros(2, 3, 5, 4), torch.zeros(2, 4, 5, 4, dtype=torch.float16)
    got = kv_cache_bytes(((k, v),))
    assert got == {"key_bytes": 2 * 3 * 5 * 4 * 4, "value_bytes": 2 * 4 * 5 * 4 * 2,
                   "total_bytes": 480 + 320, "per_layer": got["per_layer"]}
    assert got["per_layer"][0]["key_shape"] == [2, 3, 5, 4]


# ---- the static path traces (what the ONNX exporter needs) -------------------------------------
@pytest.mark.parametrize("family,attn", [("llama-gqa", "sdpa"), ("gpt_neox", "eager")])
def test_static_path_exports_with_dynamic_length(family, attn):
    orig = tiny_model(family, attn=attn)
    chai = apply_mapping(copy.deepcopy(orig), paired_mapping(orig))

    class Logits(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(ids, use_cache=False).logits

    ids = torch.randint(3, orig.config.vocab_size, (2, 9))
    seq = torch.export.Dim("seq", min=2, max=64)
    try:  # older torch (2.11) cannot prove its own guards for the unrewritten model either
        torch.export.export(Logits(orig), (ids,), dynamic_shapes=({1: seq},), strict=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this torch cannot export the original model with a dynamic length: {type(e).__name__}")
    ep = torch.export.export(Logits(chai), (ids,), dynamic_shapes=({1: seq},), strict=False)
    longer = torch.randint(3, orig.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(ep.module()(longer), Logits(chai)(longer), atol=1e-5)
