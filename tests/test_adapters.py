"""Every adapter reproduces its family's attention probabilities from the attention module's inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, STORIES_MHA
from tiny_models import FAMILIES, tiny_model

from chai_compile.adapters import adapter_for, supported_model_types
from chai_compile.errors import UnsupportedArchitectureError


def _adapter_probs(model, ids):
    """Attention probabilities rebuilt from q and k the adapter computes in forward pre-hooks."""
    adapter = adapter_for(model)
    spec = adapter.spec
    probs = {}

    def hook_for(i):
        def hook(module, args, kwargs):
            q, k = adapter.queries_keys(i, adapter.call_inputs(args, kwargs))
            k = k.repeat_interleave(spec.group_size, dim=1)
            s = q @ k.transpose(-1, -2) * adapter.scaling()
            t = s.shape[-1]
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            probs[i] = s.softmax(-1)
        return hook

    handles = [adapter.attention(i).register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i in range(spec.num_layers)]
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    for h in handles:
        h.remove()
    return probs, out.attentions


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_attention(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 11))
    probs, reference = _adapter_probs(model, ids)
    assert len(probs) == len(reference) == adapter_for(model).spec.num_layers
    for i, ref in enumerate(reference):
        torch.testing.assert_close(probs[i], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_projections_shapes(family):
    model = tiny_model(family)
    a = adapter_for(model)
    s = a.spec
    p = a.projections(0)
    assert p.q_weight.shape == (s.num_heads * s.head_dim, s.hidden_size)
    assert p.k_weight.shape == (s.num_kv_heads * s.head_dim, s.hidden_size)
    assert p.v_weight.shape == (s.num_kv_heads * s.head_dim, s.hidden_size)
    assert p.o_weight.shape == (s.hidden_size, s.num_heads * s.head_dim)


@pytest.mark.parametrize("path", [STORIES, STORIES_MHA])
def test_real_llama_models(path):
    from chai_compile.loading import load_model

    model = load_model(str(path)).model
    model.config._attn_implementation = "eager"
    ids = torch.tensor([[1, 403, 407, 261, 378, 285, 429, 426, 268, 301]])
    probs, reference = _adapter_probs(model, ids)
    for i, ref in enumerate(reference):
        torch.testing.assert_close(probs[i], ref, atol=1e-5, rtol=1e-4)


def test_smollm2_adapter(smollm2):
    a = adapter_for(smollm2.model)
    assert (a.spec.num_layers, a.spec.num_heads, a.spec.num_kv_heads, a.spec.head_dim) == (30, 9, 3, 64)
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    smollm2.model.config._attn_implementation = "eager"
    try:
        probs, reference = _adapter_probs(smollm2.model, ids)
    finally:
        smollm2.model.config._attn_implementation = "sdpa"
    for i in (0, 15, 29):
        torch.testing.assert_close(probs[i], reference[i], atol=1e-4, rtol=1e-3)


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedArchitectureError) as e:
        adapter_for(model)
    msg = e.value.one_line()
    assert "'bert'" in msg and "\n" not in msg
    for mt in supported_model_types():
        assert mt in msg
