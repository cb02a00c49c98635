"""Optimum (optimum-onnx, transformers 4.57) on chai-compile exports: the original as it is, CHAI through
chai_compile.runtime.CHAIModelForCausalLM. Runs in the runtimes environment (tests/runtimes/run.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.runtimes.common import MODELS, NEW_TOKENS, artifacts, matched, references, until_eos

pytest.importorskip("optimum.onnxruntime")
PROMPTS_BATCH = 4


def _generate(model, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_original_export_loads_unchanged_and_matches_transformers(name):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    d = artifacts() / f"{name}-original"
    ref = references()[name]
    tok = AutoTokenizer.from_pretrained(d)  # transformers 4.57 reading files written under 5.x
    assert [tok(p)["input_ids"] for p in _prompts()] == ref["prompt_ids"]
    model = ORTModelForCausalLM.from_pretrained(d)
    eos = ref["eos_token_id"]
    for ids, want in zip(ref["prompt_ids"], ref["greedy"], strict=True):
        want, have = until_eos(want, eos), until_eos(_generate(model, ids), eos)
        assert matched(want, have) == len(want) == len(have), (name, want, have)


@pytest.mark.parametrize("name", MODELS)
def test_stock_optimum_refuses_a_chai_export(name):
    """Why the subclass exists: Optimum gives every layer's K past num_key_value_heads heads."""
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(artifacts() / f"{name}-chai")
    with pytest.raises(Exception, match=r"Got invalid dimensions for input: past_key_values\.\d+\.key"):
        _generate(model, references()[name]["prompt_ids"][0], 2)


@pytest.fixture(scope="module", params=MODELS)
def chai(request):
    from chai_compile.export.ort_runner import OrtDecoder
    from chai_compile.runtime import CHAIModelForCausalLM

    d = artifacts() / f"{request.param}-chai"
    return request.param, d, CHAIModelForCausalLM, OrtDecoder(d)


@pytest.mark.parametrize("io_binding", [False, True])
def test_chai_generate_matches_our_onnxruntime_loop(chai, io_binding):
    name, d, cls, ours = chai
    model = cls.from_pretrained(d, use_io_binding=io_binding)
    assert model.cache_heads.k_heads != model.cache_heads.v_heads  # a real CHAI cache
    eos = references()[name]["eos_token_id"]
    for ids in references()[name]["prompt_ids"]:
        want = until_eos(ours.greedy(np.array([ids]), NEW_TOKENS)[0], eos)
        have = until_eos(_generate(model, ids), eos)
        assert matched(want, have) == len(want) == len(have), (name, io_binding, want, have)


def test_chai_batch_of_four_left_padded(chai):
    from transformers import AutoTokenizer

    name, d, cls, ours = chai
    tok = AutoTokenizer.from_pretrained(d, padding_side="left")
    batch = tok(list(_prompts()[:PROMPTS_BATCH]), return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: real padding
    out = cls.from_pretrained(d).generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    have = out[:, batch["input_ids"].shape[1]:].numpy()
    want = ours.greedy(batch["input_ids"].numpy(), NEW_TOKENS, attention_mask=batch["attention_mask"].numpy())
    eos = tok.eos_token_id
    for row in range(PROMPTS_BATCH):  # after EOS generate() pads; compare each row up to its EOS
        w, h = until_eos(want[row], eos), until_eos(have[row], eos)
        assert matched(w, h) == len(w) == len(h), (name, row, w, h)


def test_chai_text_generation_pipeline(chai):
    from transformers import AutoTokenizer, pipeline

    name, d, cls, ours = chai
    tok = AutoTokenizer.from_pretrained(d)
    pipe = pipeline("text-generation", model=cls.from_pretrained(d), tokenizer=tok)
    prompt = _prompts()[0]
    text = pipe(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    ids = tok(prompt)["input_ids"]
    new = until_eos(ours.greedy(np.array([ids]), NEW_TOKENS)[0], tok.eos_token_id)
    assert text == tok.decode(ids + new, skip_special_tokens=True), (name, text)


def _prompts() -> tuple[str, ...]:
    from tests.runtimes.make_artifacts import PROMPTS

    return PROMPTS
