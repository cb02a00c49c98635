"""The pure parts of the kvpress side-by-side benchmark (benchmarks/kvpress_side_by_side.py, issue 19): item
selection, the question split of the token ids handed to kvpress, the equal-saving ratios, the job JSON and
the summaries, the runner's result sharing, and the one-line stop without a kvpress python. kvpress itself
is not installed in CI (it needs transformers<5.3), so nothing here runs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from chai_compile.mapping import ModelInfo
from chai_compile.verify.baselines import streaming_plan, streaming_window
from chai_compile.verify.passkey import passkey_items
from chai_compile.verify.scoring import Request

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sbs = _load("kvpress_side_by_side")
runner = _load("kvpress_runner")  # imports only the standard library at module level


def test_per_length_items_take_the_first_of_every_length_and_cover_the_depths():
    items = passkey_items((1024, 2048, 4096))
    got = sbs.per_length_items(items, (1024, 2048, 4096), 5)
    assert len(got) == 15
    for n in (1024, 2048, 4096):
        assert sorted(it.depth for it in got if it.length == n) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert [it for it in items if it in got] == got  # generator order kept
    with pytest.raises(ValueError, match="fewer than 30"):
        sbs.per_length_items(items, (1024,), 30)


def test_split_question_keeps_every_id():
    ctx = [5, 6, 7, 8, 9, 10]
    assert sbs.split_question(ctx, [5, 6, 7, 8]) == 4
    assert sbs.split_question(ctx, [5, 6, 7, 99]) == 3  # a merge at the boundary moves the split, not the ids
    with pytest.raises(ValueError):
        sbs.split_question(ctx, [1, 2])
    with pytest.raises(ValueError):
        sbs.split_question(ctx, ctx)  # no question left


def test_equal_saving_ratios_follow_the_measured_saving_and_never_exceed_it():
    rows = [{"context": 1024, "saving_pct": 0.0}, {"context": 2048, "saving_pct": 13.354},
            {"context": 4096, "saving_pct": 40.0}]
    assert sbs.equal_saving_ratios(rows) == {"1024": 0.0, "2048": 0.1335, "4096": 0.4}
    assert sbs.equal_saving_ratios([{"context": 8, "saving_pct": 100.0}]) == {"8": 0.9999}  # kvpress needs < 1


def test_predicted_saving_matches_the_streaming_window():
    info = ModelInfo("LlamaForCausalLM", "llama", 2, 8, 4, 8, 64, "c" * 64, "a" * 64)
    window = streaming_window(4096, 0.4, 4)
    assert sbs.predicted_saving(streaming_plan(info, 4, window), 4096) == pytest.approx(0.4, abs=1e-3)
    assert sbs.predicted_saving(streaming_plan(info, 4, window), 1024) == 0.0  # the window holds everything


def test_job_hands_kvpress_the_same_token_ids():
    reqs = [Request((1, 2, 3, 4, 5), (6, 7)), Request((1, 2, 9, 4), (8,))]
    runs = sbs.kvpress_runs(["SnapKVPress"], [("plan", {"256": 0.1})], [0.4])
    job = json.loads(json.dumps(sbs.kvpress_job("/m", reqs, [256, 256], [[1, 2, 3], [1, 2]], runs, 1)))
    for it, r in zip(job["items"], reqs, strict=True):
        assert it["context_ids"] + it["question_ids"] == list(r.context)
        assert it["answer_ids"] == list(r.continuation)
    assert [x["label"] for x in job["runs"]] == ["kvpress: no press (control)", "SnapKVPress @ saving of plan",
                                                 "SnapKVPress @ 0.4"]
    assert job["runs"][1]["ratios"] == {"256": 0.1}


def test_summaries_count_hits_and_the_cache_really_kept():
    run = {"items": [
        {"length": 512, "ratio": 0.5, "hit": True, "context_tokens": 100, "kept_after_context": [50, 50],
         "kept_after_question": [60, 60]},
        {"length": 512, "ratio": 0.5, "hit": False, "context_tokens": 100, "kept_after_context": [50, 50],
         "kept_after_question": [60, 60]}]}
    by = sbs.kvpress_summary(run, [512, 1024])
    assert by == {"512": {"hits": 1, "n": 2, "acc": 0.5, "ratio": 0.5, "saving_context_pct": 50.0,
                          "saving_at_question_pct": 45.45, "shared_items": 0}}
    tasks = {"passkey": {"predictions": [1, 0, 1]}}
    got = sbs.chai_summary(tasks, [512, 512, 1024], [{"context": 512, "saving_pct": 10.0}], [512, 1024])
    assert got["512"] == {"hits": 1, "n": 2, "acc": 0.5, "saving_pct": 10.0}
    assert got["1024"]["saving_pct"] == 0.0


def test_runner_shares_results_of_the_same_compression_only():
    key = runner.memo_key
    assert key("SnapKVPress", 0.0, {}, 3, 1000) == key("none", 0.0, {}, 3, 1000)  # ratio 0 = no press
    assert key("SnapKVPress", 0.4, {}, 3, 100) == key("SnapKVPress", 0.3996, {}, 3, 100)  # both keep 60
    assert key("SnapKVPress", 0.4, {}, 3, 4080) != key("SnapKVPress", 0.41, {}, 3, 4080)
    assert key("SnapKVPress", 0.4, {}, 3, 4080) != key("KnormPress", 0.4, {}, 3, 4080)
    assert key("SnapKVPress", 0.4, {}, 3, 4080) != key("SnapKVPress", 0.4, {}, 4, 4080)
    assert key("SnapKVPress", 0.4, {"window_size": 8}, 3, 4080) != key("SnapKVPress", 0.4, {}, 3, 4080)
    done = {key("SnapKVPress", 0.4001, {}, 3, 4080): {}}  # keeps 2447
    assert runner.near_key(done, key("SnapKVPress", 0.4, {}, 3, 4080)) == ("SnapKVPress", 2447, "{}", 3)
    assert runner.near_key(done, key("SnapKVPress", 0.39, {}, 3, 4080)) is None
    assert runner.near_key(done, key("KnormPress", 0.4, {}, 3, 4080)) is None
    assert runner.n_kept(4080, 0.4) == 2448 and runner.n_kept(3, 0.9) == 1 and runner.n_kept(10, 1.0) == 0


def test_reused_rows_are_keyed_like_the_runner_and_checked_against_the_items():
    raw = {"runs": [{"press": "none", "items": [
                        {"length": 256, "ratio": 0.0, "ratio_run": 0.0, "context_tokens": 240, "hit": True}]},
                    {"press": "SnapKVPress", "items": [
                        {"length": 256, "ratio": 0.4, "ratio_run": 0.4, "context_tokens": 240, "hit": False}]},
                    {"press": "KnormPress", "items": [
                        {"length": 256, "ratio": 0.0, "ratio_run": 0.0, "context_tokens": 240, "reused": True}]}]}
    items = [{"length": 256, "context_ids": [0] * 240}]
    got = sbs.reusable_rows(raw, items)
    assert got == [[["none", 240, "{}", 0], {"ratio_run": 0.0, "context_tokens": 240, "hit": True}],
                   [["SnapKVPress", 144, "{}", 0], {"ratio_run": 0.4, "context_tokens": 240, "hit": False}]]
    with pytest.raises(ValueError, match="item 0 differs"):
        sbs.reusable_rows(raw, [{"length": 256, "context_ids": [0] * 239}])


def test_missing_kvpress_python_stops_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        sbs.main(["smollm2-135m", "--kvpress-python", str(tmp_path / "nope" / "python"), "--out", str(tmp_path)])
    msg = str(e.value)
    assert "\n" not in msg and "no kvpress python" in msg
    assert list(tmp_path.iterdir()) == []  # stopped before any model or output
