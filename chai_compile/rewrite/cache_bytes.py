"""KV-cache size measured from the tensors the cache actually holds (not from a head-count formula)."""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.rewrite.span_cache import SpanCacheLayer


def _layer_tensors(cache: Any) -> list[tuple[Any, Any]]:
    if cache is None:
        return []
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
    if hasattr(cache, "layers"):  # transformers 5.x Cache: one object per layer
        return [_span_layer(layer) if isinstance(layer, SpanCacheLayer) else
                (getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # transformers 4.x DynamicCache
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(kv[0], kv[1]) for kv in cache]  # legacy tuple of (key, value)


def _span_layer(layer: SpanCacheLayer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A span layer's K and V, one tensor per head group (bounded groups stop growing)."""
    return [e[0] for e in layer.entries], [e[1] for e in layer.entries]


def _nbytes(t: Any) -> int:
    if isinstance(t, list):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _shape(t: Any) -> Any:
    if isinstance(t, list):
        return [_shape(x) for x in t]
    return list(t.shape) if isinstance(t, torch.Tensor) else None


def kv_cache_bytes(past_key_values: Any) -> dict[str, Any]:
    """Bytes held by a KV cache now: {"key_bytes", "value_bytes", "total_bytes", "per_layer": [{"layer",
    "key_bytes", "value_bytes", "key_shape", "value_shape"}]}. After a CHAI rewrite a clustered layer's
    key_shape is [B, kept K heads, T, d] while value_shape keeps every KV head; a shared layer's key_shape
    has 0 heads; a span layer's shapes are one per head group, [B, n, min(T, sinks + window), d] for a
    bounded one."""
    per_layer = [
        {"layer": i, "key_bytes": _nbytes(k), "value_bytes": _nbytes(v),
         "key_shape": _shape(k), "value_shape": _shape(v)}
        for i, (k, v) in enumerate(_layer_tensors(past_key_values))
    ]
    key = sum(p["key_bytes"] for p in per_layer)
    value = sum(p["value_bytes"] for p in per_layer)
    return {"key_bytes": key, "value_bytes": value, "total_bytes": key + value, "per_layer": per_layer}
