"""CHAI rewrite: clustered attention modules, applying a mapping, and measuring the KV cache."""

from chai_compile.rewrite.apply import apply_mapping
from chai_compile.rewrite.cache_bytes import kv_cache_bytes
from chai_compile.rewrite.clustered_attention import ClusteredAttention, RewriteError, StaticLayout
from chai_compile.rewrite.dynamic import average_linkage

__all__ = ["ClusteredAttention", "RewriteError", "StaticLayout", "apply_mapping", "average_linkage",
           "kv_cache_bytes"]
