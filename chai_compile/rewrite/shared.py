"""Shared layers: a layer that reuses an earlier layer's attention probabilities with its own V.

    out_h = P^{source}_h v_{h // g}            # per query head, the source's probabilities
    y     = concat_h(out_h) W_o

A shared layer has no Q or K projection and stores no K: its cache entry holds V only (K with zero
heads, so transformers' DynamicLayer keeps counting the sequence length). The source's module computes
its probabilities anyway; it hands them to the shared layers of the same forward through a
`ProbabilityStore` that the rewrite gives both modules (one per rewritten model, no global state).
Under decode the source's probabilities for the new tokens already cover the whole past (its cache is
full length), and so does the shared layer's V cache; padding is masked in the source's probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.choices import Membership
from chai_compile.rewrite.base import ClusteredAttention, RewriteError


class ProbabilityStore:
    """Per-forward hand-over of attention probabilities [B, H, S, T] from source layers to shared layers.

    A source's entry is dropped once its last reader has taken it, so no forward keeps another's."""

    def __init__(self, readers: dict[int, int]) -> None:
        self.readers = dict(readers)  # source layer -> how many shared layers read it
        self._held: dict[int, tuple[torch.Tensor, int]] = {}

    def sources(self) -> Iterable[int]:
        return self.readers.keys()

    def put(self, source: int, probs: torch.Tensor) -> None:
        self._held[source] = (probs, self.readers[source])

    def take(self, source: int, reader: int) -> torch.Tensor:
        if source not in self._held:
            raise RewriteError(f"layer {reader}: source layer {source} handed no attention probabilities in this "
                               "forward", fix="run the whole rewritten model; do not call a shared layer alone")
        probs, left = self._held[source]
        if left <= 1:
            del self._held[source]
        else:
            self._held[source] = (probs, left - 1)
        return probs


class SharedAttention(ClusteredAttention):
    """A layer of kind SHARED: V and O projections only."""

    membership = Membership.STATIC  # fixed by the plan

    def __init__(self, adapter: ModelAdapter, layer_index: int, source: int, store: ProbabilityStore) -> None:
        super().__init__(adapter, layer_index, 0, 0)
        self.source = source
        self.store = store

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, shared from layer {self.source}, heads={self.num_heads}, k_heads=0"

    def attend(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        x = call.hidden_states
        b, s, _ = x.shape
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        k = v.new_empty(b, 0, s, self.head_dim)  # no K heads: zero bytes, and the cache still counts tokens
        _, v = self.update_cache(cache, k, v)
        probs = self.store.take(self.source, self.layer_idx).to(v.device)
        if probs.shape != (b, self.num_heads, s, v.shape[-2]):
            raise RewriteError(f"layer {self.layer_idx}: source layer {self.source}'s probabilities have shape "
                               f"{list(probs.shape)}, expected {[b, self.num_heads, s, v.shape[-2]]}",
                               fix="prefill and decode through the rewritten model with one cache")
        probs = probs.to(v.dtype)
        if torch.compiler.is_compiling():
            # torch.export: P as [B, KV, g, S, T] against V [B, KV, 1, T, d]; a view of P to [B, KV, g*S, T]
            # adds symbolic-shape guards that make torch.export reject a dynamic length (as in static.py).
            out = torch.matmul(probs.unflatten(1, (self.num_kv_heads, self.group)), v.unsqueeze(2))
            return out.flatten(1, 2)
        # Eager: a GQA group's rows of P as one matrix against its V head as stored. The broadcast form above
        # has matmul copy V once per query head of the group (4.9x slower at g = 4, T = 8192, one CPU core).
        out = torch.matmul(probs.reshape(b, self.num_kv_heads, self.group * s, -1), v)
        return out.view(b, self.num_kv_heads, self.group, s, self.head_dim).flatten(1, 2)
