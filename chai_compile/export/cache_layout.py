"""The KV cache an exported decoder takes and returns: tensor names, shapes and order, and their metadata form.

Per layer N, in this order: `past_key_values.N.key` [B, k_heads, past, d] and `.value` [B, v_heads, past, d],
then, in a span layer, one pair per bounded group G: `past_key_values.N.key_span.G` and `.value_span.G`
[B, len(kv_heads), min(past, sinks + window), d]. Outputs are the same names under `present.N.`. A span
layer's `key`/`value` hold only its unbounded KV heads (possibly none: they still carry the past length).

Rows inside a bounded tensor: the portable form keeps them sorted and right-aligned (span_graph.py), the fused
form as a ring (kernels/span_ring.py, kernels/fused_op.py); names, shapes and bytes are the same in both.

`CacheSpec.to_dict` is written into the graph (`chai.cache` metadata) and the manifest; `CacheSpec.from_dict`
is how the runner reads it back: one writer, one reader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

PAST, PRESENT = "past_key_values", "present"


@dataclasses.dataclass(frozen=True)
class BoundedGroup:
    """KV heads of a span layer read only by span heads, stored together: the first `sinks` real tokens and
    the last `window` ones (the union of their query heads' spans, as `rewrite.span.head_groups` groups them)."""

    kv_heads: tuple[int, ...]
    sinks: int
    window: int

    @property
    def capacity(self) -> int:
        return self.sinks + self.window


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Per-layer K/V head counts of the plain cache tensors, the head size, and each layer's bounded groups."""

    k_heads: tuple[int, ...]
    v_heads: tuple[int, ...]
    head_dim: int
    bounded: tuple[tuple[BoundedGroup, ...], ...] = ()  # per layer (empty: no span layer in the graph)

    def __post_init__(self) -> None:
        if not self.bounded:  # one entry per layer from here on, so every reader can index it
            object.__setattr__(self, "bounded", ((),) * len(self.k_heads))

    @property
    def num_layers(self) -> int:
        return len(self.k_heads)

    @property
    def longest_bound(self) -> int:
        """The largest bounded capacity (sinks + window) in the graph; 0 without bounded heads."""
        return max((g.capacity for groups in self.bounded for g in groups), default=0)

    def entries(self, batch: int, past: int) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
        """(name after the `past_key_values.`/`present.` prefix, shape) of every cache tensor, in graph order,
        for `past` tokens seen (a bounded group holds at most its capacity)."""
        d = self.head_dim
        for i, (kh, vh, groups) in enumerate(zip(self.k_heads, self.v_heads, self.bounded, strict=True)):
            yield f"{i}.key", (batch, kh, past, d)
            yield f"{i}.value", (batch, vh, past, d)
            for g, grp in enumerate(groups):
                rows = min(past, grp.capacity)
                yield f"{i}.key_span.{g}", (batch, len(grp.kv_heads), rows, d)
                yield f"{i}.value_span.{g}", (batch, len(grp.kv_heads), rows, d)

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{name}" for name, _ in self.entries(1, 0)]

    def empty(self, batch: int, past: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=dtype) for _, shape in self.entries(batch, past)]

    def split(self, tensors: Sequence[Any]) -> list[tuple[Any, Any, list[tuple[Any, Any]]]]:
        """Flat cache tensors in graph order -> per layer (key, value, [(bounded key, bounded value), ...])."""
        it = iter(tensors)
        return [(next(it), next(it), [(next(it), next(it)) for _ in groups]) for groups in self.bounded]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not any(self.bounded):
            out.pop("bounded")  # graphs without span layers keep the metadata older readers know
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        bounded = tuple(tuple(BoundedGroup(tuple(g["kv_heads"]), int(g["sinks"]), int(g["window"])) for g in groups)
                        for groups in data.get("bounded", ()))
        return cls(tuple(data["k_heads"]), tuple(data["v_heads"]), int(data["head_dim"]), bounded)
