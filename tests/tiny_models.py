"""Tiny random-config instances of every supported family (shape and edge cases, never accuracy)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_COMMON = dict(vocab_size=97, max_position_embeddings=128)


def tiny_model(family: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=8, **_COMMON)
        model = LlamaForCausalLM(cfg)
    elif family == "llama-gqa":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, **_COMMON)
        model = LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, sliding_window=None, **_COMMON)
        model = MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **_COMMON)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            rotary_pct=0.25, **_COMMON)
        model = GPTNeoXForCausalLM(cfg)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=64, **_COMMON)
        model = OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=128)
        model = GPT2LMHeadModel(cfg)
    else:
        raise KeyError(family)
    model.config._attn_implementation = attn
    return model.eval()


FAMILIES = ("llama", "llama-gqa", "mistral", "qwen2", "gpt_neox", "opt", "gpt2")
