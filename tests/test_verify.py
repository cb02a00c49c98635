"""verify and sweep: task readers on the real files, scoring against direct computation, the CLI and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import EVAL, STORIES, STORIES_MHA

from chai_compile.adapters import adapter_for
from chai_compile.cli import main
from chai_compile.compat import output_cache
from chai_compile.errors import TaskError
from chai_compile.fingerprint import model_info
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping
from chai_compile.verify import compare as compare_mod
from chai_compile.verify.measure import _fallback_cache_bytes, cache_bytes, flops_comparison, measure_kv_cache
from chai_compile.verify.scoring import (
    encode_pair,
    loglikelihoods,
    mc_metrics,
    perplexity_windows,
    prepare,
    score,
)
from chai_compile.verify.tasks import (
    ALL_TASKS,
    HF_ROW,
    CorpusItem,
    LastWordItem,
    MCItem,
    Task,
    load_task,
    parse_task_list,
    resolve_tasks,
)


def _run(args):
    # mix_stderr is gone in click 8.2; output holds stdout + stderr
    return CliRunner().invoke(main, args, catch_exceptions=False)


# ---- readers on the shared files ------------------------------------------------------------

@pytest.mark.parametrize("name, count, kind", [
    ("piqa", 1838, "multiple_choice"), ("hellaswag", 10042, "multiple_choice"), ("arc_easy", 2376, "multiple_choice"),
    ("boolq", 3270, "multiple_choice"), ("copa", 100, "multiple_choice"), ("openbookqa", 500, "multiple_choice"),
    ("lambada", 5153, "last_word"), ("wikitext2", 1, "perplexity"),
])
def test_reader_on_shared_file(name, count, kind):
    t = load_task(name, data_dir=EVAL)
    assert t.kind == kind and len(t.items) == count
    for it in t.items:
        if kind == "multiple_choice":
            assert 0 <= it.gold < len(it.choices) and it.context and all(it.choices)
        elif kind == "last_word":
            assert it.target.startswith(" ") and " " not in it.target[1:] and it.context


def test_reader_prompts_follow_lm_eval():
    piqa = load_task("piqa", data_dir=EVAL).items[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0 and piqa.delimiter == " "
    hs = load_task("hellaswag", data_dir=EVAL).items
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. he" and hs[0].gold == 3
    assert not any("[" in it.context for it in hs)  # lm-eval strips WikiHow markup
    arc = load_task("arc_easy", data_dir=EVAL).items[0]
    assert arc.context.startswith("Question: ") and arc.context.endswith("\nAnswer:")
    copa = load_task("copa", data_dir=EVAL).items[0]
    assert copa.context == "The man turned on the faucet, therefore" and copa.gold == 1
    lam = load_task("lambada", data_dir=EVAL).items[0]
    assert lam.target == " signs" and lam.context.endswith("I don't care about")
    wt = load_task("wikitext2", data_dir=EVAL).items[0]
    assert " = Robert <unk> = " in wt.text


def test_task_names_and_all():
    assert parse_task_list("all") == ALL_TASKS
    assert parse_task_list("PIQA,openbook_qa,piqa") == ["piqa", "openbookqa"]
    tasks = resolve_tasks(["copa"], {"piqa": str(EVAL / "piqa" / "valid.jsonl")}, data_dir=EVAL)
    assert [t.name for t in tasks] == ["copa", "piqa"]
    with pytest.raises(TaskError, match="unknown task 'squad'"):
        parse_task_list("piqa,squad")
    with pytest.raises(TaskError, match="no local file"):
        load_task("arc_challenge", data_dir=EVAL)


def test_user_files_of_each_kind(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n'
                                      '{"goal": "h", "sol1": "c", "sol2": "d"}\n')
    (tmp_path / "p-labels.lst").write_text("1\n0\n")
    t = load_task("piqa", str(tmp_path / "p.jsonl"))
    assert [it.gold for it in t.items] == [1, 0]
    (tmp_path / "q.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}\n')
    assert load_task("piqa", str(tmp_path / "q.jsonl")).items[0].gold == 1
    (tmp_path / "h.txt").write_text("ctx [header] x\n2\na\nb\nc\nd\n")
    hs = load_task("hellaswag", str(tmp_path / "h.txt")).items[0]
    assert hs.context == "ctx x" and hs.gold == 2
    (tmp_path / "l.jsonl").write_text('{"text": "the cat sat"}\n')
    assert load_task("lambada", str(tmp_path / "l.jsonl")).items == [LastWordItem("the cat", " sat")]


@pytest.mark.parametrize("name, path, needle", [
    ("hellaswag", "arc_easy.jsonl", "arc_easy.jsonl line 1: looks like JSON lines"),
    ("arc_easy", "piqa/valid.jsonl", "valid.jsonl line 1: field 'query' is missing"),
    ("piqa", "lambada_test.jsonl", "lambada_test.jsonl line 1: field 'goal' is missing"),
    ("lambada", "wikitext2/test.txt", "test.txt line 2: not a JSON object"),
    ("wikitext2", "boolq.jsonl", "boolq.jsonl line 1: looks like JSON lines"),
    ("copa", "hellaswag_val.txt.bz2", "hellaswag_val.txt.bz2 line 1: not a JSON object"),
])
def test_wrong_format_names_file_and_line(name, path, needle):
    with pytest.raises(TaskError) as e:
        load_task(name, str(EVAL / path))
    msg = e.value.one_line()
    assert needle in msg and "expected" in msg and "\n" not in msg


def test_wrong_format_details(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("ctx\n0\na\nb\nc\nd\nctx2\n7\na\nb\nc\nd\n")
    with pytest.raises(TaskError, match="bad.txt line 8: gold index must be 0-3"):
        load_task("hellaswag", str(bad))
    bad.write_text("ctx\n0\na\nb\n")
    with pytest.raises(TaskError, match="incomplete item"):
        load_task("hellaswag", str(bad))
    q = tmp_path / "q.jsonl"
    q.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n{"query": "q", "choices": ["a"], "gold": 0}\n')
    with pytest.raises(TaskError, match="q.jsonl line 2: choices must be"):
        load_task("boolq", str(q))
    q.write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(TaskError, match="gold 2 is out of range"):
        load_task("openbookqa", str(q))
    p = tmp_path / "p.jsonl"
    p.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "p-labels.lst").write_text("0\n1\n")
    with pytest.raises(TaskError, match="2 labels for 1 items"):
        load_task("piqa", str(p))
    with pytest.raises(TaskError, match="task file not found"):
        load_task("copa", str(tmp_path / "missing.jsonl"))


def test_hf_source_fails_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TaskError) as e:
        load_task("piqa", "hf:")
    assert "\n" not in e.value.one_line() and "--task piqa=PATH" in e.value.one_line()


def test_hf_rows_give_the_local_prompts():
    hs = HF_ROW["hellaswag"]({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                              "ctx_b": "he", "endings": ["a", "b", "c", "d [title] e"], "label": "3"})
    assert hs == MCItem("Roof shingle removal: A man is sitting on a roof. He", ("a", "b", "c", "d. e"), 3)
    arc = HF_ROW["arc_easy"]({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                              "answerKey": "B"})
    assert arc == MCItem("Question: Q?\nAnswer:", ("x", "y"), 1)
    copa = HF_ROW["copa"]({"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
                           "choice2": "Water flowed.", "question": "effect", "label": 1})
    assert copa == MCItem("The man turned on the faucet, therefore", ("the toilet filled.", "water flowed."), 1)
    assert HF_ROW["boolq"]({"question": "is it", "passage": "P", "answer": True}).gold == 1


# ---- scoring ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(stories):
    return stories


def _direct_ll(model, ctx, cont):
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(ctx)
    return sum(lp[n - 1 + j, t].item() for j, t in enumerate(cont)), all(
        lp[n - 1 + j].argmax().item() == t for j, t in enumerate(cont))


def test_loglikelihood_matches_direct_computation(tiny):
    tok, model = tiny.tokenizer, tiny.model
    texts = [("Once upon a time, there was a little girl named", " Lily"),
             ("The dog ran", " to the park and played with a ball"),
             ("She was happy.", " The end"), ("Tom", " and Sue went to the store together")]
    reqs = [encode_pair(tok, c, x) for c, x in texts]
    batched = loglikelihoods(model, reqs, batch_size=3, pad_id=0)  # mixed lengths: padding in play
    for r, (ll, greedy) in zip(reqs, batched, strict=True):
        d_ll, d_greedy = _direct_ll(model, r.context, r.continuation)
        assert ll == pytest.approx(d_ll, abs=1e-4) and greedy == d_greedy


def test_encode_pair_moves_trailing_space_and_prefixes_empty_context(tiny):
    tok = tiny.tokenizer
    a = encode_pair(tok, "Once upon a ", "time")
    b = encode_pair(tok, "Once upon a", " time")
    assert a == b
    assert a.context + a.continuation == tuple(tok("Once upon a time", add_special_tokens=False)["input_ids"])
    e = encode_pair(tok, "", "Once")
    assert e.context == (tok.bos_token_id,)


def test_acc_norm_divides_by_answer_bytes():
    items = [MCItem("q", ("ab", "abcdefgh"), 1), MCItem("q", ("x", "y"), 0)]
    # item 1: raw favours the short answer (-2 > -4); per byte the long one (-0.5 > -1)
    # item 2: a tie goes to the first answer, as np.argmax does
    m = mc_metrics(items, [-2.0, -4.0, -1.0, -1.0])
    assert m["predictions"] == [0, 0] and m["predictions_norm"] == [1, 0]
    assert m["acc"] == pytest.approx(0.5) and m["acc_norm"] == pytest.approx(1.0)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 1))
    # UTF-8 bytes, not characters: "é" is 2 bytes like "ee"; per byte -1.5 > -2.5 picks "é",
    # per character (-3 < -2.5) would pick "ee"
    assert mc_metrics([MCItem("q", ("é", "ee"), 1)], [-3.0, -5.0])["predictions_norm"] == [0]


def test_perplexity_windows_cover_every_token_once():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (100, 16, 5), (5, 8, 4), (17, 16, 1), (2, 2, 1)]:
        wins = perplexity_windows(n, w, s)
        targets = [t for b, e, first in wins for t in range(first, e)]
        assert targets == list(range(1, n))
        assert all(e - b <= w and b <= first - 1 for b, e, first in wins)  # each target has context inside


def test_perplexity_one_window_equals_full_sequence(tiny):
    tok, model = tiny.tokenizer, tiny.model
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun."
    task = Task("wikitext2", "perplexity", "inline", [CorpusItem(text)])
    p = prepare(task, tok, model, window=512)
    assert p.meta["windows"] == 1
    r = score(model, p, tok, batch_size=4)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    nll = -sum(lp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1]))
    assert r["tokens"] == ids.shape[1] - 1
    assert r["ppl"] == pytest.approx(math.exp(nll / (ids.shape[1] - 1)), rel=1e-5)
    # several short windows still score every token once; overlap gives each window context
    p2 = prepare(task, tok, model, window=8, stride=4)
    r2 = score(model, p2, tok, batch_size=3)
    assert r2["tokens"] == r["tokens"] and p2.meta["windows"] > 1
    assert r2["ppl"] > r["ppl"]  # less context per token on this text
    assert prepare(task, tok, model, limit=2, window=8, stride=4).meta["windows"] == 2


def test_scores_on_stories_are_stable(tiny):
    # a real task through the whole path: batch size must not change the numbers
    task = load_task("copa", data_dir=EVAL)
    p = prepare(task, tiny.tokenizer, tiny.model, limit=12)
    a = score(tiny.model, p, tiny.tokenizer, batch_size=1)
    b = score(tiny.model, p, tiny.tokenizer, batch_size=7)
    assert a["predictions"] == b["predictions"] and a["acc"] == b["acc"] and a["n"] == 12


# ---- measurement ---------------------------------------------------------------------------------

def test_kv_cache_bytes_measured_from_tensors(tiny):
    m = measure_kv_cache(tiny.model, tokens=16, decode_steps=3)
    # stories260K: 5 layers x 4 KV heads x head_dim 8, K and V, fp32
    assert m["bytes_per_token"] == 5 * 4 * 8 * 2 * 4
    assert m["key_bytes"] == m["value_bytes"] == 5 * 4 * 8 * 4 * 19
    out = tiny.model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert cache_bytes(output_cache(out))["total_bytes"] == _fallback_cache_bytes(output_cache(out))["total_bytes"]


def _stories_info(path=STORIES):
    from chai_compile.loading import load_model

    return model_info(adapter_for(load_model(str(path)).model))


def _paired_mapping(info) -> ClusterMapping:
    """Heads (0,1), (2,3), ... share scores in every layer but the first; representatives 0, 2, 4, 6."""
    pairs = tuple(Cluster((h, h + 1), h) for h in range(0, info.num_heads, 2))
    layers = [LayerMapping(0, "dense")] + [LayerMapping(i, "clustered", pairs) for i in range(1, info.num_layers)]
    return ClusterMapping.build(info, layers, {"kind": "test-pairs"})


def test_flops_from_mapping(tiny):
    info = model_info(adapter_for(tiny.model))
    ident = flops_comparison(tiny.model, ClusterMapping.identity(info), 64)
    assert ident["chai"] == ident["original"] and ident["saving_pct"]["scores"] == 0
    f = flops_comparison(tiny.model, _paired_mapping(info), 64)
    # 4 of 5 layers compute 4 of 8 score heads
    assert f["chai"]["scores"] == f["original"]["scores"] * (1 + 4 * 0.5) / 5
    assert f["original"]["qk_projection"] == 5 * 2 * 64 * 8 * (8 + 4)


# ---- CLI ----------------------------------------------------------------------------------------

def test_verify_original_only_writes_outputs(tmp_path):
    out = tmp_path / "v"
    r = _run(["verify", str(STORIES), "--tasks", "piqa,lambada,wikitext2", "--limit", "5", "--batch-size", "4",
              "--window", "64", "--data-dir", str(EVAL), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "verify.json").read_text())
    assert set(res["original"]["tasks"]) == {"piqa", "lambada", "wikitext2"}
    assert res["original"]["tasks"]["piqa"]["n"] == 5 and res["original"]["tasks"]["wikitext2"]["n"] == 5
    assert res["original"]["kv_cache"]["bytes_per_token"] == 1280
    assert (out / "verify.png").stat().st_size > 0 and "| piqa | acc |" in (out / "verify.md").read_text()
    r = _run(["verify", str(STORIES), "--tasks", "copa", "--limit", "2", "--data-dir", str(EVAL), "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output


def _perturbed(model, mapping, membership="static"):
    """Stand-in for the rewrite: a visibly worse copy of the model, to drive the comparison paths."""
    bad = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return bad


def test_verify_max_drop_fails_with_exit_1(tmp_path, monkeypatch):
    mapping = _paired_mapping(_stories_info())
    mp = mapping.write(tmp_path / "m.json")
    monkeypatch.setattr(compare_mod, "build_chai", _perturbed)
    args = ["verify", str(STORIES), "--mapping", str(mp), "--tasks", "copa,wikitext2", "--limit", "10",
            "--window", "32", "--data-dir", str(EVAL), "--out", str(tmp_path / "v")]
    r = _run(args + ["--max-drop", "0"])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("chai-compile: error:")]
    assert len(err) == 1 and "wikitext2 ppl rose" in err[0] and "--max-drop 0" in err[0]
    res = json.loads((tmp_path / "v" / "verify.json").read_text())  # results are still written
    assert res["points"][0]["comparison"]["wikitext2"]["ppl"]["delta"] > 0
    assert res["max_drop"]["violations"]
    r = _run(args[:-2] + ["--out", str(tmp_path / "w"), "--max-drop", "1e6"])
    assert r.exit_code == 0, r.output
    assert "| copa | acc |" in r.output and "Δ" in r.output


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "piqa,squad"], "unknown task 'squad'"),
    (["--task", f"hellaswag={EVAL / 'arc_easy.jsonl'}"], "arc_easy.jsonl line 1: looks like JSON lines"),
    (["--task", "piqa"], "--task expects NAME=PATH"),
    (["--tasks", "copa", "--mapping", "MAPPING"], "mapping is for another model: num_kv_heads is 8"),
])
def test_bad_input_one_line_error(tmp_path, args, needle):
    if "MAPPING" in args:  # a mapping profiled on the MHA re-expression, applied to the GQA model
        args = [str(ClusterMapping.identity(_stories_info(STORIES_MHA)).write(tmp_path / "mha.json"))
                if a == "MAPPING" else a for a in args]
    r = _run(["verify", str(STORIES), "--limit", "2", "--data-dir", str(EVAL), *args])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
    assert len(err) == 1 and needle in err[0], r.output


def test_bad_input_exit_code_in_a_real_process(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "chai_compile", "verify", str(STORIES), "--tasks", "nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown task 'nope'" in p.stderr


def _halves_mapping(info) -> ClusterMapping:
    """Layers 1.. share scores in two clusters with representatives 0 and 4: on the GQA model (2 query
    heads per KV head) the K cache keeps KV heads 0 and 2 of 4 in those layers."""
    halves = (Cluster(tuple(range(0, 4)), 0), Cluster(tuple(range(4, 8)), 4))
    layers = [LayerMapping(0, "dense")] + [LayerMapping(i, "clustered", halves) for i in range(1, info.num_layers)]
    return ClusterMapping.build(info, layers, {"kind": "test-halves"})


def test_verify_end_to_end_with_the_rewrite(tmp_path):
    pytest.importorskip("chai_compile.rewrite")
    mp = _halves_mapping(_stories_info()).write(tmp_path / "halves.json")
    out = tmp_path / "v"
    r = _run(["verify", str(STORIES), "--mapping", str(mp), "--tasks", "copa,lambada,wikitext2", "--limit", "6",
              "--batch-size", "4", "--window", "32", "--kv-tokens", "16", "--kv-decode", "3", "--data-dir", str(EVAL),
              "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "verify.json").read_text())
    point = res["points"][0]
    # K of 1 + 4 * 2 = 12 of 20 layer-heads, V whole: (12 + 20) / 40 of the native cache
    assert res["original"]["kv_cache"]["bytes_per_token"] == 1280
    assert point["kv_cache"]["bytes_per_token"] == 1024 and point["kv_cache_saving_pct"] == pytest.approx(20.0)
    assert point["kv_cache"]["total_bytes"] == 1024 * (16 + 3)  # measured after the decode steps too
    assert point["flops"]["saving_pct"]["scores"] > 0
    assert set(point["comparison"]) == {"copa", "lambada", "wikitext2"}
    assert point["tasks"]["wikitext2"]["ppl"] != res["original"]["tasks"]["wikitext2"]["ppl"]
    md = (out / "verify.md").read_text()
    assert "| copa | acc |" in md and "20.00%" in md and (out / "verify.png").stat().st_size > 0


def test_identity_mapping_changes_nothing(stories):
    pytest.importorskip("chai_compile.rewrite")
    info = model_info(adapter_for(stories.model))
    tasks = [load_task("copa", data_dir=EVAL)]
    res = compare_mod.compare_loaded(stories, [("identity", ClusterMapping.identity(info))], tasks, limit=8,
                                     kv_tokens=8)
    c = res["points"][0]["comparison"]["copa"]
    assert c["agreement"] == 1.0 and c["acc"]["delta"] == 0 and res["points"][0]["kv_cache_saving_pct"] == 0


class _NumpyBackend:
    """Another engine, as an ONNX Runtime session would be plugged in: numpy logits for every position."""

    name = "numpy"

    def __init__(self, model):
        self.model, self.max_length = model, 256

    def logits(self, input_ids, attention_mask, first):
        with torch.no_grad():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.numpy()


def test_any_logits_backend_scores_the_same(tiny):
    task = load_task("copa", data_dir=EVAL)
    p = prepare(task, tiny.tokenizer, tiny.model, limit=6)
    a = score(tiny.model, p, tiny.tokenizer, batch_size=4)
    b = score(_NumpyBackend(tiny.model), p, tiny.tokenizer, batch_size=4)
    assert a["predictions"] == b["predictions"] and a["acc_norm"] == b["acc_norm"]
    with pytest.raises(TypeError, match="LogitsBackend"):
        score(object(), p, tiny.tokenizer)


def test_sweep_from_a_profile(tmp_path):
    pytest.importorskip("chai_compile.rewrite")
    prof = tmp_path / "prof"
    r = _run(["profile", str(STORIES), "--samples", "4", "--seq-len", "32", "--out", str(prof)])
    assert r.exit_code == 0, r.output
    r = _run(["sweep", str(STORIES), "--profile", str(prof), "--clusters", "2,4", "--dense-prefix", "0,2",
              "--tasks", "copa", "--limit", "5", "--kv-tokens", "8", "--data-dir", str(EVAL),
              "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s" / "sweep.json").read_text())
    labels = {p["label"] for p in res["points"]}
    assert labels == {"profile-default", "c2-dense0", "c2-dense2", "c4-dense0", "c4-dense2"}
    by = {p["label"]: p for p in res["points"]}
    assert by["c2-dense0"]["mapping_summary"]["clustered_layers"] == 5
    assert by["c2-dense2"]["mapping_summary"]["clustered_layers"] == 3
    savings = [p["kv_cache_saving_pct"] for p in res["points"]]
    assert savings == sorted(savings) and all(0 <= s < 50 for s in savings)  # V is never cut
    for p in res["points"]:
        assert p["average_accuracy_change_points"] is not None
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 0
    assert "| c2-dense0 |" in (tmp_path / "s" / "sweep.md").read_text()


def test_sweep_of_mapping_files(tmp_path, monkeypatch):
    info = _stories_info()
    d = tmp_path / "maps"
    _paired_mapping(info).write(d / "pairs" / "mapping.json")
    ClusterMapping.identity(info).write(d / "identity.json")
    (d / "notes.json").write_text("{}")  # other JSON in the folder is skipped
    monkeypatch.setattr(compare_mod, "build_chai", _perturbed)
    r = _run(["sweep", str(STORIES), "--mappings", str(d), "--tasks", "copa", "--limit", "3",
              "--kv-tokens", "8", "--data-dir", str(EVAL), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sorted(p["label"] for p in res["points"]) == ["identity", "pairs"]


@pytest.mark.parametrize("args, needle", [
    ([], "sweep needs mappings"),
    (["--profile", "{tmp}"], "has no mapping.json"),
    (["--profile", "{tmp}", "--clusters", "2,x"], "--clusters expects comma-separated integers"),
])
def test_sweep_bad_input(tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = _run(["sweep", str(STORIES), *args, "--tasks", "copa", "--data-dir", str(EVAL),
              "--out", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
    assert len(err) == 1 and needle in err[0], r.output
