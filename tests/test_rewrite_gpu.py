"""CHAI rewrite on CUDA: identity in fp32, the fused Triton path against the torch path in fp16/bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from chai_compile.compat import model_forward
from tests.test_rewrite import identity_mapping, left_padded, max_diff, paired_mapping, stepwise_logits
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny(family: str, dtype: torch.dtype, attn: str = "sdpa"):
    if family == "llama-d16":  # GQA group 4 with a head size the Triton kernels take (tl.dot needs >= 16)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).eval()
        model.config._attn_implementation = attn
    else:
        model = tiny_model(family, attn=attn)
    return model.to("cuda", dtype)


@torch.no_grad()
def forced_logits(model, ids: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill ids, then decode the given tokens one by one (teacher forcing: both paths see the same input)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = [model_forward(model, cache, input_ids=ids).logits]
    for i in range(tokens.shape[1]):
        out.append(model_forward(model, cache, input_ids=tokens[:, i : i + 1]).logits)
    return out


def _set_kernels(model, on: bool) -> None:
    from chai_compile.rewrite import ClusteredAttention

    for m in model.modules():
        if isinstance(m, ClusteredAttention):
            m.use_kernels = on


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "gpt_neox", "opt", "gpt2"])
def test_identity_cuda_fp32(family):
    from chai_compile.rewrite import apply_mapping

    orig = _tiny(family, torch.float32, attn="eager")
    chai = apply_mapping(copy.deepcopy(orig), identity_mapping(orig))
    ids = torch.randint(3, orig.config.vocab_size, (2, 12), device="cuda")
    assert max_diff(stepwise_logits(orig, ids, 20), stepwise_logits(chai, ids, 20)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama-d16", "qwen2", "mistral", "gpt_neox"])
def test_fused_kernels_match_torch_path(family, dtype, monkeypatch):
    kernels = pytest.importorskip("chai_compile.kernels")
    if not kernels.HAS_TRITON:
        pytest.skip("triton not available")
    from chai_compile.rewrite import apply_mapping

    calls = {"decode": 0, "prefill": 0}
    for name in calls:
        fn = getattr(kernels, f"clustered_{name}")

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(kernels, f"clustered_{name}", counted)

    orig = _tiny(family, dtype)
    chai = apply_mapping(copy.deepcopy(orig), paired_mapping(orig))
    ids = torch.randint(3, orig.config.vocab_size, (2, 16), device="cuda")
    tokens = torch.randint(3, orig.config.vocab_size, (2, 12), device="cuda")
    fused = forced_logits(chai, ids, tokens)
    assert calls["prefill"] > 0 and calls["decode"] > 0, calls  # no padding + sdpa: the fused path ran
    _set_kernels(chai, False)
    reference = forced_logits(chai, ids, tokens)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert max_diff(fused, reference) <= tol
    # and the torch path itself against the fp32 model (same mapping), loosely: half precision is sane
    ref32 = apply_mapping(_tiny(family, torch.float32), paired_mapping(orig))
    assert max_diff(forced_logits(ref32, ids, tokens), fused) <= 10 * tol

    # Padding (a mask tensor) falls back to the torch path; generate still works.
    _set_kernels(chai, True)
    ids, mask = left_padded(orig.config.vocab_size)
    with torch.no_grad():
        out = chai.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 5)


def test_small_head_dim_falls_back_to_torch(monkeypatch):
    kernels = pytest.importorskip("chai_compile.kernels")
    from chai_compile.rewrite import apply_mapping

    def refuse(*a, **k):
        raise AssertionError("kernel called for head_dim 8")

    monkeypatch.setattr(kernels, "clustered_decode", refuse)
    monkeypatch.setattr(kernels, "clustered_prefill", refuse)
    orig = _tiny("llama", torch.bfloat16)  # head_dim 8
    chai = apply_mapping(copy.deepcopy(orig), paired_mapping(orig))
    ids = torch.randint(3, orig.config.vocab_size, (2, 8), device="cuda")
    assert len(stepwise_logits(chai, ids, 3)) == 4
