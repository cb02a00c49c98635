"""The single-pass split kernels of the clustered decode (one program per tile, split and sequence; the tiles
and the dispatch are described in triton_decode.py): `split_kernel` on CUDA cores for wide tiles and
`split_dot_kernel` on tensor cores. Both leave per-split partial results in the fp32 workspace, merged by
triton_split_merge.py (by a second kernel, or by the last program of each tile when FUSE_MERGE).
"""

from __future__ import annotations

from chai_compile.kernels._triton import tl, triton
from chai_compile.kernels.triton_span import key_rows, span_range
from chai_compile.kernels.triton_split_merge import merge_tile


@triton.jit
def split_kernel(
    Q, K, V, Lengths, Span, Tiles, Work, Counters, HeadsOfSlot, Out,
    stride_qb, stride_qc,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_outb, stride_outh,
    num_slots, num_splits, ml_offset,
    qk_scale, split_len, sinks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SPAN: tl.constexpr, FUSE_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: b * stride overflows int32 for 16 GiB caches

    row = Tiles + tile * (4 + M)
    c = tl.load(row)
    kh = tl.load(row + 1).to(tl.int64)
    count = tl.load(row + 2)
    slot0 = tl.load(row + 3)
    length = tl.load(Lengths + b)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M)
    dmask = offs_d < HEAD_DIM  # constexpr-true when BLOCK_D == HEAD_DIM
    m_valid = offs_m < count
    vh = tl.load(row + 4 + offs_m).to(tl.int64)

    a = 0  # sinks and span start (span_range); unused without a span
    s0 = 0
    if HAS_SPAN:
        a, s0, length = span_range(Span, b, sinks, length)

    # Fold scale and log2(e) into q so the softmax runs on exp2.
    q = tl.load(Q + b * stride_qb + c * stride_qc + offs_d, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + vh * stride_vh  # [M] pointers

    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_valid = n < hi
        t = key_rows(n, a, s0, HAS_SPAN)
        k = tl.load(
            k_base + t[:, None] * stride_kt + offs_d[None, :], mask=n_valid[:, None] & dmask[None, :], other=0.0
        )
        s = tl.sum(q[None, :] * k.to(tl.float32), 1)
        s = tl.where(n_valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every block holds at least one valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v_ptrs = v_base[:, None, None] + t[None, :, None] * stride_vt + offs_d[None, None, :]
        v_mask = m_valid[:, None, None] & n_valid[None, :, None] & dmask[None, None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[None, :, None] * v.to(tl.float32), 1)
        m_i = m_new

    # Workspace (fp32): partial accumulators [B, slots, splits, D] (ml_offset elements), then the
    # running maxima [B, slots, splits], then the sums [B, slots, splits].
    part = (b * num_slots + slot0 + offs_m) * num_splits + split
    tl.store(Work + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=m_valid[:, None] & dmask[None, :])
    tl.store(Work + ml_offset + part, tl.zeros([M], tl.float32) + m_i, mask=m_valid)
    tl.store(Work + ml_offset + ml_offset // HEAD_DIM + part, tl.zeros([M], tl.float32) + l_i, mask=m_valid)
    if FUSE_MERGE:
        merge_tile(Work, Counters, HeadsOfSlot, Out, b * tl.num_programs(0) + tile, slot0 + offs_m, m_valid, b,
                   stride_outb, stride_outh, num_slots, num_splits, ml_offset, HEAD_DIM, BLOCK_D, M, BLOCK_S, G,
                   ONE_PASS)


@triton.jit
def split_dot_kernel(
    Q, K, V, Lengths, Span, Tiles, Work, Counters, HeadsOfSlot, Out,
    stride_qb, stride_qc,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_outb, stride_outh,
    num_slots, num_splits, ml_offset,
    qk_scale, split_len, sinks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SPAN: tl.constexpr, FUSE_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Same contract as split_kernel, on tensor cores.

    The query is replicated to the 16 rows an MMA needs (all rows equal; row 0 is kept), so the
    score and P.V products are tl.dot calls whose operand loads Triton pipelines (cp.async)
    across key blocks; the tile's V heads sit side by side as one [BLOCK_N, M * BLOCK_D] operand.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    row = Tiles + tile * (4 + M)
    c = tl.load(row)
    kh = tl.load(row + 1).to(tl.int64)
    count = tl.load(row + 2)
    slot0 = tl.load(row + 3)
    length = tl.load(Lengths + b)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    dmask = offs_d < HEAD_DIM
    cols = tl.arange(0, M * BLOCK_D)  # member j's dims at [j * BLOCK_D, (j + 1) * BLOCK_D)
    member = cols // BLOCK_D
    dim = cols % BLOCK_D
    col_valid = (member < count) & (dim < HEAD_DIM)
    vh = tl.load(row + 4 + member).to(tl.int64)
    # Each member's BLOCK_D columns are contiguous and start 16-byte aligned (stride_vh % 8 == 0 is
    # checked at launch): the hints keep the V loads vectorised and eligible for cp.async.
    v_cols = tl.max_contiguous(tl.multiple_of(vh * stride_vh + dim, 8), BLOCK_D)

    a = 0  # sinks and span start (span_range); unused without a span
    s0 = 0
    if HAS_SPAN:
        a, s0, length = span_range(Span, b, sinks, length)

    q = tl.load(Q + b * stride_qb + c * stride_qc + offs_d, mask=dmask, other=0.0)
    q16 = tl.broadcast_to(q[None, :], (16, BLOCK_D))
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb

    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, M * BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_valid = n < hi
        t = key_rows(n, a, s0, HAS_SPAN)
        k = tl.load(
            k_base + t[:, None] * stride_kt + offs_d[None, :], mask=n_valid[:, None] & dmask[None, :], other=0.0
        )
        s = tl.dot(q16, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + t[:, None] * stride_vt + v_cols[None, :], mask=n_valid[:, None] & col_valid[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    first = rows[:, None] == 0
    o = tl.sum(tl.where(first, acc, 0.0), 0)  # [M * BLOCK_D], exact: one nonzero term per column
    m_row = tl.max(m_i, 0)
    l_row = tl.max(l_i, 0)
    # Same workspace layout as split_kernel.
    part = (b * num_slots + slot0 + member) * num_splits + split
    tl.store(Work + part * HEAD_DIM + dim, o, mask=col_valid)
    offs_m = tl.arange(0, M)
    m_valid = offs_m < count
    part_m = (b * num_slots + slot0 + offs_m) * num_splits + split
    tl.store(Work + ml_offset + part_m, tl.zeros([M], tl.float32) + m_row, mask=m_valid)
    tl.store(Work + ml_offset + ml_offset // HEAD_DIM + part_m, tl.zeros([M], tl.float32) + l_row, mask=m_valid)
    if FUSE_MERGE:
        merge_tile(Work, Counters, HeadsOfSlot, Out, b * tl.num_programs(0) + tile, slot0 + offs_m, m_valid, b,
                   stride_outb, stride_outh, num_slots, num_splits, ml_offset, HEAD_DIM, BLOCK_D, M, BLOCK_S, G,
                   ONE_PASS)
