"""`profile` on real models: determinism, clustering rules, and bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import STORIES

from chai_compile.cli import main
from chai_compile.mapping import ClusterMapping
from chai_compile.profile.clustering import (
    choose_representatives,
    cluster_heads,
    cosine_distance,
    embed,
    knee,
    sse_curve,
)


def _run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def test_profile_stories_is_deterministic(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = _run(["profile", str(STORIES), "--samples", "8", "--seq-len", "64", "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        outs.append((tmp_path / name / "mapping.json").read_bytes())
    assert outs[0] == outs[1]
    m = ClusterMapping.read(tmp_path / "a" / "mapping.json")
    for f in ("profile.json", "report.md", "similarity.png", "knee_curves.png", "clusters_per_layer.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    prof = json.loads((tmp_path / "a" / "profile.json").read_text())
    assert prof["summary"]["k_heads_kept"] == m.summary()["k_heads_kept"]
    sim = np.asarray(prof["profile"]["similarity"]["rows"])
    assert sim.shape == (5, 8, 8)
    np.testing.assert_allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0, atol=1e-6)


def test_profile_overrides(tmp_path):
    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--clusters", "2",
              "--dense-layers", "0-1", "--representative", "lowest", "--method", "kmeans", "--out",
              str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    m = ClusterMapping.read(tmp_path / "o" / "mapping.json")
    assert [lm.kind for lm in m.layers] == ["dense", "dense", "clustered", "clustered", "clustered"]
    for lm in m.layers[2:]:
        assert lm.num_clusters == 2
        assert all(c.representative == c.members[0] for c in lm.clusters)
    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--clusters", "8,4,2,1,8",
              "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    m = ClusterMapping.read(tmp_path / "p" / "mapping.json")
    assert m.summary()["clusters_per_layer"] == [8, 4, 2, 1, 8]
    assert m.layers[0].kind == "dense"  # 8 clusters of 8 heads is dense


def test_knee_and_embedding():
    # three tight groups of heads: the knee of the k-means curve is 3
    rng = np.random.default_rng(0)
    centers = rng.random((3, 40))
    feats = np.concatenate([c + 0.01 * rng.random((3, 40)) for c in centers])
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    x = embed(sim)
    d_feat = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    d_emb = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.testing.assert_allclose(d_emb, d_feat, atol=1e-6)
    assert knee(sse_curve(sim, seed=0)) == 3
    assert cluster_heads(sim, 3, "agglomerative", 0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert cluster_heads(sim, 3, "kmeans", 0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_kv_min_representatives_share_kv_heads():
    # 6 heads, GQA group size 2 -> KV heads {0,1}, {2,3}, {4,5}; clusters straddle groups
    clusters = [[0, 2], [1, 4], [3, 5]]
    dist = np.ones((6, 6)) - np.eye(6)
    med = choose_representatives(clusters, dist, "medoid", 2)
    kvmin = choose_representatives(clusters, dist, "kv-min", 2)
    assert len({h // 2 for h in kvmin}) < len({h // 2 for h in med}) or len({h // 2 for h in med}) == 2
    assert len({h // 2 for h in kvmin}) == 2  # no single KV head covers all three clusters
    assert all(r in c for r, c in zip(kvmin, clusters, strict=True))
    assert choose_representatives(clusters, cosine_distance(np.eye(6)), "lowest", 2) == [0, 1, 3]


def test_profile_smollm2_api(smollm2):
    from chai_compile.profile import ProfileOptions, profile_model

    data, m = profile_model(smollm2, ProfileOptions(samples=4, seq_len=64, batch_size=4), progress=False)
    assert m.model.num_heads == 9 and m.model.num_kv_heads == 3
    assert data.similarity["rows"].shape == (30, 9, 9)
    assert data.similarity["first_n"].shape == (30, 9, 9)
    assert 0 < m.summary()["k_cache_saving"] < 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["profile", "/no/such/model", "--out", "{out}"], "model path not found"),
        (["profile", str(STORIES), "--calib", "/no/such.txt", "--out", "{out}"], "calibration file not found"),
        (["profile", str(STORIES), "--calib", "{empty}", "--out", "{out}"], "calibration file is empty"),
        (["profile", str(STORIES), "--seq-len", "3", "--out", "{out}"], "--seq-len must be at least 5"),
        (["profile", str(STORIES), "--clusters", "99", "--out", "{out}"], "more clusters than heads"),
        (["profile", str(STORIES), "--dense-layers", "9", "--out", "{out}"], "out of range"),
        (["profile", "{bert}", "--out", "{out}"], "not supported"),
    ],
)
def test_bad_input_one_line_error_no_output(tmp_path, args, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bert = tmp_path / "bert"
    _tiny_bert(bert)
    out = tmp_path / "out"
    args = [a.format(out=out, empty=empty, bert=bert) for a in args]
    proc = subprocess.run([sys.executable, "-m", "chai_compile", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("chai-compile: error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no staged leftovers


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["profile", str(STORIES), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "already exists" in r.output


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t[: len(t) // 3], "not valid JSON"),
    (lambda t: t.replace('"representative": 0', '"representative": 77', 1), "representative"),
])
def test_inspect_bad_mapping(tmp_path, edit, needle):
    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0
    good = tmp_path / "p" / "mapping.json"
    assert CliRunner().invoke(main, ["inspect", str(good), "--model", str(STORIES)]).exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text(edit(good.read_text()))
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 2 and needle in r.output


def test_inspect_mapping_from_another_model(tmp_path):
    from conftest import STORIES_MHA

    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "p" / "mapping.json"), "--model", str(STORIES_MHA)])
    assert r.exit_code == 2 and "another model" in r.output and "num_kv_heads" in r.output


def _tiny_bert(path):
    from transformers import BertConfig, BertForMaskedLM

    if not path.exists():
        BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, vocab_size=50)).save_pretrained(path)


def test_kv_drop_options_pick_best_covered_kv_head():
    # 6 heads, group size 2 (3 KV heads). Heads 4,5 (KV head 2) copy heads 0 and 2: dropping KV 2 is free.
    sim = np.eye(6) * 0.5 + 0.5 * np.eye(6)
    sim[4, 0] = sim[0, 4] = 0.99
    sim[5, 2] = sim[2, 5] = 0.98
    from chai_compile.profile.clustering import allocate_kv_budget, kv_drop_options

    opts = kv_drop_options(sim, 2)
    assert [o.dropped for o in opts[:2]] == [(), (2,)]
    assert opts[1].clusters == [[0, 4], [1], [2, 5], [3]] and opts[1].representatives == [0, 1, 2, 3]
    assert opts[1].cost == pytest.approx(0.03)
    # two layers, the second one redundant: a one-head budget goes there, layer 0 stays whole
    assert allocate_kv_budget([kv_drop_options(np.eye(6), 2), opts], 1, frozen=set()) == [0, 1]
    assert allocate_kv_budget([kv_drop_options(np.eye(6), 2), opts], 1, frozen={1}) == [1, 0]


def test_profile_kv_target(tmp_path):
    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--kv-target", "0.2",
              "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    m = ClusterMapping.read(tmp_path / "k" / "mapping.json")
    assert m.summary()["kv_cache_saving"] == pytest.approx(0.2)
    r = CliRunner().invoke(main, ["profile", str(STORIES), "--kv-target", "0.7", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--kv-target" in r.output
