"""benchmarks/bench_attention_forms.py graphs: portable and opset-23 Attention (V packed per cluster) forms
match a float64 reference on tiny shapes, equal and unequal clusters, decode and core graphs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention_forms.py"


def _load():
    name = "bench_attention_forms"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


bf = _load()
LayerSpec = bf.LayerSpec

SPECS = {
    "mha_equal": LayerSpec.from_sizes("mha_equal", 8, 8, 16, [4, 4]),
    "mha_unequal": LayerSpec.from_sizes("mha_unequal", 8, 8, 16, [1, 3, 4]),
    # GQA group 3: K head 1 serves clusters 0 and 2 (stored twice in the per-cluster layout), the gqa layout does
    # not apply (K head 0 serves one cluster), packs are unequal (V heads {1, 0}, {0}, {1}).
    "gqa_shared_k": LayerSpec("gqa_shared_k", 6, 2, 8, ((4, (0, 3, 4)), (1, (1, 2)), (5, (5,)))),
    # GQA group 2: two clusters per kept K head, so the gqa layout applies, with unequal unions ({0, 2} vs {1}).
    "gqa_unequal": LayerSpec("gqa_unequal", 6, 3, 8, ((0, (0, 4, 5)), (1, (1,)), (2, (2,)), (3, (3,)))),
}


def _case(spec, seq):
    return bf.Case.random(spec, batch=2, past=11, seq=seq, pad=3, seed=seq)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("seq", [1, 3])
def test_every_form_matches_reference(name, seq):
    spec = SPECS[name]
    forms = bf.forms_for(spec)
    names = {f.name for f in forms}
    assert {"dense_std", "dense_a23", "chai_portable", "chai_a23_cluster_pad"} <= names
    if name == "gqa_unequal":
        assert {"chai_a23_gqa_pad", "chai_a23_gqa_split"} <= names
    case = _case(spec, seq)
    for form in forms:
        for with_past in (True, False):
            assert bf.check_form(form, case, with_past) < bf.ATOL


def test_unequal_clusters_pad_and_split():
    spec = SPECS["mha_unequal"]
    pad, split = bf.a23_layout(spec, "cluster", "pad"), bf.a23_layout(spec, "cluster", "split")
    assert pad.padded and len(pad.nodes) == 1 and pad.nodes[0].width == 4
    assert not split.padded and sorted(n.width for n in split.nodes) == [1, 3, 4]
    forms = {f.name: f for f in bf.forms_for(spec)}
    cost = {k: bf.cost(spec, forms[k], 100)["cache_bytes"] for k in ("chai_a23_cluster_pad", "chai_a23_cluster_split")}
    # pad: 3 kv heads x (K + 4 V) = 15 head rows per token; split: (1+1) + (1+3) + (1+4) = 11
    assert cost["chai_a23_cluster_pad"] == 15 * 16 * 101 * 4 and cost["chai_a23_cluster_split"] == 11 * 16 * 101 * 4


def test_gqa_packs_deduplicate_shared_v_heads():
    spec = LayerSpec("g", 6, 2, 8, ((0, (0, 1, 2)), (3, (3, 4, 5))))  # each cluster is one GQA group
    lay = bf.a23_layout(spec, "cluster", "pad")
    assert [n.width for n in lay.nodes] == [1]  # three members, one distinct V head each
    assert bf.a23_layout(spec, "cluster", "pad", dedupe=False).nodes[0].width == 3
    case = _case(spec, 1)
    for form in bf.forms_for(spec):
        bf.check_form(form, case)


def test_check_fails_loudly_on_wrong_graph():
    spec = SPECS["mha_unequal"]
    other = LayerSpec.from_sizes("other", 8, 8, 16, [3, 1, 4])  # same shapes, other membership
    form = next(f for f in bf.forms_for(other) if f.name == "chai_a23_cluster_split")
    with pytest.raises(AssertionError, match="max abs diff"):
        bf.check_form(form, _case(spec, 1))


def test_reference_matches_contract_reference():
    """The benchmark's numpy reference agrees with chai_compile.kernels.fused_op (the exporter's contract)."""
    torch = pytest.importorskip("torch")
    from chai_compile.kernels.fused_op import clustered_attention_reference, node_attributes

    spec = SPECS["gqa_shared_k"]
    case = _case(spec, 3)
    form = next(f for f in bf.forms_for(spec) if f.name == "chai_portable")
    feeds = case.feeds(form, with_past=True)
    perm = [h for rep, members in spec.clusters for h in [rep, *sorted(set(members) - {rep})]]
    offsets = np.cumsum([0, *spec.sizes()]).tolist()
    attrs = node_attributes(num_heads=spec.num_heads, cluster_offsets=offsets, k_head_index=spec.k_of_cluster,
                            v_head_index=[h // spec.group for h in perm], num_k_heads=len(spec.kept),
                            num_v_heads=spec.num_kv_heads, head_dim=spec.head_dim, scale=spec.head_dim ** -0.5)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    out, _, _ = clustered_attention_reference(t["query"], t["key"], t["value"], t["past_key"], t["past_value"],
                                              t["attention_mask"], **attrs)
    b, s, _ = out.shape
    out = out.reshape(b, s, spec.num_heads, spec.head_dim)[:, :, np.argsort(perm)].reshape(b, s, -1)
    ref, _ = case.expected(form)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_smollm2_mapping_layer():
    mapping = Path(bf.DEFAULT_MAPPING)
    if not mapping.is_file():
        pytest.skip("docs/results/smollm2/kv20.json missing")
    for spec in bf.default_specs(mapping)[:len(bf.DEFAULT_SMOLLM2_LAYERS)]:
        assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (9, 3, 64)
        case = bf.Case.random(spec, batch=1, past=8)
        for form in bf.forms_for(spec):
            bf.check_form(form, case)
