"""A span layer's decode step on the Triton decode kernel (kernels/triton_decode.py), over its cache as stored.

The kernel attends, per sequence b, the rows t < lengths[b] of a K/V cache that satisfy t < sinks or
start[b] <= t < end[b] (sinks one number per launch). Each query head is its own cluster reading its own
KV head (GQA: the group's heads share it), so the heads of one head group that share a span form one
launch (`SpanClass`). The rows a head may read, once the current token is stored (n = the sequence's real
tokens, the current one included, query index n - 1):

* bounded group (S sinks, W window, capacity S + W): while n <= S + W, row r holds real token r (rows
  n.. not filled yet), so a head (s, w) reads rows [0, s) and [n - w, n): sinks s, span (max(n - w, 0), n).
  Past that the ring holds the last W tokens in rotated order: a head with the group's whole window
  reads every ring row, span (S, S + W). A head with a narrower window reads ring rows that may wrap
  around the ring's end: two row ranges, which one launch cannot express, so it runs on torch once any
  sequence may have passed S + W tokens (the layer's slot count, known on the host, says when).
* full group (every slot, T rows, padding included): with left padding, row t holds real token
  t - (T - n), so a full head reads rows [T - n, T) and a head (0, w) rows [T - min(w, n), T). A head
  with sinks s > 0 reads rows [T - n, T - n + s) as its sinks, which are the kernel's rows [0, s) only
  when no sequence has padding; a padding slot after a real one (a mask with holes) breaks the row
  arithmetic altogether. Both take torch (what the slots hold is checked on the host when a mask is given).

A sequence whose current token is padding gets lengths 0: zeros, the kernels' masked-row rule (the torch
path writes the mean of V there); nothing reads that row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chai_compile.mapping import Span
from chai_compile.rewrite.span_cache import HeadGroup, SpanCacheLayer
from chai_compile.rewrite.span_step import SpanStep
from chai_compile.rewrite.static import _kernels


@dataclass(frozen=True)
class SpanClass:
    """Query heads of one head group that share one span: one kernel launch, each head its own cluster."""

    group: int  # index into the layer's head groups
    sinks: int
    window: int | None  # None: full attention
    heads: torch.Tensor  # [C] int64: the query heads, in layer order
    offsets: torch.Tensor  # [C + 1] int32: cluster c is head c
    kv: torch.Tensor  # [C] int32: each head's KV head within the group (its K and its V head)
    at: slice | None  # the heads as a slice when they are consecutive (read and written as views), else None


def span_classes(spans: tuple[Span | None, ...], groups: tuple[HeadGroup, ...], group_size: int,
                 device: torch.device) -> tuple[SpanClass, ...]:
    """The launches of a span layer's decode step, with their int32 tables (built once per device)."""
    out = []
    for i, grp in enumerate(groups):
        by_span: dict[Span | None, list[int]] = {}
        for kv in grp.kv_heads:
            for h in range(kv * group_size, (kv + 1) * group_size):
                by_span.setdefault(spans[h], []).append(h)
        for sp, heads in by_span.items():
            local = [grp.kv_heads.index(h // group_size) for h in heads]
            out.append(SpanClass(
                i, 0 if sp is None else sp.sinks, None if sp is None else sp.window,
                torch.tensor(heads, device=device),
                torch.arange(len(heads) + 1, dtype=torch.int32, device=device),
                torch.tensor(local, dtype=torch.int32, device=device),
                consecutive(heads)))
    return tuple(out)


def consecutive(ids: list[int] | tuple[int, ...]) -> slice | None:
    """ids as a slice when they are consecutive and ascending (a view instead of a gather), else None."""
    return slice(ids[0], ids[0] + len(ids)) if list(ids) == list(range(ids[0], ids[0] + len(ids))) else None


def span_decode(q: torch.Tensor, layer: SpanCacheLayer, classes: tuple[SpanClass, ...], step: SpanStep,
                scale: float, padded: bool) -> torch.Tensor:
    """One decode step: q [B, H, d] over `layer` with the current token stored -> [B, H, d].

    step: the forward's shared tables (span_step.py): the current token's real index [B, 1] (-1: padding) and
    the real tokens seen per sequence (the current one included); the row ranges below depend only on those
    and the storage rule, so the span layers of one forward build them once. padded: the decoder handed a
    mask, so slots may be padding: the full groups' slots are then checked on the host (one sync per step;
    eager attention always hands a mask). Without a mask the decoder saw no padding, and every full-group
    slot is a real token."""
    kernels = _kernels()
    b, h, d = q.shape
    out = q.new_empty(b, h, d)
    query_index, real = step.index[:, 0], step.real_after
    for cls in classes:
        grp = layer.groups[cls.group]
        keys, values, index = layer.past(cls.group)
        rows = keys.shape[-2]
        if grp.capacity is None:
            full_rows = step.table(("full rows", rows), lambda index=index: _full_rows(index, real)) if padded \
                else (True, True)
            on_kernel = full_rows[0] and (cls.sinks == 0 or full_rows[1])
        else:
            # layer.seen bounds every sequence's n: below the capacity no ring has wrapped yet.
            on_kernel = cls.window == grp.window or layer.seen <= grp.capacity
        if on_kernel:
            lengths, span = step.table(("rows", grp.capacity, grp.sinks, rows, cls.window),
                                       lambda grp=grp, cls=cls, rows=rows: _row_ranges(grp, cls, rows, step))
            if cls.at is not None:  # consecutive heads: the kernel reads q and writes out in place
                kernels.clustered_decode(q[:, cls.at], keys, values, lengths, cls.offsets, cls.kv, cls.kv, scale,
                                         span=span, sinks=cls.sinks, out=out[:, cls.at])
                continue
            o = kernels.clustered_decode(q.index_select(1, cls.heads), keys, values, lengths, cls.offsets, cls.kv,
                                         cls.kv, scale, span=span, sinks=cls.sinks)
        else:
            o = _torch_heads(q.index_select(1, cls.heads), keys, values, index, cls, query_index, scale)
        out.index_copy_(1, cls.heads, o)
    return out


def _row_ranges(grp: HeadGroup, cls: SpanClass, rows: int, step: SpanStep) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths int32 [B], span int32 [B, 2]): the kernel's rows for a class of `grp` (module docstring)."""
    real = step.real_after
    window = cls.window if cls.window is not None else rows
    if grp.capacity is None:
        end = torch.full_like(real, rows)
        start = rows - real.clamp(max=window)
    else:
        end = real.clamp(max=grp.capacity)
        start = torch.where(real > grp.capacity, grp.sinks, (real - window).clamp(min=0))
    lengths = torch.where(step.index[:, 0] >= 0, end, 0).to(torch.int32)
    return lengths, torch.stack([start, end], 1).to(torch.int32)


def _full_rows(index: torch.Tensor, real: torch.Tensor) -> tuple[bool, bool]:
    """(every sequence's padding slots precede its real ones, no sequence has padding) of a full group.

    Left padded iff real token 0 sits at slot T - n (the T - n padding slots are then all before it)."""
    rows = index.shape[-1]
    first = index.gather(1, (rows - real).clamp(max=rows - 1)[:, None])[:, 0]
    left = (first == 0) | (real == 0)
    flags = torch.stack([left.all(), (real == rows).all()]).tolist()  # the host sync
    return bool(flags[0]), bool(flags[1])


def _torch_heads(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, cls: SpanClass,
                 query_index: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch path's math for one class over the stored cache: q [B, C, d] -> [B, C, d]."""
    kv = cls.kv.long()
    scores = torch.matmul(q.unsqueeze(2), keys.index_select(1, kv).transpose(-1, -2)).float() * scale  # [B, C, 1, E]
    i = query_index[:, None, None, None]
    j = index[:, None, None, :]
    allowed = (j >= 0) & (j <= i)
    if cls.window is not None:
        allowed &= (j < cls.sinks) | (j > i - cls.window)
    probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1).to(values.dtype)
    return torch.matmul(probs, values.index_select(1, kv))[:, :, 0]
