"""The files runtimes load beside model.onnx: config.json, generation_config.json, tokenizer files, genai_config.json.

Optimum's ORTModelForCausalLM reads config.json (to infer the library and the architecture), generation_config.json
and the tokenizer; onnxruntime-genai reads genai_config.json and tokenizer.json + tokenizer_config.json. They are
written so that both transformers 4.x (which Optimum pins) and 5.x read them:

- config.json carries `rope_theta` / `rope_scaling` (4.x) beside 5.x's `rope_parameters`, and `architectures`;
- tokenizer_config.json names `PreTrainedTokenizerFast`, a class both majors have, whose behaviour lives entirely
  in tokenizer.json (5.x writes `TokenizersBackend` and a list-valued `extra_special_tokens`, which 4.x refuses);
- the per-layer K and V head counts go into config.json (`chai_cache`); genai_config.json has no field for them
  (onnxruntime-genai rejects unknown keys), see docs/runtimes.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chai_compile.choices import DType
from chai_compile.export.onnx_export import GRAPH_NAME, CacheSpec

TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# onnxruntime-genai model types that run our decoder graph as it is (inputs and cache names from the config);
# other architectures go in as its generic "decoder" type.
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo", "smollm3")
DEFAULT_CONTEXT = 2048
_DROP = ("_name_or_path", "_model_name_or_path", "quantization_config", "_attn_implementation_autoset",
         "output_attentions", "output_hidden_states", "torch_dtype", "dtype")


def context_length(config: Any) -> int:
    return int(getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT)


def hf_config(model: Any, cache: CacheSpec, dtype: str) -> dict[str, Any]:
    """The model's config, readable by transformers 4.x and 5.x, with the cache shapes of this graph."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _DROP}
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    cfg["use_cache"] = True
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # 5.x layout; 4.x reads rope_theta / rope_scaling
        cfg.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
    cfg["chai_cache"] = cache.to_dict()
    return cfg


def generation_config(model: Any) -> dict[str, Any]:
    """Token ids and any non-default sampling settings; greedy unless the model says otherwise."""
    gen = getattr(model, "generation_config", None)
    out = gen.to_diff_dict() if gen is not None else {}
    out.pop("transformers_version", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if out.get(key) is None and getattr(model.config, key, None) is not None:
            out[key] = getattr(model.config, key)
    return out


def tokenizer_files(tokenizer: Any, max_length: int) -> dict[str, str]:
    """tokenizer.json (the whole behaviour) and a tokenizer_config.json both transformers majors load."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from chai_compile.errors import ExportError

        raise ExportError("the model's tokenizer has no fast (tokenizers) form to write as tokenizer.json",
                          value=type(tokenizer).__name__, fix="load the model with a tokenizer.json beside it")
    # model_input_names: without it PreTrainedTokenizerFast also returns token_type_ids, which generate() refuses
    cfg: dict[str, Any] = {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": max_length,
                           "model_input_names": ["input_ids", "attention_mask"],
                           "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                        False))}
    specials: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            cfg[name] = specials[name] = str(value)
    files = {"tokenizer.json": backend.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=1),
             "special_tokens_map.json": json.dumps(specials, indent=1)}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        files["chat_template.jinja"] = template
    return files


def genai_config(config: dict[str, Any], gen: dict[str, Any], cache: CacheSpec, ctx: int,
                 graph: str = GRAPH_NAME) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph.

    It holds one num_key_value_heads; onnxruntime-genai reads per-layer head counts from the graph's past key
    inputs and gives the value cache the key's shape, so a CHAI graph (fewer K than V heads) does not run in it.
    """
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    model_type = config.get("model_type", "decoder")
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", config.get("bos_token_id", 1)),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph,
                "head_size": cache.head_dim,
                "hidden_size": config["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config["num_attention_heads"],
                "num_hidden_layers": cache.num_layers,
                "num_key_value_heads": max(cache.v_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "vocab_size": config["vocab_size"],
        },
        "search": {"do_sample": bool(gen.get("do_sample", False)), "max_length": ctx, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": float(gen.get("temperature", 1.0)),
                   "top_k": int(gen.get("top_k", 50) or 50), "top_p": float(gen.get("top_p", 1.0) or 1.0)},
    }


def runtime_files(model: Any, tokenizer: Any, cache: CacheSpec, dtype: str) -> dict[str, str]:
    """name -> text of every runtime file. Taken before the export, which empties the model's weights."""
    cfg = hf_config(model, cache, DType.parse(dtype).value)
    gen = generation_config(model)
    ctx = context_length(model.config)
    files = {"config.json": cfg, "generation_config.json": gen, "genai_config.json": genai_config(cfg, gen, cache, ctx)}
    texts = {name: json.dumps(obj, indent=1) + "\n" for name, obj in files.items()}
    return {**texts, **tokenizer_files(tokenizer, ctx)}


def write_runtime_files(out_dir: Path, files: dict[str, str]) -> None:
    from chai_compile.fileio import atomic_write_text

    for name, text in files.items():
        atomic_write_text(Path(out_dir) / name, text)
