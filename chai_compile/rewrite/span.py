"""Span layers: a query head with Span(sinks, window) attends only to its sequence's first `sinks` real
tokens and its last `window` real tokens (the current one included); a head without a span attends fully.

Every head keeps its own Q, K and V (a span layer removes no projection). Memory is what changes: KV
heads read only by span heads keep a bounded cache (`span_cache.SpanCacheLayer`), the others the full
one. Each query row's allowed keys come from the real index stored beside every cached entry:

    allowed(h, i, j) = 0 <= j <= i  and  (span_h is None or j < sinks_h or j > i - window_h)

with i, j real-token indices (left padding has index -1 and is never attended). Scores are fp32 with
the fp32 minimum on masked entries, as the other rewritten layers, so a padding query row gets uniform
weights rather than NaN.

On CUDA in fp16/bf16 a decode step (one token per sequence) runs on the Triton decode kernel over the
cache as stored (span_kernel.py says which heads it can take); prefill, CPU and fp32 take this torch path.
"""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.choices import Membership
from chai_compile.mapping import LayerMapping, Span
from chai_compile.rewrite.base import ClusteredAttention, RewriteError, owned_linear
from chai_compile.rewrite.span_cache import HeadGroup, SpanCacheLayer
from chai_compile.rewrite.span_kernel import SpanClass, consecutive, span_classes, span_decode
from chai_compile.rewrite.span_step import SpanStep, span_step
from chai_compile.rewrite.static import _HALF, _kernels


def head_groups(spans: tuple[Span | None, ...], num_kv_heads: int) -> tuple[HeadGroup, ...]:
    """KV heads grouped by storage: bounded ones by the union of their query heads' spans, then the full ones."""
    group = len(spans) // num_kv_heads
    rules: dict[tuple[int, int | None], list[int]] = {}
    for kv in range(num_kv_heads):
        mine = spans[kv * group : (kv + 1) * group]
        key = (0, None) if any(sp is None for sp in mine) else \
            (max(sp.sinks for sp in mine), max(sp.window for sp in mine))  # type: ignore[union-attr]
        rules.setdefault(key, []).append(kv)
    return tuple(HeadGroup(tuple(kvs), sinks, window) for (sinks, window), kvs in rules.items())


class SpanAttention(ClusteredAttention):
    """A span layer's attention, with its own cache layer (installed in the transformers cache it is handed)."""

    membership = Membership.STATIC  # fixed by the plan
    # Set by the portable export while it traces (export/span_graph.py): the bounded caches then travel as the
    # graph's own tensors instead of a SpanCacheLayer.
    graph_cache: Any = None

    def __init__(self, adapter: ModelAdapter, layer: LayerMapping) -> None:
        spec = adapter.spec
        super().__init__(adapter, layer.index, spec.num_heads, spec.num_kv_heads)
        p = adapter.projections(layer.index)
        self.q_proj = owned_linear(p.q_weight, p.q_bias)
        self.k_proj = owned_linear(p.k_weight, p.k_bias)
        self.spans = layer.spans
        self.groups = head_groups(layer.spans, spec.num_kv_heads)
        self._kv_at = tuple(consecutive(g.kv_heads) for g in self.groups)  # views where a group's heads allow
        self.use_kernels = True  # tests and benchmarks switch the CUDA decode kernel off to compare paths
        self._classes: dict[torch.device, tuple[SpanClass, ...]] = {}  # the kernel's tables, per device
        big = torch.iinfo(torch.int64).max // 4  # "no limit" for a full head, far from overflow
        sinks = [0 if sp is None else sp.sinks for sp in layer.spans]
        window = [big if sp is None else sp.window for sp in layer.spans]
        dev = p.q_weight.device
        self.register_buffer("sinks", torch.tensor(sinks, device=dev), persistent=False)
        self.register_buffer("window", torch.tensor(window, device=dev), persistent=False)
        # Per head group: its KV heads and their query heads (KV-major), as buffers that follow .to(device).
        for i, grp in enumerate(self.groups):
            kvs = torch.tensor(grp.kv_heads, device=dev)
            self.register_buffer(f"kv_heads_{i}", kvs, persistent=False)
            self.register_buffer(f"q_heads_{i}", (kvs[:, None] * self.group + torch.arange(self.group, device=dev))
                                 .flatten(), persistent=False)

    def extra_repr(self) -> str:
        bounded = sum(len(g.kv_heads) for g in self.groups if g.window is not None)
        return f"layer={self.layer_idx}, heads={self.num_heads}, bounded_kv_heads={bounded}/{self.num_kv_heads}"

    def cache_layer(self, cache: Any) -> SpanCacheLayer | None:
        """This layer's entry of `cache`, installed on first use (the cache must not hold tokens for it yet)."""
        if cache is None:
            return None
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise RewriteError(f"layer {self.layer_idx}: a span layer needs a transformers Cache with per-layer "
                               f"entries, got {type(cache).__name__}", fix="use the default DynamicCache")
        grow = getattr(cache, "layer_class_to_replicate", None)
        while len(layers) < self.layer_idx and grow is not None:  # a cache that creates its layers lazily
            layers.append(grow())
        if len(layers) == self.layer_idx:
            layers.append(SpanCacheLayer(self.groups))
        if len(layers) <= self.layer_idx:
            raise RewriteError(f"layer {self.layer_idx}: the cache has no entry for this layer",
                               value=len(layers), fix="use the default DynamicCache")
        entry = layers[self.layer_idx]
        if not isinstance(entry, SpanCacheLayer):
            if entry.get_seq_length() or getattr(entry, "is_compileable", False):
                raise RewriteError(f"layer {self.layer_idx}: a span layer keeps its own cache layer, but this cache "
                                   f"holds a {type(entry).__name__} here", fix="use the default DynamicCache "
                                   "(cache_implementation='dynamic') and prefill through the rewritten model")
            entry = layers[self.layer_idx] = SpanCacheLayer(self.groups)
        return entry

    def attend(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        x = call.hidden_states
        b, s, _ = x.shape
        d = self.head_dim
        q = self.heads(self.q_proj(x), self.num_heads)
        k = self.heads(self.k_proj(x), self.num_kv_heads)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = self.adapter.position(q, k, call)
        if self.graph_cache is not None:
            return self.graph_cache.attend(self, q, k, v, cache)
        layer = self.cache_layer(cache)
        if layer is not None and not layer.is_initialized:
            layer.lazy_initialization(k, v)
        past = 0 if layer is None else layer.seen
        real = torch.zeros(b, dtype=torch.int64, device=x.device) if layer is None else layer.real
        step = span_step(call, cache, real, past)
        index, real_after = step.index, step.real_after
        if s == 1 and layer is not None and self._on_kernel(q):
            return self._kernel_decode(q, k, v, layer, step, padded=call.attention_mask is not None)
        out = x.new_empty(b, self.num_heads, s, d)
        for i in range(len(self.groups)):
            heads = getattr(self, f"q_heads_{i}")
            k_new, v_new = self._kv_of(k, i), self._kv_of(v, i)
            if layer is None:
                keys, values, key_index = k_new, v_new, index
            elif s == 1:  # one token: what the cache keeps once it is in holds every key it may read (no copy)
                layer.store(i, k_new, v_new, index, real_after, s, step)
                keys, values, key_index = layer.past(i)
            else:  # a chunk's early queries may read keys its later tokens evict: attend over past + chunk
                pk, pv, pi = layer.past(i)
                keys, values = torch.cat([pk, k_new], -2), torch.cat([pv, v_new], -2)
                key_index = torch.cat([pi, index], -1)
                layer.store(i, k_new, v_new, index, real_after, s, step)
            out[:, heads] = self._group_attention(q.index_select(1, heads), keys, values, key_index, index, heads)
        if layer is not None:
            layer.advance(real_after, s)
        return out

    def _kernel_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: SpanCacheLayer,
                       step: SpanStep, padded: bool) -> torch.Tensor:
        """One decode step on the Triton kernel (span_kernel.py), which reads the cache as stored: the
        current token is stored first."""
        for i in range(len(self.groups)):
            layer.store(i, self._kv_of(k, i), self._kv_of(v, i), step.index, step.real_after, 1, step)
        layer.advance(step.real_after, 1)
        classes = self._classes.get(q.device)
        if classes is None:
            classes = self._classes[q.device] = span_classes(self.spans, self.groups, self.group, q.device)
        return span_decode(q[:, :, 0], layer, classes, step, self.scale, padded).unsqueeze(2)

    def _kv_of(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Head group i's KV heads of t [B, KV, S, d]: a view when they are consecutive (no copy launched)."""
        at = self._kv_at[i]
        return t[:, at] if at is not None else t.index_select(1, getattr(self, f"kv_heads_{i}"))

    def _on_kernel(self, q: torch.Tensor) -> bool:
        """Decode on the Triton kernel: CUDA, fp16/bf16, as static layers (tl.dot needs a head size >= 16)."""
        return (self.use_kernels and q.is_cuda and q.dtype in _HALF and self.head_dim >= 16
                and _kernels() is not None)

    def _group_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_index: torch.Tensor,
                         query_index: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """q [B, n*g, S, d] over keys/values [B, n, E, d] with real indices [B, E] -> [B, n*g, S, d]."""
        b, nq, s, d = q.shape
        n = keys.shape[1]
        scores = torch.matmul(q.unflatten(1, (n, self.group)), keys.unsqueeze(2).transpose(-1, -2))
        scores = scores.float().flatten(1, 2) * self.scale  # [B, n*g, S, E]
        i = query_index[:, None, :, None]  # [B, 1, S, 1]
        j = key_index[:, None, None, :]  # [B, 1, 1, E]
        sinks = self.sinks.index_select(0, heads)[None, :, None, None]
        window = self.window.index_select(0, heads)[None, :, None, None]
        allowed = (j >= 0) & (j <= i) & ((j < sinks) | (j > i - window))
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1).to(values.dtype)
        out = torch.matmul(probs.unflatten(1, (n, self.group)), values.unsqueeze(2))
        return out.flatten(1, 2)
