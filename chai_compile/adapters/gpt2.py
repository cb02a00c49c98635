"""GPT-2 family: fused c_attn stored as Conv1D ([in, out]), learned absolute positions."""

from __future__ import annotations

from torch import nn

from chai_compile.adapters import register
from chai_compile.adapters.base import AttentionSpec, HeadProjections, ModelAdapter


@register
class GPT2Adapter(ModelAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    description = "GPT-2 (fused Conv1D QKV, learned absolute positions)"

    def _spec(self) -> AttentionSpec:
        c = self.config
        return AttentionSpec(
            num_layers=c.n_layer,
            num_heads=c.n_head,
            num_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head,
            hidden_size=c.n_embd,
            positional="absolute",
            rotary_dim=0,
        )

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def attention(self, layer_index: int) -> nn.Module:
        return self.decoder_layers()[layer_index].attn

    def projections(self, layer_index: int) -> HeadProjections:
        a = self.attention(layer_index)
        hid = self.spec.hidden_size
        w = a.c_attn.weight.t()  # Conv1D stores [in, out]
        b = a.c_attn.bias
        return HeadProjections(
            q_weight=w[:hid], k_weight=w[hid : 2 * hid], v_weight=w[2 * hid :],
            o_weight=a.c_proj.weight.t(), q_bias=b[:hid], k_bias=b[hid : 2 * hid],
            v_bias=b[2 * hid :], o_bias=a.c_proj.bias,
        )

    def scaling(self) -> float:
        a = self.attention(0)
        s = self.spec.head_dim**-0.5 if a.scale_attn_weights else 1.0
        if getattr(a, "scale_attn_by_inverse_layer_idx", False):
            raise NotImplementedError("scale_attn_by_inverse_layer_idx is per layer")
        return s
