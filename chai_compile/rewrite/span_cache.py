"""The cache of a span layer: full KV heads grow with the context, bounded KV heads keep sinks plus a ring.

A KV head is bounded when every query head reading it has a span; it then keeps the union of their
spans: the first max(sinks) real tokens and the last max(window) real tokens (a ring written in place),
so its K and V stop growing once the sequence passes sinks + window tokens.

Positions are counted in real tokens of each sequence: left padding (masked out by the decoder's mask)
is never stored in a bounded head, sinks are a sequence's first real tokens, and the window ends at its
current token. Full heads store every slot, padding included, as transformers' DynamicLayer does, with
the real index of each slot (-1 for padding) beside it.

The layer implements transformers' cache-layer interface so that the decoder (mask sizes, sequence
length) and generate() (batch selection, beam reordering) treat it like any other layer; only the
rewritten span module stores into it, through `store`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from chai_compile.kernels import span_ring
from chai_compile.rewrite.base import RewriteError
from chai_compile.rewrite.span_step import SpanStep


@dataclass(frozen=True)
class HeadGroup:
    """KV heads of one span layer that share a storage rule: bounded (sinks + window) or full (None)."""

    kv_heads: tuple[int, ...]
    sinks: int = 0
    window: int | None = None  # None: full cache

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.sinks + self.window


class SpanCacheLayer(CacheLayerMixin):
    """One span layer's cache: per head group K [B, n, L, d], V [B, n, L, d] and real indices [B, L]."""

    is_sliding = False  # the decoder builds the full-length mask; the module maps it onto what is stored
    is_croppable = False  # a ring cannot give back the tokens it overwrote

    def __init__(self, groups: tuple[HeadGroup, ...]) -> None:
        super().__init__()
        self.groups = groups
        self.seen = 0  # slots (padding included) this layer has taken: the decoder's sequence length
        self.real: torch.Tensor | None = None  # [B] real tokens seen per sequence
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per group (k, v, index)
        # Per bounded group whose ring is full: the buffers its entry views (capacity rows, then one scratch row
        # for the tokens that do not survive), written in place from then on instead of copied every step.
        self.rings: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        self.device = key_states.device
        self.real = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.rings = {}
        self.entries = [(key_states.new_zeros(b, len(g.kv_heads), 0, d),
                         value_states.new_zeros(b, len(g.kv_heads), 0, d),
                         torch.zeros(b, 0, dtype=torch.int64, device=self.device)) for g in self.groups]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a span layer's cache is written by its rewritten attention module (store)")

    def past(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.entries[group]

    def store(self, group: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, real_after: torch.Tensor,
              slots: int, step: SpanStep | None = None) -> None:
        """Add a chunk's k, v [B, n, S, d] with real indices [B, S] (-1: padding) to group `group`.

        `real_after` [B]: real tokens per sequence once the chunk is in; `slots`: the chunk's length. `step`:
        the forward's shared tables (span_step.py), where the ring rows of a storage rule are kept for the
        other span layers of the same forward."""
        g = self.groups[group]
        old_k, old_v, old_i = self.entries[group]
        if g.capacity is None:
            self.entries[group] = (torch.cat([old_k, k], -2), torch.cat([old_v, v], -2), torch.cat([old_i, index], -1))
            return
        length = min(self.seen + slots, g.capacity)  # what the plan predicts: min(tokens, sinks + window)
        b, n, _, d = old_k.shape
        if group in self.rings:  # full ring: rows are overwritten where they are
            buf_k, buf_v, buf_i = self.rings[group]
        else:
            grow = length - old_k.shape[-2] + 1  # + 1: a scratch entry that takes the tokens that do not survive
            buf_k = torch.cat([old_k, old_k.new_zeros(b, n, grow, d)], -2)
            buf_v = torch.cat([old_v, old_v.new_zeros(b, n, grow, d)], -2)
            buf_i = torch.cat([old_i, old_i.new_full((b, grow), -1)], -1)
            if length == g.capacity:
                self.rings[group] = (buf_k, buf_v, buf_i)
        # The ring's row of each survivor (kernels/span_ring.py); the others go to the scratch entry.
        def rows() -> torch.Tensor:
            keep = span_ring.survives(index, real_after, g.sinks, g.window)
            return torch.where(keep, span_ring.slot(index, g.sinks, g.window), length)

        target = rows() if step is None else step.table(("ring", g.sinks, g.window, length), rows)
        at = target[:, None, :, None].expand(b, n, target.shape[1], d)
        buf_k.scatter_(2, at, k)
        buf_v.scatter_(2, at, v)
        buf_i.scatter_(1, target, index)
        self.entries[group] = (buf_k[:, :, :length], buf_v[:, :, :length], buf_i[:, :length])

    def advance(self, real_after: torch.Tensor, slots: int) -> None:
        self.real = real_after
        self.seen += slots

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise RewriteError("a span layer's cache cannot be cropped: its ring has overwritten what it dropped",
                           value=tokens_to_remove, fix="generate without assisted decoding (no assistant_model)")

    def reset(self) -> None:
        self.entries, self.real, self.seen, self.is_initialized = [], None, 0, False
        self.rings = {}

    def _select(self, pick: torch.Tensor) -> None:
        """Rows `pick` of every batch-indexed tensor (generate's batch selection and beam reordering)."""
        if not self.is_initialized:
            return
        self.entries = [tuple(t.index_select(0, pick.to(t.device)) for t in e) for e in self.entries]  # type: ignore[misc]
        self.real = self.real.index_select(0, pick.to(self.real.device))
        self.rings = {}  # the entries are new tensors: the next store rebuilds a ring buffer from them

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.real.shape[0], device=self.real.device).repeat_interleave(repeats))

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def _move(self, device: torch.device | str) -> None:
        if self.is_initialized:
            self.entries = [tuple(t.to(device, non_blocking=True) for t in e) for e in self.entries]  # type: ignore[misc]
            self.real = self.real.to(device, non_blocking=True)
            self.rings = {}
