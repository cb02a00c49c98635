"""Clustered-attention math: the float64 reference (reference.py), the fused node's contract (fused_op.py)
and the fused Triton decode / prefill kernels.

`import chai_compile.kernels` works without triton, and imports no Triton module until a kernel name is
used (PEP 562): running a fused graph needs only the contract. The Triton entry points raise when called
without triton (check `HAS_TRITON`). All heads are in the exact permuted order of `chai_compile.layout`
that makes each cluster a contiguous head range [cluster_offsets[c], cluster_offsets[c+1]).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "clustered_decode_reference": "reference", "clustered_prefill_reference": "reference",
    "HAS_TRITON": "_triton", "ClusterPlan": "tile_plan", "DecodeConfig": "triton_decode",
    "build_plan": "tile_plan", "clustered_decode": "triton_decode", "get_plan": "tile_plan",
    "plan_for_layout": "tile_plan", "PrefillConfig": "triton_prefill", "clustered_prefill": "triton_prefill",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
