"""Llama family: Llama 1/2/3, Mistral, Qwen2, SmolLM2 (separate q/k/v/o, RoPE, MHA or GQA)."""

from __future__ import annotations

from torch import nn

from chai_compile.adapters import register
from chai_compile.adapters.base import AttentionSpec, HeadProjections, ModelAdapter


@register
class LlamaAdapter(ModelAdapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    description = "Llama 1/2/3, Mistral, Qwen2 (MHA and GQA, RoPE)"

    def _spec(self) -> AttentionSpec:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return AttentionSpec(
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=c.hidden_size,
            positional="rope",
            rotary_dim=head_dim,
        )

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer_index: int) -> nn.Module:
        return self.decoder_layers()[layer_index].self_attn

    def projections(self, layer_index: int) -> HeadProjections:
        a = self.attention(layer_index)
        return HeadProjections(
            q_weight=a.q_proj.weight, k_weight=a.k_proj.weight, v_weight=a.v_proj.weight,
            o_weight=a.o_proj.weight, q_bias=a.q_proj.bias, k_bias=a.k_proj.bias,
            v_bias=a.v_proj.bias, o_bias=a.o_proj.bias,
        )

    def scaling(self) -> float:
        return float(self.attention(0).scaling)
