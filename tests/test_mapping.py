"""The mapping format: round trip, canonical form, derived K heads, and every validation failure."""

from __future__ import annotations

import json

import pytest

from chai_compile.errors import FingerprintMismatchError, MappingError
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, ModelInfo


def _info(**kw) -> ModelInfo:
    base = dict(architecture="LlamaForCausalLM", model_type="llama", num_layers=2, num_heads=8, num_kv_heads=4,
                head_dim=8, hidden_size=64, config_sha256="c" * 64, qk_sha256="a" * 64,
                qk_head_norms=((1.0,) * 12, (2.0,) * 12))
    base.update(kw)
    return ModelInfo(**base)


def _mapping() -> ClusterMapping:
    layers = [
        LayerMapping(0, "dense"),
        LayerMapping(1, "clustered", (Cluster((5, 4, 0), 4), Cluster((1, 2, 3), 2), Cluster((6, 7), 7))),
    ]
    return ClusterMapping.build(_info(), layers, {"calibration": "test"})


def test_round_trip_is_exact(tmp_path):
    m = _mapping()
    path = m.write(tmp_path / "m.json")
    again = ClusterMapping.read(path)
    assert again == m
    assert again.to_json() == path.read_text()


def test_canonical_order_and_derived_fields():
    m = _mapping()
    assert [c.members for c in m.layers[1].clusters] == [(0, 4, 5), (1, 2, 3), (6, 7)]
    # group size 2: representatives 4, 2, 7 read KV heads 2, 1, 3
    assert m.kept_k_heads(1) == [1, 2, 3]
    assert m.kept_k_heads(0) == [0, 1, 2, 3]
    s = m.summary()
    assert s["k_heads_kept"] == 7 and s["k_heads_total"] == 8
    assert s["score_heads_kept"] == 8 + 3


def test_fused_layout_is_a_permutation_with_contiguous_clusters():
    m = _mapping()
    lay = m.fused_layout(1)
    assert sorted(lay.permutation) == list(range(8))
    assert lay.cluster_offsets == (0, 3, 6, 8)
    # representative first in each range
    assert [lay.permutation[o] for o in lay.cluster_offsets[:-1]] == [4, 2, 7]
    kept = m.kept_k_heads(1)
    assert [kept[i] for i in lay.k_head_index] == [4 // 2, 2 // 2, 7 // 2]
    assert lay.v_head_index == tuple(h // 2 for h in lay.permutation)


def _edit(tmp_path, fn) -> str:
    d = _mapping().to_dict()
    fn(d)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["layers"][1]["clusters"][0]["members"].append(99), "out of range"),
        (lambda d: d["layers"][1]["clusters"][1]["members"].append(0), "exactly one cluster"),
        (lambda d: d["layers"][1]["clusters"][2]["members"].remove(6), "in no cluster"),
        (lambda d: d["layers"][1]["clusters"][0].update(representative=1), "representative is not a member"),
        (lambda d: d["layers"][1].update(kept_k_heads=[0]), "kept_k_heads"),
        (lambda d: d.update(schema_version=7), "schema_version 7"),
        (lambda d: d["layers"].pop(), "mapping has 1 layers"),
        (lambda d: d["layers"][0].update(kind="shared"), "reserved"),
        (lambda d: d["layers"][0].update(kind="sparse"), "unknown layer kind"),
        (lambda d: d["model"].pop("num_heads"), "'num_heads' is missing"),
        (lambda d: d["layers"][1]["clusters"][0].update(members=["a"]), "integers"),
    ],
)
def test_reader_names_the_problem(tmp_path, edit, needle):
    path = _edit(tmp_path, edit)
    with pytest.raises(MappingError) as e:
        ClusterMapping.read(path)
    assert needle in e.value.one_line()
    assert "\n" not in e.value.one_line()


def test_truncated_file(tmp_path):
    text = _mapping().to_json()
    p = tmp_path / "t.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(MappingError, match="not valid JSON"):
        ClusterMapping.read(p)


def test_missing_file(tmp_path):
    with pytest.raises(MappingError, match="not found"):
        ClusterMapping.read(tmp_path / "nope.json")


def test_fingerprint_checks():
    m = _mapping()
    m.check_model(_info())  # same
    # same weights at another precision: hash differs, norms agree within tolerance
    m.check_model(_info(qk_sha256="b" * 64, qk_head_norms=((1.0001,) * 12, (2.0,) * 12)))
    with pytest.raises(FingerprintMismatchError, match="checkpoint"):
        m.check_model(_info(qk_sha256="b" * 64, qk_head_norms=((1.1,) * 12, (2.0,) * 12)))
    with pytest.raises(FingerprintMismatchError, match="num_heads"):
        m.check_model(_info(num_heads=16))


def test_identity_mapping_keeps_everything():
    m = ClusterMapping.identity(_info())
    s = m.summary()
    assert s["k_cache_saving"] == 0 and s["score_heads_kept"] == s["query_heads_total"]
