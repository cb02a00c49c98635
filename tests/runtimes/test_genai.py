"""onnxruntime-genai on chai-compile exports: the original as it is; CHAI after `chai-compile genai-pack`
(the unchanged CHAI export fails, as docs/runtimes.md explains). Runs in the runtimes environment."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtimes.common import MODELS, NEW_TOKENS, artifacts, matched, references, until_eos

og = pytest.importorskip("onnxruntime_genai")


def genai_greedy(path, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return new


@pytest.mark.parametrize("name", MODELS)
def test_original_export_loads_unchanged_and_matches_transformers(name):
    ref = references()[name]
    d = artifacts() / f"{name}-original"
    og.Tokenizer(og.Model(str(d)))  # tokenizer.json + tokenizer_config.json load
    for ids, want in zip(ref["prompt_ids"], ref["greedy"], strict=True):
        want, have = until_eos(want, ref["eos_token_id"]), until_eos(genai_greedy(d, ids), ref["eos_token_id"])
        assert matched(want, have) == len(want) == len(have), (name, want, have)


@pytest.mark.parametrize("name", MODELS)
def test_unchanged_chai_export_fails_on_the_value_cache(name):
    with pytest.raises(Exception, match=r"past_key_values\.\d+\.value"):
        genai_greedy(artifacts() / f"{name}-chai", references()[name]["prompt_ids"][0], 2)


@pytest.mark.parametrize("name", MODELS)
def test_packed_chai_export_matches_our_onnxruntime_loop(name):
    from chai_compile.export.ort_runner import OrtDecoder

    ref = references()[name]
    ours = OrtDecoder(artifacts() / f"{name}-chai")
    packed = artifacts() / f"{name}-chai-genai"
    for ids in ref["prompt_ids"]:
        want = until_eos(ours.greedy(np.array([ids]), NEW_TOKENS)[0], ref["eos_token_id"])
        have = until_eos(genai_greedy(packed, ids), ref["eos_token_id"])
        assert matched(want, have) == len(want) == len(have), (name, want, have)
