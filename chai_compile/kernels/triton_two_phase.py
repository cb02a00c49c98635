"""Two-phase decode: every K row and every V row is read exactly once, however the clusters cut across KV
groups. Phase 1 (one program per K head, split, sequence) scores all clusters of that K head in one
tl.dot and writes the fp32 scores, B * C * T floats (1/64 of the K bytes per cluster at d=128). Phase
2 (one program per V head, split, sequence) reads each V row once and runs the online softmax and P.V
for every slot (cluster, V head) of that V head, writing the same partial results as the tile kernels
so reduce_kernel (triton_split_merge.py) merges them. The single-pass tile kernels read a V head once per
cluster that uses it: up to 3x the dense V traffic on GQA layouts that scatter the KV groups.

Launched by chai_compile.kernels.triton_decode.clustered_decode, which picks between the two paths.
"""

from __future__ import annotations

from chai_compile.kernels._triton import tl, triton
from chai_compile.kernels.triton_span import key_rows, span_range


@triton.jit
def scores_kernel(
    Q, K, Lengths, Span, KGroups, Scores,
    stride_qb, stride_qc,
    stride_kb, stride_kh, stride_kt,
    num_clusters, stride_st,
    qk_scale, split_len, sinks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SPAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores[b, c, n] = q_c . k_t * scale * log2(e) for the n-th attended key t of split `split`."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    row = KGroups + group * (2 + ROWS)
    kh = tl.load(row).to(tl.int64)
    count = tl.load(row + 1)
    offs_r = tl.arange(0, ROWS)
    r_valid = offs_r < count
    cl = tl.load(row + 2 + offs_r).to(tl.int64)
    length = tl.load(Lengths + b)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_DIM
    a = 0  # sinks and span start (span_range); unused without a span
    s0 = 0
    if HAS_SPAN:
        a, s0, length = span_range(Span, b, sinks, length)

    q = tl.load(
        Q + b * stride_qb + cl[:, None] * stride_qc + offs_d[None, :], mask=r_valid[:, None] & dmask[None, :], other=0.0
    )
    k_base = K + b * stride_kb + kh * stride_kh
    s_rows = Scores + (b * num_clusters + cl) * stride_st  # [ROWS] pointers

    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_valid = n < hi
        t = key_rows(n, a, s0, HAS_SPAN)
        k = tl.load(
            k_base + t[:, None] * stride_kt + offs_d[None, :], mask=n_valid[:, None] & dmask[None, :], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        tl.store(s_rows[:, None] + n[None, :], s, mask=r_valid[:, None] & n_valid[None, :])


@triton.jit
def pv_kernel(
    V, Lengths, Span, VGroups, Scores, Work,
    stride_vb, stride_vh, stride_vt,
    num_clusters, stride_st,
    num_slots, num_splits, ml_offset,
    split_len, sinks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SPAN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of each slot's cluster scores and P.V with the V head of the group; one V read."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    row = VGroups + group * (2 + 2 * ROWS)
    vh = tl.load(row).to(tl.int64)
    count = tl.load(row + 1)
    offs_r = tl.arange(0, ROWS)
    r_valid = offs_r < count
    slot = tl.load(row + 2 + offs_r).to(tl.int64)
    cl = tl.load(row + 2 + ROWS + offs_r).to(tl.int64)  # padding rows read cluster 0: finite, never stored
    length = tl.load(Lengths + b)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_DIM
    a = 0  # sinks and span start (span_range); unused without a span
    s0 = 0
    if HAS_SPAN:
        a, s0, length = span_range(Span, b, sinks, length)

    v_base = V + b * stride_vb + vh * stride_vh
    s_rows = Scores + (b * num_clusters + cl) * stride_st

    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_valid = n < hi
        t = key_rows(n, a, s0, HAS_SPAN)
        s = tl.load(s_rows[:, None] + n[None, :], mask=n_valid[None, :], other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + t[:, None] * stride_vt + offs_d[None, :], mask=n_valid[:, None] & dmask[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Same workspace layout as triton_split.split_kernel; slots of one group need not be adjacent.
    part = (b * num_slots + slot) * num_splits + split
    tl.store(Work + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_valid[:, None] & dmask[None, :])
    tl.store(Work + ml_offset + part, m_i, mask=r_valid)
    tl.store(Work + ml_offset + ml_offset // HEAD_DIM + part, l_i, mask=r_valid)
