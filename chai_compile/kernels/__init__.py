"""Clustered-attention kernels: float64 torch reference and fused Triton decode / prefill.

`import chai_compile.kernels` works without triton; the Triton entry points raise when called
without it (check `HAS_TRITON`). All heads are in the exact permuted order that makes each
cluster a contiguous head range [cluster_offsets[c], cluster_offsets[c+1]).
"""

from chai_compile.kernels.reference import clustered_decode_reference, clustered_prefill_reference
from chai_compile.kernels.triton_decode import (
    HAS_TRITON,
    ClusterPlan,
    DecodeConfig,
    build_plan,
    clustered_decode,
    get_plan,
)
from chai_compile.kernels.triton_prefill import PrefillConfig, clustered_prefill

__all__ = [
    "HAS_TRITON",
    "ClusterPlan",
    "DecodeConfig",
    "PrefillConfig",
    "build_plan",
    "clustered_decode",
    "clustered_decode_reference",
    "clustered_prefill",
    "clustered_prefill_reference",
    "get_plan",
]
