"""What the span layers of one forward share: the chunk's real token indices, each sequence's real count after
it, and the small tables derived from them (ring rows per storage rule, the kernel's row ranges per head
class, the padding check of the full caches).

Every span layer sees the same tokens and the same mask, so the first one builds these and the others reuse
them. Eager decode is bound by kernel launches on the host: rebuilding these per layer cost ~40 small launches
per span layer and step. The step is kept on the transformers cache (one per generation) and recognised by
the forward's rotary tables, which the decoder computes once and hands to every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chai_compile.adapters import AttentionCall
from chai_compile.rewrite.dynamic import _valid_keys

_ATTR = "_chai_span_step"


@dataclass
class SpanStep:
    """One forward's shared span tables. `memo` holds derived tables by key (see `table`)."""

    key: tuple[Any, ...]  # (rotary cos, id of the mask, past, chunk length, batch): the forward it belongs to
    index: torch.Tensor  # [B, S] real index of each chunk token (-1: padding)
    real_after: torch.Tensor  # [B] real tokens per sequence once the chunk is in
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def table(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The table under `key`, made on first use in this forward."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def span_step(call: AttentionCall, cache: Any, real: torch.Tensor, past: int) -> SpanStep:
    """This forward's SpanStep: the one an earlier span layer built, or a new one from `real` [B] (the real
    tokens seen before the chunk) and the decoder's mask."""
    b, s, _ = call.hidden_states.shape
    cos = call.position_embeddings[0] if call.position_embeddings is not None else None
    mask = call.attention_mask
    prev = getattr(cache, _ATTR, None) if cache is not None else None
    if prev is not None and cos is not None and prev.key[0] is cos and prev.key[1:] == (id(mask), past, s, b):
        return prev
    seen = None if mask is None else mask[..., : past + s]  # columns of keys seen so far; the chunk's are last
    valid = _valid_keys(seen, b, s, call.hidden_states.device)
    index = torch.where(valid, real[:, None] + valid.long().cumsum(1) - 1, -1)
    step = SpanStep((cos, id(mask), past, s, b), index, real + valid.long().sum(1))
    if cache is not None and cos is not None:
        # Holding cos (small) tells this forward from any later one. The mask is told by its id alone: the
        # decoder holds it while its layers run, and a prefill's 4D mask can take gigabytes.
        setattr(cache, _ATTR, step)
    return step
