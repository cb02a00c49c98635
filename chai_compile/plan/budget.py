"""The plan's KV saving at a stated context, for the planner's budget. The per-layer arithmetic lives in one
place, `LayerMapping.head_tokens` (mapping.py); this module only sums it against the native cache.
"""

from __future__ import annotations

from chai_compile.mapping import ClusterMapping


def native_bytes(mapping: ClusterMapping, context: int, elem_bytes: int = 2, batch: int = 1) -> int:
    """The original model's K + V bytes at `context`."""
    m = mapping.model
    return 2 * m.num_layers * m.num_kv_heads * context * m.head_dim * elem_bytes * batch


def kv_saving(mapping: ClusterMapping, context: int) -> float:
    """Fraction of the native KV cache the plan frees at `context` (independent of dtype and batch)."""
    planned = sum(k + v for k, v in mapping.cache_bytes(context, 2))
    return 1.0 - planned / native_bytes(mapping, context)
