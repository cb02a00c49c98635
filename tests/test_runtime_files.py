"""Runtime files of an export directory (stories260K, CHAI portable) and the onnxruntime-genai halves layout,
checked in chai-compile's own environment; tests/runtimes runs the runtimes themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import STORIES
from tests.test_rewrite import paired_mapping

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")


@pytest.fixture(scope="module")
def chai_export(stories, tmp_path_factory):
    from chai_compile.export.cli import run_export

    root = tmp_path_factory.mktemp("rt")
    paired_mapping(stories.model).write(root / "mapping.json")
    man = run_export(str(STORIES), str(root / "mapping.json"), False, "onnx", "portable", "fp32", 23,
                     str(root / "chai"), False, log=lambda m: None)
    return root / "chai", man


def test_files_are_written_and_hashed(chai_export):
    out, man = chai_export
    for name in ("config.json", "generation_config.json", "genai_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert name in man["runtime_files"] and man["files"][name]["bytes"] > 0, name


def test_config_loads_and_carries_the_per_layer_cache(chai_export, stories):
    from transformers import AutoConfig, GenerationConfig

    out, man = chai_export
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads == stories.model.config.num_key_value_heads
    assert cfg.chai_cache == json.loads(json.dumps(man["cache"]))
    assert cfg.chai_cache["k_heads"] != cfg.chai_cache["v_heads"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_theta"] == stories.model.config.rope_parameters["rope_theta"]  # what transformers 4.x reads
    assert GenerationConfig.from_pretrained(out).eos_token_id == stories.tokenizer.eos_token_id


def test_tokenizer_files_reproduce_the_source_tokenizer(chai_export, stories):
    from transformers import AutoTokenizer

    out, _ = chai_export
    raw = json.loads((out / "tokenizer_config.json").read_text())
    assert raw["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in raw
    tok = AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, there was a little girl named Lily."
    assert tok(text)["input_ids"] == stories.tokenizer(text)["input_ids"]
    assert list(tok(text)) == ["input_ids", "attention_mask"]  # no token_type_ids for generate() to refuse


def test_genai_config_describes_the_graph(chai_export, stories):
    out, man = chai_export
    dec = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    names = {i["name"] for i in man["inputs"]}
    assert dec["inputs"]["past_key_names"] % 0 in names and dec["outputs"]["present_value_names"] % 4 in \
        {o["name"] for o in man["outputs"]}
    c = stories.model.config
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == \
        (c.num_hidden_layers, c.num_key_value_heads, man["cache"]["head_dim"])


def _packed_greedy(path, ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decode the packed graph with plain onnxruntime, pasts shaped as its inputs say (as genai does)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path / "model.onnx"))
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = [np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts]
    mask, pos, new = np.ones_like(ids), np.arange(ids.shape[1])[None], []
    feed_ids = ids
    for _ in range(steps):
        outs = sess.run(None, {"input_ids": feed_ids, "attention_mask": mask, "position_ids": pos,
                               **{i.name: p for i, p in zip(pasts, past, strict=True)}})
        tok = outs[0][:, -1].argmax(-1)
        new.append(int(tok[0]))
        past, feed_ids = outs[1:], tok[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
    return np.array(new)


def test_genai_halves_layout_keeps_the_cache_and_the_tokens(chai_export, tmp_path):
    from chai_compile.export.genai_pack import pack_for_genai
    from chai_compile.export.ort_runner import OrtDecoder

    out, man = chai_export
    layout = pack_for_genai(out, tmp_path / "genai")
    k, v = man["cache"]["k_heads"], man["cache"]["v_heads"]
    assert layout["packed_layers"] == [i for i in range(len(k)) if k[i] != v[i]]
    packed = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert packed["model"]["decoder"]["filename"] == "model.onnx"
    import onnx

    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    d = man["cache"]["head_dim"]
    for i in range(len(k)):  # K and V inputs equal per layer; elements per token = the CHAI cache's
        key, value = shapes[f"past_key_values.{i}.key"], shapes[f"past_key_values.{i}.value"]
        assert key == value and 2 * key[1] * key[3] == (k[i] + v[i]) * d
    ids = np.array([[1, 403, 407, 261, 378, 432, 383, 286]], np.int64)
    want = OrtDecoder(out).greedy(ids, 12)[0]
    assert (_packed_greedy(tmp_path / "genai", ids, 12) == want).all()


def test_genai_pack_refuses_an_original_export(tmp_path):
    from chai_compile.errors import ExportError
    from chai_compile.export.cli import run_export
    from chai_compile.export.genai_pack import pack_for_genai

    run_export(str(STORIES), None, True, "onnx", "portable", "fp32", 23, str(tmp_path / "orig"), False,
               log=lambda m: None)
    with pytest.raises(ExportError, match="runs in onnxruntime-genai as it is"):
        pack_for_genai(tmp_path / "orig", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_chai_optimum_class_without_optimum_is_a_one_line_error():
    import importlib.util

    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("Optimum is installed here; tests/runtimes covers the class")
    import chai_compile.runtime  # importing the package needs no Optimum
    from chai_compile.errors import DependencyError

    with pytest.raises(DependencyError, match="optimum-onnx") as e:
        chai_compile.runtime.CHAIModelForCausalLM  # noqa: B018
    assert "fix: pip install" in str(e.value) and "\n" not in str(e.value)
