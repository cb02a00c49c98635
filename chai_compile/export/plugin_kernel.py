"""ctypes binding of the CUDA entry point that the TensorRT plugin's enqueue calls
(libchai_attention_kernel.so, built by plugins/tensorrt/CMakeLists.txt): the params struct of
clusteredAttentionKernel.h, mirrored here and size-checked on load, and how one fused node's attributes
fill it. The plugin tests and plugins/tensorrt/tools/bench_kernel.py drive the kernel through it."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_HEADS = 256  # CHAI_MAX_HEADS: sizes the by-value tables
KERNEL_LIBRARY = "libchai_attention_kernel.so"


class ChaiClusteredAttentionParams(ctypes.Structure):
    """Mirror of ChaiClusteredAttentionParams in clusteredAttentionKernel.h (checked with ParamsSize)."""

    _fields_ = [
        ("batch", ctypes.c_int32),
        ("seq_len", ctypes.c_int32),
        ("past_len", ctypes.c_int32),
        ("cache_len", ctypes.c_int32),
        ("share_buffer", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_clusters", ctypes.c_int32),
        ("num_k_heads", ctypes.c_int32),
        ("num_v_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("mask_dtype", ctypes.c_int32),
        ("cluster_offsets", ctypes.c_int32 * (MAX_HEADS + 1)),
        ("k_head_index", ctypes.c_int32 * MAX_HEADS),
        ("v_head_index", ctypes.c_int32 * MAX_HEADS),
        ("query", ctypes.c_void_p),
        ("key", ctypes.c_void_p),
        ("value", ctypes.c_void_p),
        ("past_key", ctypes.c_void_p),
        ("past_value", ctypes.c_void_p),
        ("attention_mask", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("present_key", ctypes.c_void_p),
        ("present_value", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("num_splits", ctypes.c_int32),
        ("ring_sinks", ctypes.c_int32),
        ("ring_window", ctypes.c_int32),
        ("span_sinks", ctypes.c_void_p),  # host tables of the CPU kernel's span path: null for the CUDA kernel
        ("span_window", ctypes.c_void_p),
    ]


def load_kernel(build_dir: str | Path) -> ctypes.CDLL:
    """The kernel library of a plugin build directory, with its signatures set and the struct size checked
    (a mirror that drifted from the header would otherwise pass garbage to the GPU)."""
    lib = ctypes.CDLL(str(Path(build_dir) / KERNEL_LIBRARY))
    lib.chaiClusteredAttentionEnqueue.argtypes = [ctypes.POINTER(ChaiClusteredAttentionParams), ctypes.c_void_p]
    lib.chaiClusteredAttentionEnqueue.restype = ctypes.c_int
    lib.chaiClusteredAttentionWorkspaceSize.argtypes = [ctypes.POINTER(ChaiClusteredAttentionParams)]
    lib.chaiClusteredAttentionWorkspaceSize.restype = ctypes.c_size_t
    lib.chaiClusteredAttentionParamsSize.restype = ctypes.c_size_t
    if lib.chaiClusteredAttentionParamsSize() != ctypes.sizeof(ChaiClusteredAttentionParams):
        raise RuntimeError(f"{KERNEL_LIBRARY}: ChaiClusteredAttentionParams differs from the ctypes mirror")
    return lib


def layer_params(attrs: Mapping[str, Any]) -> ChaiClusteredAttentionParams:
    """The constants and tables of one fused node's attributes (fused_op.node_attributes); shapes, types and
    pointers are left zero for the caller."""
    prm = ChaiClusteredAttentionParams()
    prm.num_heads, prm.num_clusters = attrs["num_heads"], attrs["num_clusters"]
    prm.num_k_heads, prm.num_v_heads, prm.head_dim = attrs["num_k_heads"], attrs["num_v_heads"], attrs["head_dim"]
    prm.scale, prm.causal = attrs["scale"], attrs["causal"]
    prm.share_buffer = attrs.get("past_present_share_buffer", 0)
    for table in ("cluster_offsets", "k_head_index", "v_head_index"):
        getattr(prm, table)[: len(attrs[table])] = list(attrs[table])
    return prm
