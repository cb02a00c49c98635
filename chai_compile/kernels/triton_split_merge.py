"""Merging the splits of the decode kernels (triton_decode.py, triton_two_phase.py): each program leaves a
partial result in the fp32 workspace (accumulator [B, slots, splits, D], then running maxima and sums
[B, slots, splits]); merging rescales them to the global maximum and writes each head's output.

Two forms:

- `reduce_kernel`, a second launch over (head, sequence) after the split or P.V kernel.
- `merge_tile`, called at the end of a single-pass tile program: a counter per (sequence, tile) counts the
  splits done and the program that finishes last merges that tile's slots itself, so the decode is one
  launch. It pays where the merge is short (few splits, narrow tiles: the small-step defaults); with 64
  splits of 8-wide tiles the serial merge at the end cost more than the launch it saved (H200, B=1 T=4096).

Counters live in a zeroed int32 buffer per device that the merging program puts back to zero, so
consecutive launches and CUDA graph replays find them zero without a memset launch.
"""

from __future__ import annotations

import torch

from chai_compile.kernels._triton import tl, triton


@triton.jit
def reduce_kernel(
    Work, SlotOfHead, Out,
    stride_outb, stride_outh,
    num_slots, num_splits, ml_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = tl.load(SlotOfHead + h).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    dmask = offs_d < HEAD_DIM
    ml_base = (b * num_slots + slot) * num_splits
    Mpart = Work + ml_offset
    Lpart = Mpart + ml_offset // HEAD_DIM

    # Pass 1: global max over the splits' maxima (empty splits hold -inf).
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        m_max = tl.maximum(m_max, tl.load(Mpart + ml_base + s, mask=s < num_splits, other=float("-inf")))
    m_all = tl.max(m_max, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # no key at all: output 0, not NaN

    # Pass 2: rescale and sum the partial accumulators.
    acc = tl.zeros([BLOCK_D], tl.float32)
    l_sum = tl.zeros([BLOCK_S], tl.float32)
    o_base = Work + ml_base * HEAD_DIM
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        s_valid = s < num_splits
        w = tl.exp2(tl.load(Mpart + ml_base + s, mask=s_valid, other=float("-inf")) - m_all)
        l_sum += w * tl.load(Lpart + ml_base + s, mask=s_valid, other=0.0)
        o = tl.load(o_base + s[:, None] * HEAD_DIM + offs_d[None, :], mask=s_valid[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    l_all = tl.sum(l_sum, 0)
    out = acc / tl.where(l_all == 0.0, 1.0, l_all)
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d, out.to(Out.dtype.element_ty), mask=dmask)


@triton.jit
def _splits(Work, base, s0, valid, num_splits, ml_offset,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Maxima and sums [R, BLOCK_S] and partial outputs [R, BLOCK_S, BLOCK_D] of splits s0.. of the R slots at
    `base` (masked entries: -inf, 0, 0). Other programs wrote them from other SMs: .cg reads them from L2, never
    from a stale L1."""
    s = s0 + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    sm = valid[:, None] & (s < num_splits)[None, :]
    part = base[:, None] + s[None, :]
    m = tl.load(Work + ml_offset + part, mask=sm, other=float("-inf"), cache_modifier=".cg")
    total = tl.load(Work + ml_offset + ml_offset // HEAD_DIM + part, mask=sm, other=0.0, cache_modifier=".cg")
    o = tl.load(Work + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                mask=sm[:, :, None] & (offs_d < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")  # fmt: skip
    return m, total, o


@triton.jit
def merge_tile(
    Work, Counters, HeadsOfSlot, Out,
    counter, slots, valid, b,
    stride_outb, stride_outh,
    num_slots, num_splits, ml_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr,
    ONE_PASS: tl.constexpr,
):  # fmt: skip
    """Count this split of the tile in; the last one merges the tile's slots (`slots` [R], `valid` [R]).

    HeadsOfSlot [slots, G]: the heads that read each slot (-1 padded); the merged slot is written to each.
    ONE_PASS: num_splits <= BLOCK_S (the small steps), so the maxima, sums and partials load together.
    """
    # Every thread's partial stores come before the release of the counter (bar.sync, then the atomic of
    # one thread, the pattern of a CUDA split-K semaphore).
    tl.debug_barrier()
    arrived = tl.atomic_add(Counters + counter, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        tl.store(Counters + counter, 0)  # the next launch (or graph replay) starts from zero
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        base = (b * num_slots + slots) * num_splits  # [R]
        if ONE_PASS:  # every split in one block: one round trip of loads, straight-line (a loop here cost 0.2 us)
            m_part, l_part, o = _splits(Work, base, 0, valid, num_splits, ml_offset, HEAD_DIM, BLOCK_D, BLOCK_S)
            m_all = tl.max(m_part, 1)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # no key at all: output 0, not NaN
            w = tl.exp2(m_part - m_all[:, None])
            l_sum = w * l_part
            acc = tl.sum(w[:, :, None] * o, 1)
        else:
            m_max = tl.full([R, BLOCK_S], float("-inf"), tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                s = s0 + offs_s
                sm = valid[:, None] & (s < num_splits)[None, :]
                m_max = tl.maximum(m_max, tl.load(Work + ml_offset + base[:, None] + s[None, :], mask=sm,
                                                  other=float("-inf"), cache_modifier=".cg"))  # fmt: skip
            m_all = tl.max(m_max, 1)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            acc = tl.zeros([R, BLOCK_D], tl.float32)
            l_sum = tl.zeros([R, BLOCK_S], tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                m_part, l_part, o = _splits(Work, base, s0, valid, num_splits, ml_offset, HEAD_DIM, BLOCK_D, BLOCK_S)
                w = tl.exp2(m_part - m_all[:, None])
                l_sum += w * l_part
                acc += tl.sum(w[:, :, None] * o, 1)
        l_all = tl.sum(l_sum, 1)
        out = (acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]).to(Out.dtype.element_ty)
        for g in tl.static_range(G):
            h = tl.load(HeadsOfSlot + slots * G + g, mask=valid, other=-1).to(tl.int64)
            tl.store(Out + b * stride_outb + h[:, None] * stride_outh + offs_d[None, :], out,
                     mask=(h >= 0)[:, None] & dmask[None, :])  # fmt: skip


_COUNTERS: dict[str, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # replaced buffers stay allocated: captured CUDA graphs still point at them


def merge_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters on `device`.

    One buffer per device, not per stream: CUDA graph capture runs on a stream of its own, and a buffer
    first allocated there would bring a memset into every replay. So fused-merge launches on one device
    must not overlap in time (two streams running decode steps at once would share counters).
    """
    buf = _COUNTERS.get(str(device))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _COUNTERS[str(device)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf
