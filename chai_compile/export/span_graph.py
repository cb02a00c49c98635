"""Span layers in the portable graph: a bounded KV head's cache travels as the graph's own tensors.

While the portable export traces, every `SpanAttention` hands its attention over to the one `SpanGraphCache`
of the forward (its `graph_cache` attribute) instead of storing into its `SpanCacheLayer`: the unbounded KV
heads of the layer go through the DecoderWrapper's DynamicCache (`past_key_values.N.key/value`, fewer heads),
each bounded group through its own pair (`past_key_values.N.key_span.G`, see `cache_layout`).

Layout of a bounded group's past of R rows, for a sequence with r real tokens seen so far: the k = min(r,
sinks + window) kept tokens, sorted by real index and right-aligned (rows R - k .. R - 1; rows before them are
empty). They are the first min(r, sinks) real tokens, then the last ones. R = min(past slots, sinks + window),
which is what `LayerMapping.head_tokens` counts; left padding makes r smaller than the slots, hence empty rows.
Each row's real index follows from r alone (r: the mask's ones before the new tokens), so no index travels.

A call of S new slots: keys = concat(past rows, new rows) with their real indices (-1: empty row or padding);
query i reads key j when 0 <= j <= i and (j < sinks_h or j > i - window_h), its own head's span, exactly the
rewrite's rule (`SpanAttention._group_attention` is reused). Present: the kept entries (j < sinks or
j >= r' - window) scattered to their sorted right-aligned rows of an R + S row buffer (dropped ones to one
scratch row past the end), then its last min(R + S, sinks + window) rows: Concat, ScatterElements and a
Slice with a negative start, O(sinks + window) per decode step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from chai_compile.rewrite.span import SpanAttention


def real_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> each slot's real-token index in its sequence (-1: padding)."""
    valid = attention_mask.bool()
    return torch.where(valid, valid.long().cumsum(1) - 1, -1)


def bounded_index(rows: Any, real: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[B, rows] real index of each row of a bounded past (-1: empty), from the real tokens seen [B]."""
    kept = real.clamp(max=sinks + window)[:, None]
    t = torch.arange(rows, device=real.device)[None, :] - (rows - kept)  # rank among the kept tokens
    return torch.where(t < 0, -1, torch.where(t < sinks, t, real[:, None] - kept + t))


def bounded_present(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, real_after: torch.Tensor,
                    sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values [B, n, E, d] with real indices [B, E] -> the bounded present (the layout above)."""
    b, n, e, d = keys.shape
    after = real_after[:, None]
    kept = after.clamp(max=sinks + window)
    survives = (index >= 0) & ((index < sinks) | (index >= after - window))
    rank = torch.where(index < sinks, index, index - (after - kept))
    dest = torch.where(survives, e - kept + rank, e)  # survivors never collide; the rest share the scratch row
    at = dest[:, None, :, None].expand(b, n, e, d)

    def place(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(b, n, e + 1, d).scatter(2, at, x)[:, :, :e][:, :, -(sinks + window):]

    return place(keys), place(values)


class SpanGraphCache:
    """One forward's hand-over between the DecoderWrapper and its span layers: the real indices of every slot
    (from the 2D mask), the bounded pasts in, the bounded presents out (per layer, in group order)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # [B, T]
        self.pasts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.presents: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def begin(self, attention_mask: torch.Tensor, pasts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.index = real_indices(attention_mask)
        self.pasts, self.presents = pasts, {}

    def attend(self, layer: SpanAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any
               ) -> torch.Tensor:
        """`layer`'s attention output [B, H, S, d] for positioned q, k, v; stores the layer's presents."""
        b, _, s, d = k.shape
        index = self.index
        new_index = index[:, index.shape[1] - s :]
        real_after = (index >= 0).sum(1)
        real = real_after - (new_index >= 0).sum(1)
        pasts = iter(self.pasts[layer.layer_idx])
        presents, outs, order, full = [], [], [], False
        for i, grp in enumerate(layer.groups):
            kvs, heads = getattr(layer, f"kv_heads_{i}"), getattr(layer, f"q_heads_{i}")
            k_new, v_new = k.index_select(1, kvs), v.index_select(1, kvs)
            if grp.window is None:  # the unbounded heads: the plain cache tensors, slot by slot
                keys, values = cache.update(k_new, v_new, layer.layer_idx)
                key_index, full = index, True
            else:
                past_k, past_v = next(pasts)
                keys, values = torch.cat([past_k, k_new], 2), torch.cat([past_v, v_new], 2)
                key_index = torch.cat([bounded_index(past_k.shape[2], real, grp.sinks, grp.window), new_index], 1)
                presents.append(bounded_present(keys, values, key_index, real_after, grp.sinks, grp.window))
            outs.append(layer._group_attention(q.index_select(1, heads), keys, values, key_index, new_index, heads))
            order += [kv * layer.group + j for kv in grp.kv_heads for j in range(layer.group)]
        if not full:  # no unbounded head: zero heads, which still carry the past length (as a shared layer's K)
            none = k.new_zeros(b, 0, s, d)
            cache.update(none, none, layer.layer_idx)
        self.presents[layer.layer_idx] = presents
        inverse = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=q.device)
        return torch.cat(outs, 1).index_select(1, inverse)


@contextlib.contextmanager
def graph_span_layers(wrapper: nn.Module) -> Iterator[None]:
    """Route the span layers under `wrapper` (a DecoderWrapper) through one SpanGraphCache while inside: the
    portable ones and the fused form's (export/fused_span.py), which may sit in one graph."""
    from chai_compile.export.fused_span import FusedSpanAttention

    layers = [m for m in wrapper.modules() if isinstance(m, SpanAttention | FusedSpanAttention)]
    if not layers:
        yield
        return
    io = SpanGraphCache()
    for m in layers:
        m.graph_cache = io
    wrapper.span_cache = io
    try:
        yield
    finally:
        for m in layers:
            m.graph_cache = None
        wrapper.span_cache = None
