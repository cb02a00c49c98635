"""Fused clustered-attention decode in Triton (flash-decoding with one score pass per cluster).

Work is cut into *tiles*: a tile is one cluster (one query, one K head) plus up to `tile_width`
distinct V heads read by that cluster's members. A program handles (tile, split of the sequence,
sequence): it streams the split's K rows once, keeps an online softmax, and accumulates P.V for
each of its V heads, so each K row is read once per tile and each V row once per (cluster, V
head). Heads of one cluster that share a V head (GQA) share one accumulator ("slot") and the
merge writes that slot to each of them. The splits are merged by a second kernel, or, on small steps,
by the last program of each tile (triton_split_merge.py).

Programs of the same (sequence, split) are launched next to each other so that tiles reading the
same K or V rows (a cluster cut into several tiles) meet in L2.

Where tiles would read a V head once per cluster (GQA clusters that cut across KV groups), and on
wide tiles of long caches, two kernels replace the split kernel instead: scores per K head, then P.V
per V head, so every K and V row is read once (triton_two_phase.py).

Without Triton this module still imports (kernels/_triton.py), and the entry point raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chai_compile.kernels._triton import LOG2E, require_triton, triton
from chai_compile.kernels.tile_plan import GROUP_ROWS, get_plan
from chai_compile.kernels.triton_split import split_dot_kernel, split_kernel
from chai_compile.kernels.triton_split_merge import merge_counters, reduce_kernel
from chai_compile.kernels.triton_two_phase import pv_kernel, scores_kernel

# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs; None means "pick from the tile width" (table from the sweep in docs/benchmarks.md)."""

    # V heads per program; None: 1 on small steps (SMALL_STEP_KEYS), else ~ the mean slots per cluster, at most 8
    tile_width: int | None = None
    block_n: int | None = None
    # None: 1 on small single-pass steps that fill the GPU with such programs (ONE_WARP_PER_SM), else 4
    num_warps: int | None = None
    num_stages: int | None = None
    # Keys per split at least: partial results stay a few % of the traffic. None: 64 on the single-pass
    # tiles (ONE_WARP_MIN_SPLIT on one-warp steps), 256 on the two-phase kernels (-10% time on H200 at B=1,
    # T=16k GQA, neutral elsewhere).
    min_split: int | None = None
    # Aim for this many programs per SM before splitting stops; None: 4 on one-warp steps, 2 on other small
    # steps, else 8.
    waves: float | None = None
    # Tensor-core variant (triton_split.split_dot_kernel); None: on for tile width <= 2, where its pipelined
    # loads measured +8-28% bandwidth on H100 (C=16 MHA, GQA); wider tiles run faster on the FMA kernel.
    use_dot: bool | None = None
    # Two-phase kernels (scores_kernel, pv_kernel); None: on when a V head is read by several clusters
    # (the tiles would read it once per cluster: 0.44-0.75x of dense SDPA on H200) and on tiles wider
    # than 2 from TWO_PHASE_MIN_KEYS keys (B * Tmax) on: there the FMA tiles measured 7-26% slower on
    # H200, below it (B=1, T=4096) 10% faster, as one launch fewer.
    two_phase: bool | None = None
    # Single-pass tiles only: merge the splits in the split kernel (the last program of each tile,
    # triton_split_merge.py) instead of a second launch; None: on small steps.
    fuse_merge: bool | None = None


TWO_PHASE_MIN_KEYS = 16384
# Small steps (B * Tmax <= SMALL_STEP_KEYS) are latency-bound: one tile per (cluster, V head) on tensor cores,
# few long splits (2 waves) whose loads pipeline across several key blocks, and the merge in the same launch.
# Forced at B=8, T=4096 they lost (MHA C=4 115 vs 95 us); at B=1, T=16384 they won for C=4, the only C
# measured there, so the threshold stays at what was measured.
SMALL_STEP_KEYS = 4096
# Where a small step cuts into at least ONE_WARP_PER_SM programs per SM of ONE_WARP_MIN_SPLIT keys or more,
# one-warp programs on 32-key blocks, 3 stages, 4 waves (48 KB of shared memory each, 4 resident per SM) replace
# the 4-warp programs: more independent load streams per SM, no cross-warp reductions in the softmax. Per layer
# of a 16-layer CUDA graph on the H200 (benchmarks/sweep_b1_stack.py), B=1 MHA C=4/8/16: T=4096
# 15.8/15.9/17.6 -> 14.8/15.7/17.5 us, T=2048 10.9/11.2/11.8 -> 10.0/10.4/11.3 us; where the step is too short
# to fill the GPU with them (T <= 1024, GQA with 8 tiles up to T=4096) they lost up to 55%.
ONE_WARP_MIN_SPLIT = 128
ONE_WARP_PER_SM = 3
ONE_WARP_BLOCK = (32, 3)  # (block_n, num_stages)


# tile width -> (block_n, num_stages): keeps M * BLOCK_N * d in registers near 32-64 KB per program.
_DECODE_TABLE = {1: (64, 3), 2: (64, 3), 4: (32, 3), 8: (32, 2), 16: (16, 2)}

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on the CPU (tests)
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_splits_for(
    batch: int, num_tiles: int, t_max: int, block_n: int, min_split: int, waves: float, sm_count: int
) -> tuple[int, int]:
    """(num_splits, split_len): split the sequence until the grid fills the GPU `waves` times."""
    want = math.ceil(waves * sm_count / max(1, batch * num_tiles))
    most = max(1, math.ceil(t_max / max(min_split, block_n)))
    n = max(1, min(want, most))
    split_len = math.ceil(math.ceil(t_max / n) / block_n) * block_n
    return math.ceil(t_max / split_len), split_len


def fills_with_one_warp(batch: int, num_tiles: int, t_len: int, sm_count: int) -> bool:
    """Whether a small step cuts into ONE_WARP_PER_SM programs per SM of ONE_WARP_MIN_SPLIT keys or more."""
    return batch * num_tiles * math.ceil(t_len / ONE_WARP_MIN_SPLIT) >= ONE_WARP_PER_SM * sm_count


_DEFAULT = DecodeConfig()


def clustered_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    scale: float,
    *,
    span: torch.Tensor | None = None,
    sinks: int = 0,
    max_length: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of clustered attention.

    q [B, C, d] (one query per cluster, positions applied); k_cache [B, Hk, Tmax, d];
    v_cache [B, Hv, Tmax, d] (any strides, last dim contiguous); lengths int32 [B]: keys
    0..lengths[b]-1 are attended. cluster_offsets [C+1], k_head_index [C], v_head_index [H]:
    int32 CUDA tensors. Returns [B, H, d] in permuted head order, dtype of q (fp32 accumulation).

    Optional: span int32 [B, 2] (start, end) with `sinks` leading tokens: only keys t < sinks or
    start <= t < end are attended and blocks outside are never read. max_length: an upper bound
    of lengths (defaults to Tmax) used to size the split; config: override the tuning; out: a
    preallocated [B, H, d] result (CUDA graphs, tests).
    """
    require_triton()
    batch, num_clusters, head_dim = q.shape
    t_max = k_cache.shape[2]
    if k_cache.shape[0] != batch or v_cache.shape[0] != batch or v_cache.shape[2] != t_max:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if k_cache.shape[3] != head_dim or v_cache.shape[3] != head_dim:
        raise ValueError("q, k_cache and v_cache must share the head size")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    cfg = config or _DEFAULT
    t_len = max_length or t_max
    small = batch * t_len <= SMALL_STEP_KEYS
    plan = get_plan(cluster_offsets, k_head_index, v_head_index, cfg.tile_width or (1 if small else None))
    if plan.num_clusters != num_clusters:
        raise ValueError(f"q has {num_clusters} cluster queries, the mapping {plan.num_clusters} clusters")
    if plan.max_k_head >= k_cache.shape[1] or plan.max_v_head >= v_cache.shape[1]:
        raise ValueError("k_head_index / v_head_index point past the cache's heads")
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    if span is not None and span.dtype != torch.int32:
        span = span.to(torch.int32)
    num_heads = plan.num_heads
    width = plan.tile_width
    two_phase = cfg.two_phase
    if two_phase is None:
        two_phase = plan.shared_v or (width > 2 and batch * t_len >= TWO_PHASE_MIN_KEYS)
    dev = q.device
    sms = _sm_count(dev)
    one_warp = small and not two_phase and fills_with_one_warp(batch, plan.num_tiles, t_len, sms)
    min_split = cfg.min_split or (256 if two_phase else ONE_WARP_MIN_SPLIT if one_warp else 64)
    # Two-phase programs hold one V head (one K head) like a width-1 tile.
    block_n, stages = ONE_WARP_BLOCK if one_warp else _DECODE_TABLE.get(1 if two_phase else width, (16, 2))
    block_n = cfg.block_n or block_n
    stages = cfg.num_stages or stages
    num_warps = cfg.num_warps or (1 if one_warp else 4)

    programs = plan.v_groups.shape[0] if two_phase else plan.num_tiles
    waves = cfg.waves or (4.0 if one_warp else 2.0 if small else 8.0)
    n_split, split_len = num_splits_for(batch, programs, t_len, block_n, min_split, waves, sms)
    ml_offset = batch * plan.num_slots * n_split * head_dim
    work = torch.empty(ml_offset + 2 * batch * plan.num_slots * n_split, device=dev, dtype=torch.float32)
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, device=dev, dtype=q.dtype)
    elif out.shape != (batch, num_heads, head_dim) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{batch}, {num_heads}, {head_dim}] with a contiguous last dim")
    block_d = triton.next_power_of_2(head_dim)

    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    span_arg = span if span is not None else lengths
    fuse = not two_phase and (small if cfg.fuse_merge is None else cfg.fuse_merge)
    # Counters are only touched when fused; a stand-in keeps the unfused launch allocation-free. BLOCK_S keeps
    # the merge's [width, BLOCK_S, d] partials near 8K floats in registers.
    counters = merge_counters(dev, batch * programs) if fuse else lengths
    block_s = max(1, min(32, triton.next_power_of_2(n_split), 8192 // (width * block_d)))
    merge_args = dict(FUSE_MERGE=fuse, G=plan.heads_per_slot, BLOCK_S=block_s, ONE_PASS=n_split <= block_s)
    if two_phase:
        scores = torch.empty(batch, num_clusters, t_max, device=dev, dtype=torch.float32)
        common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ROWS=GROUP_ROWS, BLOCK_N=block_n,
                      HAS_SPAN=span is not None, DOT_PRECISION=precision, num_warps=num_warps, num_stages=stages)
        # Phase 1 runs on fewer heads (the kept K heads): its own, finer split keeps the GPU busy. The
        # scores are indexed by key, so the two phases need not agree on the split.
        k_split, k_split_len = num_splits_for(
            batch, plan.k_groups.shape[0], t_len, block_n, min_split, waves, _sm_count(dev)
        )
        scores_kernel[(plan.k_groups.shape[0], k_split, batch)](
            q, k_cache, lengths, span_arg, plan.k_groups, scores,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_clusters, scores.stride(1),
            scale * LOG2E, k_split_len, sinks, **common,
        )  # fmt: skip
        pv_kernel[(plan.v_groups.shape[0], n_split, batch)](
            v_cache, lengths, span_arg, plan.v_groups, scores, work,
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            num_clusters, scores.stride(1),
            plan.num_slots, n_split, ml_offset,
            split_len, sinks, **common,
        )  # fmt: skip
    else:
        use_dot = width <= 2 if cfg.use_dot is None else cfg.use_dot
        use_dot = use_dot and v_cache.stride(1) % 8 == 0 and v_cache.stride(0) % 8 == 0  # 16-byte aligned V rows
        kernel = split_dot_kernel if use_dot else split_kernel
        extra = {"DOT_PRECISION": precision} if use_dot else {}
        kernel[(plan.num_tiles, n_split, batch)](
            q, k_cache, v_cache, lengths, span_arg, plan.tiles, work, counters, plan.heads_of_slot, out,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            plan.num_slots, n_split, ml_offset,
            scale * LOG2E, split_len, sinks,
            HEAD_DIM=head_dim, BLOCK_D=block_d, M=width, BLOCK_N=block_n, HAS_SPAN=span is not None,
            num_warps=num_warps, num_stages=stages, **extra, **merge_args,
        )  # fmt: skip
    if not fuse:
        reduce_kernel[(num_heads, batch)](
            work, plan.slot_of_head, out,
            out.stride(0), out.stride(1),
            plan.num_slots, n_split, ml_offset,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=min(32, triton.next_power_of_2(n_split)),
            num_warps=4,
        )  # fmt: skip
    return out
