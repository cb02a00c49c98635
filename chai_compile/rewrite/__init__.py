"""CHAI rewrite: clustered attention modules (static and dynamic membership), shared and span layers,
applying a plan, and measuring the KV cache."""

from chai_compile.rewrite.apply import apply_mapping
from chai_compile.rewrite.base import ClusteredAttention, RewriteError
from chai_compile.rewrite.cache_bytes import kv_cache_bytes
from chai_compile.rewrite.dynamic import DynamicClusteredAttention, average_linkage
from chai_compile.rewrite.shared import SharedAttention
from chai_compile.rewrite.span import SpanAttention
from chai_compile.rewrite.static import StaticClusteredAttention

__all__ = ["ClusteredAttention", "DynamicClusteredAttention", "RewriteError", "SharedAttention", "SpanAttention",
           "StaticClusteredAttention", "apply_mapping", "average_linkage", "kv_cache_bytes"]
