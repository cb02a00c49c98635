"""Models spread over devices by accelerate: a tight --max-memory offloads layers (to disk on this CPU machine,
to the CPU on a GPU), and profile, plan, verify and export give what the single-device run gives."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from chai_compile.cli import main
from chai_compile.errors import UsageError
from chai_compile.placement_options import parse_device_map, parse_max_memory
from tests.conftest import STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K not in ../shared/data")

TIGHT = "cpu=700KB"  # stories260K is ~1 MB of float32: two layers fit, three go to disk
PROFILE = ["--samples", "8", "--seq-len", "64"]
PLAN = ["--kv-target", "0.2", "--samples", "2", "--refit-samples", "4", "--seq-len", "64", "--query-steps", "5"]


def _run(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def _layers(path) -> list:
    return json.loads(path.read_text())["layers"]


def test_options_parse() -> None:
    assert parse_max_memory("0=20GiB,cpu=1.5GB") == {0: 20 * 2**30, "cpu": 1_500_000_000}
    assert parse_device_map("auto") == "auto"
    for bad in ("0=20", "gpu=1GB", "20GiB"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(UsageError, match="--device-map"):
        parse_device_map("nowhere")


def test_bad_options_one_line(tmp_path) -> None:
    res = CliRunner().invoke(main, ["profile", str(STORIES), "--max-memory", "cpu=1GB", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--max-memory needs --device-map" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, ["profile", str(STORIES), "--device-map", "cuda", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "torch sees 0 GPU" in res.output


def test_offloaded_model_loads_layers_one_at_a_time() -> None:
    from chai_compile.device_map import loaded, placement
    from chai_compile.loading import load_model

    model = load_model(str(STORIES), device_map="auto", max_memory=parse_max_memory(TIGHT)).model
    where = placement(model)
    assert where["offloaded"] and "disk" in where["modules_per_device"]
    q = model.model.layers[4].self_attn.q_proj
    assert q.weight.device.type == "meta"
    with loaded(model.model.layers[4].self_attn):
        assert q.weight.device.type == "cpu" and q.weight.abs().sum() > 0
    assert q.weight.device.type == "meta"


def test_profile_and_plan_offloaded_match_single_device(tmp_path) -> None:
    _run("profile", str(STORIES), *PROFILE, "--out", str(tmp_path / "p0"))
    _run("profile", str(STORIES), *PROFILE, "--device-map", "auto", "--max-memory", TIGHT,
         "--out", str(tmp_path / "p1"))
    assert _layers(tmp_path / "p0" / "mapping.json") == _layers(tmp_path / "p1" / "mapping.json")
    prof = json.loads((tmp_path / "p1" / "profile.json").read_text())
    assert prof["placement"]["offloaded"]
    _run("plan", str(STORIES), *PLAN, "--out", str(tmp_path / "q0"))
    _run("plan", str(STORIES), *PLAN, "--device-map", "auto", "--max-memory", TIGHT, "--out", str(tmp_path / "q1"))
    assert _layers(tmp_path / "q0" / "plan.json") == _layers(tmp_path / "q1" / "plan.json")
    r0, r1 = (json.loads((tmp_path / q / "plan_report.json").read_text()) for q in ("q0", "q1"))
    assert r1["stages"]["output"]["kl"] == pytest.approx(r0["stages"]["output"]["kl"], rel=1e-6)
    assert r1["placement"]["offloaded"] and "cpu_rss" in r1["peak_mb"]


def test_verify_offloaded_matches(tmp_path) -> None:
    _run("profile", str(STORIES), *PROFILE, "--out", str(tmp_path / "p"))
    args = ["verify", str(STORIES), "--mapping", str(tmp_path / "p" / "mapping.json"), "--tasks", "wikitext2",
            "--limit", "2", "--json"]
    from tests.conftest import EVAL

    if not (EVAL / "wikitext2").exists():
        pytest.skip("wikitext2 not in ../shared/data/eval")
    plain = json.loads(_run(*args))
    spread = json.loads(_run(*args, "--device-map", "auto", "--max-memory", TIGHT))
    assert spread["points"][0]["comparison"] == plain["points"][0]["comparison"]
    assert spread["points"][0]["kv_cache_saving_pct"] == plain["points"][0]["kv_cache_saving_pct"]


def test_export_streamed_from_offloaded_model(tmp_path) -> None:
    _run("profile", str(STORIES), *PROFILE, "--out", str(tmp_path / "p"))
    mapping = str(tmp_path / "p" / "mapping.json")
    _run("export", str(STORIES), "--mapping", mapping, "--out", str(tmp_path / "e0"))
    _run("export", str(STORIES), "--mapping", mapping, "--device-map", "auto", "--max-memory", TIGHT,
         "--out", str(tmp_path / "e1"))
    man = json.loads((tmp_path / "e1" / "manifest.json").read_text())
    assert man["validation"]["passed"] and man["validation"]["greedy_identical"]
    # The same weights, byte for byte, as the export of the model held in one piece.
    assert (tmp_path / "e0" / "model.onnx.data").read_bytes() == (tmp_path / "e1" / "model.onnx.data").read_bytes()


@pytest.mark.slow
def test_smollm2_offloaded_profile_matches(tmp_path) -> None:
    args = ["profile", "smollm2-135m", "--samples", "4", "--seq-len", "128"]
    try:
        _run(*args, "--out", str(tmp_path / "p0"))
    except AssertionError as e:
        pytest.skip(f"SmolLM2 not available: {str(e)[:200]}")
    _run(*args, "--device-map", "auto", "--max-memory", "cpu=300MB", "--out", str(tmp_path / "p1"))
    assert _layers(tmp_path / "p0" / "mapping.json") == _layers(tmp_path / "p1" / "mapping.json")
    assert json.loads((tmp_path / "p1" / "profile.json").read_text())["placement"]["offloaded"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_offload_matches_unconstrained(tmp_path) -> None:
    """stories260K is ~1 MB: a 600 KB budget on GPU 0 leaves layers on the CPU, loaded to the GPU per forward."""
    _run("profile", str(STORIES), *PROFILE, "--device-map", "cuda", "--out", str(tmp_path / "p0"))
    _run("profile", str(STORIES), *PROFILE, "--device-map", "auto", "--max-memory", "0=600KB,cpu=1GB",
         "--out", str(tmp_path / "p1"))
    prof = json.loads((tmp_path / "p1" / "profile.json").read_text())
    assert prof["placement"]["offloaded"] and "cpu" in prof["placement"]["modules_per_device"]
    assert _layers(tmp_path / "p0" / "mapping.json") == _layers(tmp_path / "p1" / "mapping.json")
    _run("plan", str(STORIES), *PLAN, "--device-map", "cuda", "--out", str(tmp_path / "q0"))
    _run("plan", str(STORIES), *PLAN, "--device-map", "auto", "--max-memory", "0=600KB,cpu=1GB",
         "--out", str(tmp_path / "q1"))
    assert _layers(tmp_path / "q0" / "plan.json") == _layers(tmp_path / "q1" / "plan.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_offload_random_llama(tmp_path) -> None:
    """The same check without ../shared data: a random 4-layer Llama (~4 MB) saved, then loaded whole on GPU 0
    and under a 1.5 MB GPU budget (layers offloaded to the CPU); profile and plan agree."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from chai_compile.device_map import load_kwargs, placement
    from chai_compile.loading import LoadedModel
    from chai_compile.plan.options import PlanOptions
    from chai_compile.plan.planner import plan_model
    from chai_compile.profile.measure import ProfileOptions, profile_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    runs = {}
    for name, budget in (("whole", None), ("offloaded", {0: 1_500_000, "cpu": 2**30})):
        kw = load_kwargs({"": 0} if budget is None else "auto", budget)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", **kw).eval()
        loaded = LoadedModel(model, _ByteTokenizer(), "random-llama")
        _, mapping = profile_model(loaded, ProfileOptions(samples=8, seq_len=64), progress=False)
        plan = plan_model(loaded, PlanOptions(kv_target=0.1, samples=2, refit_samples=4, seq_len=64, query_steps=5),
                          progress=False)
        runs[name] = (mapping.layers, plan.mapping.layers, placement(model))
    assert runs["offloaded"][2]["offloaded"] and not (runs["whole"][2] or {}).get("offloaded")
    assert runs["whole"][0] == runs["offloaded"][0]
    assert runs["whole"][1] == runs["offloaded"][1]


class _ByteTokenizer:
    """Offline tokenizer for random models: UTF-8 bytes + 3."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b + 3 for b in text.encode()]}
