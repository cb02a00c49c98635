"""A span layer in the fused form: one `ClusteredAttention` node per head group (kernels/fused_op.py, "Span
layers"), each on the group's own cache tensors of cache_layout.

The groups are the rewrite's (`rewrite.span.head_groups`): the unbounded KV heads, whose node takes the plain
`past_key_values.N.key/value` through the DecoderWrapper's DynamicCache, and each bounded group, whose node
takes `key_span.G/value_span.G` through the forward's SpanGraphCache (span_graph.graph_span_layers hands it
over, as to a portable span layer) and keeps them as a ring. A node's clusters are its query heads (a span
layer clusters nothing), each with its own span; the node's ring is the group's union of spans. The nodes'
outputs are concatenated in group order and W_o's input columns are permuted to that order at build time,
which is exact, so no gather is left in the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chai_compile.choices import KVCacheMode
from chai_compile.export.fused import take_over
from chai_compile.kernels import fused_op
from chai_compile.rewrite.base import owned_linear
from chai_compile.rewrite.span import SpanAttention
from chai_compile.rewrite.span_cache import HeadGroup


def group_attributes(layer: SpanAttention, group: HeadGroup, kv_cache: KVCacheMode) -> dict[str, Any]:
    """The node of one head group: one cluster per query head (KV-major), its span, the group's ring."""
    g, n = layer.group, len(group.kv_heads)
    spans = [layer.spans[kv * g + j] for kv in group.kv_heads for j in range(g)]
    heads = list(range(n * g))
    return fused_op.node_attributes(
        num_heads=n * g, cluster_offsets=[*heads, n * g], k_head_index=[h // g for h in heads],
        v_head_index=[h // g for h in heads], num_k_heads=n, num_v_heads=n, head_dim=layer.head_dim,
        scale=layer.scale, causal=1, past_present_share_buffer=fused_op.SHARE_BUFFER[kv_cache],
        ring_sinks=group.sinks if group.window is not None else 0, ring_window=group.window or 0,
        span_sinks=[0 if sp is None else sp.sinks for sp in spans],
        span_window=[0 if sp is None else sp.window for sp in spans])


class FusedSpanAttention(nn.Module):
    """A rewritten span layer whose attention is one node per head group; built from that layer (its
    projections taken over: the export owns the model)."""

    graph_cache: Any = None  # the forward's span_graph.SpanGraphCache, set while the export traces

    def __init__(self, layer: SpanAttention, mask: Any, kv_cache: KVCacheMode) -> None:
        super().__init__()
        take_over(self, layer)
        self.num_heads, self.num_kv_heads, self.head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.groups = layer.groups
        self.mask = mask  # fused._MaskHolder: the 2D int32 mask of the call
        self.nodes = [group_attributes(layer, grp, kv_cache) for grp in layer.groups]
        self.in_place = kv_cache == KVCacheMode.INPLACE
        order = []
        dev = layer.q_proj.weight.device
        for i, grp in enumerate(layer.groups):
            heads = [kv * layer.group + j for kv in grp.kv_heads for j in range(layer.group)]
            self.register_buffer(f"kv_heads_{i}", torch.tensor(grp.kv_heads, device=dev), persistent=False)
            self.register_buffer(f"q_heads_{i}", torch.tensor(heads, device=dev), persistent=False)
            order += heads
        w, d = layer.o_proj.weight.detach(), layer.head_dim
        perm = torch.tensor(order, device=w.device)
        self.o_proj = owned_linear(w.view(w.shape[0], -1, d).index_select(1, perm).reshape(w.shape[0], -1),
                                   layer.o_proj.bias)

    def _qkv(self, call: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positioned q [B, H, S, d], k and v [B, KV, S, d]: the rewritten span layer's own."""
        x = call.hidden_states
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, n, self.head_dim).transpose(1, 2) for proj, n in
                   ((self.q_proj, self.num_heads), (self.k_proj, self.num_kv_heads), (self.v_proj, self.num_kv_heads)))
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = self.adapter.position(q, k, call)
        return q, k, v

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        from chai_compile.export.fused import run_node

        call = self.adapter.call_inputs(args, kwargs)
        q, k, v = self._qkv(call)
        cache = getattr(call.cache, "self_attention_cache", call.cache)
        plain = cache.layers[self.layer_idx]
        pasts = iter(self.graph_cache.pasts.get(self.layer_idx, ()))
        outs, presents, full = [], [], False
        for i, (grp, attrs) in enumerate(zip(self.groups, self.nodes, strict=True)):
            kvs, heads = getattr(self, f"kv_heads_{i}"), getattr(self, f"q_heads_{i}")
            qg, kg, vg = q.index_select(1, heads), k.index_select(1, kvs), v.index_select(1, kvs)
            if grp.window is None:  # the unbounded heads: the plain cache tensors (the node's present replaces them)
                out, plain.keys, plain.values = run_node(qg, kg, vg, plain.keys, plain.values, self.mask.mask, attrs)
                full = True
            else:
                past_k, past_v = next(pasts)
                out, present_k, present_v = run_node(qg, kg, vg, past_k, past_v, self.mask.mask, attrs)
                presents.append((present_k, present_v))
            outs.append(out)
        if not full and not self.in_place:  # no unbounded head: zero heads that carry the past length (in place,
            b, _, s, d = k.shape  # the zero-head buffers already span it and are handed back as they came)
            none = k.new_zeros(b, 0, s, d)
            plain.keys, plain.values = torch.cat([plain.keys, none], 2), torch.cat([plain.values, none], 2)
        self.graph_cache.presents[self.layer_idx] = presents
        return self.o_proj(torch.cat(outs, -1)), None
