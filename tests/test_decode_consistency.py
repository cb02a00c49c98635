"""The rewritten model really uses its KV cache, on whatever transformers is installed.

For every adapter family (tiny models) and for stories260K and SmolLM2-135M with real, non-identity
mappings: the full forward, a prefill split at three points, and token-by-token decode give the same
logits (fp32), and the cache holds exactly the bytes the mapping predicts. A rewritten layer that
silently ran without its cache (transformers 5.24 renamed the argument) fails every one of these.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from chai_compile.adapters import adapter_for
from chai_compile.compat import CacheCompatError
from chai_compile.mapping import ClusterMapping
from chai_compile.rewrite import apply_mapping, kv_cache_bytes
from chai_compile.verify.measure import decode_differences
from tests.conftest import REPO, STORIES
from tests.test_rewrite import eager_copy, paired_mapping
from tests.tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SMOLLM2_KV20 = REPO / "docs" / "results" / "smollm2" / "kv20.json"




def check(model: torch.nn.Module, mapping: ClusterMapping, ids: torch.Tensor) -> None:
    """Cached decode of the rewritten model equals its full forward, and its cache has the predicted bytes.

    Tolerance: 1e-5, or twice the original model's own cached-vs-full difference on the same tokens
    where fp32 rounding alone exceeds that (stories260K: 1.1e-5 at logit scale 22). A run without its
    cache differs by 10 or more.
    """
    splits = (1, ids.shape[1] // 2, ids.shape[1] - 1)
    chai = apply_mapping(eager_copy(model), mapping)
    diffs, cache = decode_differences(chai, ids, splits)
    floor, _ = decode_differences(eager_copy(model), ids, splits)
    assert max(diffs.values()) <= max(TOL, 2 * max(floor.values())), (diffs, floor)
    measured = [(p["key_bytes"], p["value_bytes"]) for p in kv_cache_bytes(cache)["per_layer"]]
    assert measured == mapping.cache_bytes(ids.numel(), elem_bytes=4)
    assert mapping.summary()["k_heads_kept"] < mapping.summary()["k_heads_total"]  # a real saving was tested


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_decode_matches_full_forward(family):
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    check(model, paired_mapping(model, dense=()), ids)


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
def test_stories260k_profiled_mapping_decode_matches_full_forward(stories):
    from chai_compile.profile import ProfileOptions, profile_model

    _, mapping = profile_model(stories, ProfileOptions(samples=8, seq_len=64, batch_size=8), progress=False)
    ids = stories.tokenizer("Once upon a time, there was a little girl named Lily. She loved to play",
                            return_tensors="pt").input_ids
    check(stories.model, mapping, ids)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_KV20.is_file(), reason="docs/results/smollm2/kv20.json missing")
def test_smollm2_kv20_mapping_decode_matches_full_forward(smollm2):
    mapping = ClusterMapping.read(SMOLLM2_KV20)
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Italy is Rome. The capital of",
                            return_tensors="pt").input_ids
    check(smollm2.model, mapping, ids)


def test_cache_under_an_unknown_name_is_an_error():
    """A cache the layer cannot find must stop the run, never be ignored."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    hidden = torch.zeros(1, 3, model.config.hidden_size)
    with pytest.raises(CacheCompatError, match="came as `kv_renamed`"):
        adapter.call_inputs((hidden,), {"kv_renamed": DynamicCache(config=model.config)})
    with pytest.raises(CacheCompatError, match="use_cache=True"):
        adapter.call_inputs((hidden,), {"use_cache": True})
    call = adapter.call_inputs((hidden,), {adapter.cache_kwarg: DynamicCache(config=model.config)})
    assert call.cache is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_KV20.is_file(), reason="docs/results/smollm2/kv20.json missing")
def test_smollm2_chai_export_validates(tmp_path):
    """The README's export step on the default model: writes a graph that passes its own validation."""
    from click.testing import CliRunner

    from chai_compile.cli import main

    out = tmp_path / "export"
    res = CliRunner().invoke(main, ["export", "smollm2-135m", "--mapping", str(SMOLLM2_KV20),
                                    "--attention", "portable", "--out", str(out)])
    assert res.exit_code == 0, res.output
    v = json.loads(Path(out, "manifest.json").read_text())["validation"]
    assert v["passed"] and v["greedy_identical"], v
    assert max(v["max_abs_diff_past0"], v["max_abs_diff_past"], v["max_abs_diff_left_padded"]) <= 1e-4


def test_verify_refuses_a_cache_that_differs_from_the_prediction():
    """verify's KV figure is checked: the original's full cache, or an empty one, is not a CHAI saving."""
    from chai_compile.errors import ValidationFailed
    from chai_compile.verify.measure import check_cache_prediction, measure_kv_cache

    model = tiny_model("llama-gqa")
    mapping = paired_mapping(model, dense=())
    chai = apply_mapping(eager_copy(model), mapping)
    check_cache_prediction(measure_kv_cache(chai, tokens=16, decode_steps=2), mapping)  # the real thing passes
    with pytest.raises(ValidationFailed, match="layer 0"):
        check_cache_prediction(measure_kv_cache(model, tokens=16, decode_steps=2), mapping)
    empty = measure_kv_cache(chai, tokens=16) | {"per_layer_bytes": [[0, 0]] * 2}
    with pytest.raises(ValidationFailed, match=r"measured \[0, 0\]"):
        check_cache_prediction(empty, mapping)
