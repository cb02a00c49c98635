"""The mapping format: round trip, canonical form, derived K heads, and every validation failure."""

from __future__ import annotations

import json

import pytest

from chai_compile.choices import LayerKind
from chai_compile.errors import FingerprintMismatchError, MappingError
from chai_compile.layout import check_offsets, cluster_layout
from chai_compile.mapping import (
    Cluster,
    ClusterMapping,
    LayerMapping,
    ModelInfo,
    Span,
    UnsupportedLayerKindError,
)


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


def test_cluster_layout_is_a_permutation_with_contiguous_clusters():
    m = _mapping()
    lay = cluster_layout(m, 1)
    assert sorted(lay.permutation) == list(range(8))
    assert lay.cluster_offsets == (0, 3, 6, 8)
    # the documented order: clusters by the KV head their representative reads; representative first
    assert [lay.permutation[o] for o in lay.cluster_offsets[:-1]] == [2, 4, 7]
    assert lay.permutation == (2, 1, 3, 4, 0, 5, 7, 6)
    kept = m.kept_k_heads(1)
    assert list(lay.kept_k_heads) == kept
    assert [kept[i] for i in lay.k_head_index] == [2 // 2, 4 // 2, 7 // 2]
    assert lay.v_head_index == tuple(h // 2 for h in lay.permutation)
    assert [lay.permutation[p] for p in lay.inverse_permutation] == list(range(8))
    # dense: the identity layout, every KV head kept
    dense = cluster_layout(m, 0)
    assert dense.permutation == tuple(range(8)) and dense.cluster_offsets == tuple(range(9))
    assert dense.kept_k_heads == (0, 1, 2, 3) and dense.slot_of_head == tuple(range(8))


def test_cluster_offsets_are_checked_in_one_place():
    check_offsets([0, 2, 5], 5)
    for bad in ([1, 2, 5], [0, 2, 2, 5], [0], []):
        with pytest.raises(ValueError, match="strictly increasing"):
            check_offsets(bad)
    with pytest.raises(ValueError, match="to 6"):
        check_offsets([0, 2, 5], 6)


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


# ---- schema v3: shared and span layers (read, validated, refused by the transforms) --------------
def _v3(tmp_path, layers) -> ClusterMapping:
    info = _info(num_layers=len(layers))
    return ClusterMapping(info, tuple(layers))


def test_v3_round_trip_shared_and_span(tmp_path):
    spans = tuple(Span(4, 64 * (h + 1)) for h in range(8))
    m = ClusterMapping.build(_info(num_layers=3, qk_head_norms=()), [
        LayerMapping(0, "dense"), LayerMapping(1, LayerKind.SHARED, source=0),
        LayerMapping(2, LayerKind.SPAN, spans=spans)])
    assert m.schema_version == 3 and m.layers[1].kind is LayerKind.SHARED
    again = ClusterMapping.read(m.write(tmp_path / "v3.json"))
    assert again == m and again.layers[2].spans[1] == Span(4, 128)

    assert json.loads((tmp_path / "v3.json").read_text())["layers"][1] == {"index": 1, "kind": "shared", "source": 0}
    assert m.summary()["score_heads_kept"] == 8 + 0 + 8  # a shared layer computes no scores of its own
    with pytest.raises(UnsupportedLayerKindError) as e:
        m.require_supported("export")
    line = e.value.one_line()
    assert "layer 1" in line and "not supported by this version" in line and "\n" not in line
    with pytest.raises(ValueError, match="no cluster layout"):
        cluster_layout(m, 2)

def test_span_layer_with_full_attention_heads_round_trips(tmp_path):
    spans = (None, Span(4, 256)) * 4  # retrieval heads keep the whole context
    m = ClusterMapping.build(_info(num_layers=1, qk_head_norms=()), [LayerMapping(0, LayerKind.SPAN, spans=spans)])
    again = ClusterMapping.read(m.write(tmp_path / "m.json"))
    assert again.layers[0].spans == spans


def test_versions_written_are_the_lowest_that_carry_the_plan():
    m = _mapping()
    assert m.schema_version == 1 and m.to_dict()["schema_version"] == 1
    assert len(m.plan_sha256()) == 64
    other = ClusterMapping.build(m.model, [LayerMapping(0, "dense"), LayerMapping(1, "dense")])
    assert other.plan_sha256() != m.plan_sha256()
    assert ClusterMapping(m.model, m.layers, {"other": "provenance"}).plan_sha256() == m.plan_sha256()


@pytest.mark.parametrize("layers, needle, value", [
    ([LayerMapping(0, "dense"), LayerMapping(1, LayerKind.SHARED, source=1)], "earlier layer", 1),
    ([LayerMapping(0, LayerKind.SHARED, source=0), LayerMapping(1, "dense")], "earlier layer", 0),
    ([LayerMapping(0, "dense"), LayerMapping(1, LayerKind.SHARED, source=0),
      LayerMapping(2, LayerKind.SHARED, source=1)], "itself shared", 1),
    ([LayerMapping(0, LayerKind.SPAN, spans=(Span(-1, 8),) * 8)], "sinks must be", -1),
    ([LayerMapping(0, LayerKind.SPAN, spans=(Span(0, 0),) * 8)], "window must be", 0),
    ([LayerMapping(0, LayerKind.SPAN, spans=(Span(0, 4),) * 3)], "one span per query head", 3),
    ([LayerMapping(0, LayerKind.SPAN, spans=(None,) * 8)], "at least one span head", None),
    ([LayerMapping(0, "dense", source=0)], "must not list source", None),
])
def test_shared_and_span_validation_carries_the_value(tmp_path, layers, needle, value):
    with pytest.raises(MappingError) as e:
        _v3(tmp_path, layers).validate()
    assert needle in e.value.one_line() and e.value.value == value


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["layers"][1].update(kind="shared", source=5), "must be in 0..1"),
    (lambda d: d["layers"][1].update(kind="span", spans=[{"sinks": 0, "window": 0}] * 8), "'window' must be in 1"),
    (lambda d: d["layers"][1].update(kind="span", spans=[{"sinks": 0}] * 8), "'window' is missing"),
    (lambda d: (d["layers"][1].update(kind="dense"), d["layers"][0].update(kind="shared", source=0)),
     "earlier layer"),
])
def test_v3_reader_names_the_problem(tmp_path, edit, needle):
    def v3(d):
        d["schema_version"] = 3
        d["layers"][1].pop("clusters")
        d["layers"][1].pop("kept_k_heads")
        edit(d)

    with pytest.raises(MappingError) as e:
        ClusterMapping.read(_edit(tmp_path, v3))
    assert needle in e.value.one_line(), e.value.one_line()
