"""KV-cache bytes of a plan at a stated context: the one place this arithmetic lives (GQA counted).

Per layer and KV head, tokens held at context C (one sequence):
- dense: K and V hold C tokens each;
- clustered: K only for the KV heads some representative reads, V for every KV head;
- shared: no K at all (the source's probabilities are reused), V for every KV head;
- span: a KV head whose every query head has a span holds min(C, max sinks + max window) tokens of K
  and V (the union of its query heads' spans); a KV head with a full-attention query head holds C.
Bytes = tokens x head_dim x element bytes x batch. The rewrite's cache accounting should agree with this.
"""

from __future__ import annotations

from chai_compile.choices import LayerKind
from chai_compile.mapping import ClusterMapping, LayerMapping


def layer_head_tokens(lm: LayerMapping, num_heads: int, num_kv_heads: int, context: int) -> tuple[int, int]:
    """(K tokens, V tokens) summed over the layer's KV heads at `context` cached tokens."""
    if lm.kind == LayerKind.SHARED:
        return 0, num_kv_heads * context
    if lm.kind == LayerKind.CLUSTERED:
        return len(lm.kept_k_heads(num_heads, num_kv_heads)) * context, num_kv_heads * context
    if lm.kind == LayerKind.DENSE:
        return num_kv_heads * context, num_kv_heads * context
    group = num_heads // num_kv_heads
    total = 0
    for g in range(num_kv_heads):
        spans = lm.spans[g * group : (g + 1) * group]
        if any(sp is None for sp in spans):
            total += context
        else:
            total += min(context, max(sp.sinks for sp in spans) + max(sp.window for sp in spans))  # type: ignore[union-attr]
    return total, total


def kv_cache_bytes(mapping: ClusterMapping, context: int, elem_bytes: int = 2, batch: int = 1) -> list[tuple[int, int]]:
    """(K bytes, V bytes) per layer at `context` tokens for `batch` sequences."""
    m = mapping.model
    per_token = m.head_dim * elem_bytes * batch
    return [tuple(t * per_token for t in layer_head_tokens(lm, m.num_heads, m.num_kv_heads, context))  # type: ignore[misc]
            for lm in mapping.layers]


def native_bytes(mapping: ClusterMapping, context: int, elem_bytes: int = 2, batch: int = 1) -> int:
    """The original model's K + V bytes at `context`."""
    m = mapping.model
    return 2 * m.num_layers * m.num_kv_heads * context * m.head_dim * elem_bytes * batch


def kv_saving(mapping: ClusterMapping, context: int) -> float:
    """Fraction of the native KV cache the plan frees at `context` (independent of dtype and batch)."""
    planned = sum(k + v for k, v in kv_cache_bytes(mapping, context))
    return 1.0 - planned / native_bytes(mapping, context)
