"""OPT family: separate q/k/v/out projections with biases, q scaled after projection, learned positions."""

from __future__ import annotations

from torch import nn

from chai_compile.adapters import register
from chai_compile.adapters.base import AttentionSpec, HeadProjections, ModelAdapter


@register
class OPTAdapter(ModelAdapter):
    name = "opt"
    model_types = ("opt",)
    description = "OPT (MHA, learned absolute positions)"

    def _spec(self) -> AttentionSpec:
        c = self.config
        return AttentionSpec(
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            hidden_size=c.hidden_size,
            positional="absolute",
            rotary_dim=0,
        )

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def attention(self, layer_index: int) -> nn.Module:
        return self.decoder_layers()[layer_index].self_attn

    def projections(self, layer_index: int) -> HeadProjections:
        a = self.attention(layer_index)
        return HeadProjections(
            q_weight=a.q_proj.weight, k_weight=a.k_proj.weight, v_weight=a.v_proj.weight,
            o_weight=a.out_proj.weight, q_bias=a.q_proj.bias, k_bias=a.k_proj.bias,
            v_bias=a.v_proj.bias, o_bias=a.out_proj.bias, q_scale=float(a.scaling),
        )

    def scaling(self) -> float:
        return 1.0  # already folded into q (q_scale), as OPT does
