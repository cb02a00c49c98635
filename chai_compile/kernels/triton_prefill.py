"""Fused clustered-attention prefill in Triton: causal flash attention, scores once per tile.

A program owns (query block, tile, sequence), where a tile is one cluster plus up to `tile_width`
of its distinct V heads (see tile_plan.ClusterPlan). Per key block it computes the cluster's
scores S = q K^T once, runs the online softmax, and does one wide matmul P [BLOCK_M, BLOCK_N] x
V [BLOCK_N, tile_width * d] whose columns are the tile's V heads side by side, so P.V for every
member head comes out of a single tensor-core dot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chai_compile.kernels._triton import LOG2E, require_triton, tl, triton
from chai_compile.kernels.tile_plan import get_plan


@triton.jit
def _prefill_inner(
    acc, m_i, l_i, q, k_base, v_base, v_cols, col_valid, offs_m, lo, hi, seq_len,
    stride_kt, stride_vt, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_valid = n < seq_len
        kt = tl.load(
            k_base + n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=n_valid[None, :] & dmask[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # scale * log2(e): softmax on exp2
        if CAUSAL_MASK:
            s = tl.where((offs_m[:, None] >= n[None, :]) & n_valid[None, :], s, float("-inf"))
        else:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + n[:, None].to(tl.int64) * stride_vt + v_cols[None, :],
            mask=n_valid[:, None] & col_valid[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Tiles,
    stride_qb, stride_qc, stride_qs,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_os,
    qk_scale, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    mb = tl.program_id(0)
    tile = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    row = Tiles + tile * (4 + M)  # cluster, K head, count, first slot, V heads (see ClusterPlan)
    c = tl.load(row).to(tl.int64)
    kh = tl.load(row + 1).to(tl.int64)
    count = tl.load(row + 2)
    slot0 = tl.load(row + 3)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    row_valid = offs_m < seq_len
    # Columns of the wide V tile: member j's head dims sit at [j*BLOCK_D, (j+1)*BLOCK_D).
    cols = tl.arange(0, M * BLOCK_D)
    member = cols // BLOCK_D
    dim = cols % BLOCK_D
    col_valid = (member < count) & (dim < HEAD_DIM)
    vh = tl.load(row + 4 + member).to(tl.int64)
    # Each member's BLOCK_D columns are contiguous and 16-byte aligned (stride_vh % 8 == 0, checked at
    # launch): without the hints the gathered V loads are scalar and cannot use cp.async.
    v_cols = vh * stride_vh + dim
    if ALIGNED:
        v_cols = tl.max_contiguous(tl.multiple_of(v_cols, 8), BLOCK_D)

    q = tl.load(
        Q + b * stride_qb + c * stride_qc + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
        mask=row_valid[:, None] & dmask[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, M * BLOCK_D], tl.float32)
    if CAUSAL:
        # Blocks fully below the diagonal need no mask; only the diagonal blocks do.
        diag = mb * BLOCK_M
        acc, m_i, l_i = _prefill_inner(
            acc, m_i, l_i, q, k_base, v_base, v_cols, col_valid, offs_m, 0, diag, seq_len,
            stride_kt, stride_vt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _prefill_inner(
            acc, m_i, l_i, q, k_base, v_base, v_cols, col_valid, offs_m, diag,
            tl.minimum(diag + BLOCK_M, seq_len), seq_len,
            stride_kt, stride_vt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _prefill_inner(
            acc, m_i, l_i, q, k_base, v_base, v_cols, col_valid, offs_m, 0, seq_len, seq_len,
            stride_kt, stride_vt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
    acc = acc / l_i[:, None]

    slot = (slot0 + member).to(tl.int64)
    o_ptrs = Out + b * stride_ob + slot[None, :] * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + dim[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


@dataclass(frozen=True)
class PrefillConfig:
    """Defaults from the sweep in docs/benchmarks.md (H100, d=128, bf16)."""

    tile_width: int | None = None  # None: 2, or 1 when every cluster reads a single V head
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


_DEFAULT = PrefillConfig()


def clustered_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    scale: float,
    causal: bool = True,
    *,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clustered attention over a prompt.

    q [B, C, S, d] (one query per cluster), k [B, Hk, S, d], v [B, Hv, S, d] -> [B, H, S, d] in
    permuted head order, dtype of q. Index tensors as in clustered_decode; out: optional
    preallocated [B, H, S, d] result.
    """
    require_triton()
    batch, num_clusters, seq_len, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[2] != seq_len or v.shape[2] != seq_len:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError("q, k and v must share the head size")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dim")
    if config is None:
        # fp32 or d > 128: the bf16 tiles would not fit in shared memory; halve them.
        big = q.element_size() > 2 or head_dim > 128
        config = PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2) if big else _DEFAULT
    cfg = config
    if cfg.block_m % cfg.block_n:
        raise ValueError("block_m must be a multiple of block_n (the causal diagonal is walked in block_n steps)")
    # Two V heads per program: a [BLOCK_M, 2 * d] fp32 accumulator is what fits in registers.
    plan = get_plan(cluster_offsets, k_head_index, v_head_index, cfg.tile_width, cap=2)
    if plan.num_clusters != num_clusters:
        raise ValueError(f"q has {num_clusters} cluster queries, the mapping {plan.num_clusters} clusters")
    if plan.max_k_head >= k.shape[1] or plan.max_v_head >= v.shape[1]:
        raise ValueError("k_head_index / v_head_index point past the heads of k / v")

    num_heads = plan.num_heads
    # MHA: slot i is head i, write in place. GQA heads sharing (cluster, V head) share a slot.
    shape = (batch, num_heads, seq_len, head_dim)
    if out is not None and (out.shape != shape or out.stride(-1) != 1):
        raise ValueError(f"out must be {list(shape)} with a contiguous last dim")
    dst = out if out is not None and plan.identity_slots else None
    if dst is None:
        dst = torch.empty(batch, plan.num_slots, seq_len, head_dim, device=q.device, dtype=q.dtype)
    block_d = triton.next_power_of_2(head_dim)
    grid = (triton.cdiv(seq_len, cfg.block_m), plan.num_tiles, batch)
    _prefill_kernel[grid](
        q, k, v, dst, plan.tiles,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dst.stride(0), dst.stride(1), dst.stride(2),
        scale * LOG2E, seq_len,
        HEAD_DIM=head_dim, BLOCK_D=block_d, M=plan.tile_width,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no tf32 rounding
        ALIGNED=v.stride(0) % 8 == 0 and v.stride(1) % 8 == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if plan.identity_slots:
        return dst
    if out is None:
        return dst.index_select(1, plan.slot_of_head.to(torch.int64))
    return torch.index_select(dst, 1, plan.slot_of_head.to(torch.int64), out=out)
