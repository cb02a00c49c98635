"""GPT-NeoX family (Pythia): fused QKV stored per head as [q_h; k_h; v_h], partial rotary."""

from __future__ import annotations

from torch import nn

from chai_compile.adapters import register
from chai_compile.adapters.base import AttentionSpec, HeadProjections, ModelAdapter


@register
class GPTNeoXAdapter(ModelAdapter):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    description = "GPT-NeoX, Pythia (fused per-head QKV, partial RoPE)"

    def _spec(self) -> AttentionSpec:
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
        return AttentionSpec(
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=head_dim,
            hidden_size=c.hidden_size,
            positional="rope",
            rotary_dim=int(head_dim * pct),
        )

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def attention(self, layer_index: int) -> nn.Module:
        return self.decoder_layers()[layer_index].attention

    def projections(self, layer_index: int) -> HeadProjections:
        a = self.attention(layer_index)
        s = self.spec
        w = a.query_key_value.weight.view(s.num_heads, 3, s.head_dim, s.hidden_size)
        b = a.query_key_value.bias
        bq = bk = bv = None
        if b is not None:
            b3 = b.view(s.num_heads, 3, s.head_dim)
            bq, bk, bv = (b3[:, i].reshape(-1) for i in range(3))
        return HeadProjections(
            q_weight=w[:, 0].reshape(-1, s.hidden_size), k_weight=w[:, 1].reshape(-1, s.hidden_size),
            v_weight=w[:, 2].reshape(-1, s.hidden_size), o_weight=a.dense.weight,
            q_bias=bq, k_bias=bk, v_bias=bv, o_bias=a.dense.bias,
        )
