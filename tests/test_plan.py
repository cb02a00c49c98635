"""chai-compile plan on stories260K: the planner's math equals the rewrite's, the budget is met, refit weights
travel with the plan (hash-checked), and bad budgets or weights are one-line errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from chai_compile.adapters import adapter_for
from chai_compile.cli import main
from chai_compile.errors import MappingError
from chai_compile.mapping import ClusterMapping
from chai_compile.plan.shared_scores import planning_modules
from chai_compile.rewrite import apply_mapping
from tests.conftest import STORIES

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")]
FAST = ["--samples", "2", "--refit-samples", "4", "--seq-len", "64", "--query-steps", "10", "--per-round", "4",
        "--distill-steps", "10"]




@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.2", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    return out


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer("Once upon a time, there was a little girl named Lily. She loved to play",
                     return_tensors="pt").input_ids


def test_identity_sources_reproduce_the_original(stories):
    model = copy.deepcopy(stories.model)
    model.set_attn_implementation("eager")
    ids = _ids(stories.tokenizer)
    with torch.no_grad():
        want = model(ids).logits
        with planning_modules(adapter_for(model)):
            got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_scorer_blocks_add_up_to_the_whole_batch_formula(stories):
    """Scorer.measure sums KL and NLL over row blocks: the same as the whole-batch formula in float64, over
    several batches whose rows are not a multiple of the block."""
    from chai_compile.plan.select import _KL_ROWS, Scorer

    model = copy.deepcopy(stories.model)
    ids = torch.randint(3, model.config.vocab_size, (3, 100), generator=torch.Generator().manual_seed(0))
    scorer = Scorer(model, ids, batch_size=2)  # batches of 2 x 99 and 1 x 99 rows
    assert 2 * 99 > _KL_ROWS and 2 * 99 % _KL_ROWS
    with torch.no_grad():
        model.model.norm.weight.mul_(1.3)  # a different model, so the KL is not zero
        kl, ppl = scorer.measure()
        want_kl = want_nll = 0.0
        for b, ref in zip((ids[:2], ids[2:]), scorer.reference, strict=True):
            lp = model(input_ids=b).logits[:, :-1].double().log_softmax(-1).flatten(0, 1)
            r = ref.double()
            want_kl += (r.exp() * (r - lp)).sum().item()
            want_nll -= lp.gather(-1, b[:, 1:].flatten()[:, None]).sum().item()
    assert kl > 1e-4 and kl == pytest.approx(want_kl / ids[:, 1:].numel(), rel=1e-4)
    assert ppl == pytest.approx(math.exp(want_nll / ids[:, 1:].numel()), rel=1e-5)


def test_plan_meets_the_budget_and_writes_its_report(planned):
    mapping = ClusterMapping.read(planned / "plan.json")
    s = mapping.summary()
    assert s["k_heads_total"] - s["k_heads_kept"] == 8  # ceil(0.2 * 2 * 20 K heads)
    assert abs(s["kv_cache_saving"] - 0.2) < 1e-9
    report = json.loads((planned / "plan_report.json").read_text())
    assert report["k_heads_dropped"] == 8 and report["target_met"]
    assert [r["k_heads_dropped"] for r in report["rounds"]] == [0, 4, 8]
    assert set(report["stages"]) == {"selected", "queries", "output", "distill"}
    distill = report["stages"]["distill"]
    # the step kept is the best held-out KL; a kept stage lowers the KL the stage before it left
    assert distill["kept_step"] == min(distill["curve"], key=lambda c: c["held_out_kl"])["step"]
    if distill["kept"]:
        assert distill["kl"] < report["stages"]["output"]["kl"]
    assert (planned / "plan_rounds.png").stat().st_size > 0
    assert "KV cache -20.0%" in (planned / "plan_report.md").read_text()


def test_rewrite_with_the_plans_weights_matches_the_planners_model(stories, planned):
    """What the planner measured is what the rewrite runs: same sources, same refit weights."""
    mapping = ClusterMapping.read(planned / "plan.json")
    assert mapping.weights is not None
    ids = _ids(stories.tokenizer)
    chai = apply_mapping(copy.deepcopy(stories.model), mapping)
    unrefit = apply_mapping(copy.deepcopy(stories.model), ClusterMapping.build(mapping.model, mapping.layers))
    from chai_compile.plan.weights import load_weights

    weights = load_weights(mapping)
    model = copy.deepcopy(stories.model)
    with torch.no_grad(), planning_modules(adapter_for(model)) as mods:
        for m in mods:
            lm = mapping.layers[m.layer]
            m.source = [next(c.representative for c in lm.clusters if h in c.members) for h in range(m.num_heads)] \
                if lm.kind == "clustered" else list(range(m.num_heads))
            lw = weights.get(m.layer)
            if lw is not None:
                q = m.p.q_weight.detach().clone()
                for h, (w, _) in lw.q_rows.items():
                    q[h * m.head_dim : (h + 1) * m.head_dim] = w
                m.q_weight, m.o_weight = q, lw.o_weight
        planner_logits = model(ids).logits
    with torch.no_grad():
        rewrite_logits = chai(ids).logits
        plain_logits = unrefit(ids).logits
    assert (rewrite_logits - planner_logits).abs().max().item() <= 1e-4
    assert (rewrite_logits - plain_logits).abs().max().item() > 1e-3  # the weights were really applied


def test_weights_that_do_not_match_the_plan_are_refused(planned, tmp_path, stories):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(planned, bad)
    data = bytearray((bad / "plan.weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "plan.weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(MappingError, match="does not match its plan's sha256"):
        apply_mapping(copy.deepcopy(stories.model), ClusterMapping.read(bad / "plan.json"))
    (bad / "plan.weights.safetensors").unlink()
    res = CliRunner().invoke(main, ["verify", str(STORIES), "--mapping", str(bad / "plan.json"), "--tasks",
                                    "copa", "--limit", "2", "--out", str(tmp_path / "v")])
    assert res.exit_code == 2
    assert "chai-compile: error: the plan references refit weights plan.weights.safetensors" in res.output
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-target", "0.45"], "cannot be met: every clustered layer keeps at least one K head, so the best "
                              "reachable is 37.5% KV saving"),
    (["--kv-target", "0.6"], "--kv-target must be between 0 and 0.5"),
    (["--kv-target", "0.3", "--max-ppl-increase", "0.0001"],
     "cannot be met within --max-ppl-increase 0.0001: the best reachable is"),
    (["--kv-target", "0.3", "--max-ppl-increase", "0.0001"], "let span heads share the budget (--transforms "),
    ([], "a plan needs a budget"),
    (["--kv-target", "0.2", "--seq-len", "4096"], "--seq-len is above the 512 positions the model was trained for"),
])
def test_budgets_that_cannot_be_met_are_one_line_errors(tmp_path, args, message):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--out", str(out), *FAST, "--refit", "none", *args])
    # (FAST's --seq-len 64 comes first; a later --seq-len in args overrides it)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("chai-compile: error: ") and message in last and "; fix: " in last
    assert not out.exists()


def test_a_perplexity_bound_alone_stops_before_it_is_passed(tmp_path):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--max-ppl-increase", "0.01", "--out", str(out), *FAST,
                                    "--refit", "none"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "plan_report.json").read_text())
    bound = report["original"]["ppl"] * 1.01
    assert all(r["ppl"] <= bound for r in report["rounds"])
    assert report["stages"]["selected"]["ppl"] <= bound


def test_a_plan_with_weights_exports_and_verifies(planned, tmp_path):
    """The refit weights are embedded in the graph (validated against the rewritten PyTorch model) and travel
    with the artifact's mapping, so `verify EXPORT_DIR` rebuilds the same PyTorch reference."""
    out = tmp_path / "export"
    res = CliRunner().invoke(main, ["export", str(STORIES), "--mapping", str(planned / "plan.json"),
                                    "--attention", "portable", "--out", str(out)])
    assert res.exit_code == 0, res.output
    v = json.loads((out / "manifest.json").read_text())["validation"]
    assert v["passed"] and v["greedy_identical"]
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4
    assert (out / "plan.weights.safetensors").read_bytes() == (planned / "plan.weights.safetensors").read_bytes()
    res = CliRunner().invoke(main, ["verify", str(out), "--tasks", "copa", "--limit", "5",
                                    "--out", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output


def test_sweep_shows_the_frontier_by_origin(planned, tmp_path, stories):
    """`sweep` over a profile mapping, a plan without weights and one with: each point says how it was made."""
    import dataclasses

    from tests.conftest import EVAL

    plan = ClusterMapping.read(planned / "plan.json")
    maps = tmp_path / "maps"
    maps.mkdir()
    dataclasses.replace(plan, weights=None).write(maps / "planned.json")
    (maps / "refit").mkdir()
    (maps / "refit" / "plan.json").write_text((planned / "plan.json").read_text())
    (maps / "refit" / "plan.weights.safetensors").write_bytes((planned / "plan.weights.safetensors").read_bytes())
    ClusterMapping.build(plan.model, plan.layers, {"tool": "test"}).write(maps / "similarity.json")
    res = CliRunner().invoke(main, ["sweep", str(STORIES), "--mappings", str(maps), "--tasks", "copa,wikitext2",
                                    "--limit", "2", "--kv-tokens", "8",
                                    "--data-dir", str(EVAL), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    points = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    assert {p["label"]: p["origin"] for p in points} == {
        "planned": "planned", "similarity": "profile", "refit": "planned+refit"}
    assert "| refit | planned+refit |" in (tmp_path / "s" / "sweep.md").read_text()
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 0
