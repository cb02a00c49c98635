"""Span statistics: how much of each query head's attention mass `s` sink tokens plus the last `w` tokens keep.

For a query at position i >= s + w (where the span actually leaves keys out) the kept mass is
    sum_{j < s} P[i, j] + sum_{i - w < j <= i} P[i, j],
read off a running sum of the row. A head whose mean kept mass is near 1 at some (s, w) is a streaming
head: its K and V beyond the span can go (DuoAttention's observation); one that is not is a retrieval head.
Rows are added chunk by chunk, so no T x T map is ever held for more than one layer.
"""

from __future__ import annotations

import torch

SINKS = (0, 4, 16)  # attention-sink counts measured by default
WINDOWS = (64, 128, 256, 512, 1024)  # recent-window lengths measured by default


class SpanMass:
    """Running sums of kept mass per (layer, head, sinks, window) over query rows beyond sinks + window."""

    def __init__(self, num_layers: int, num_heads: int, sinks: tuple[int, ...], windows: tuple[int, ...]) -> None:
        self.sinks, self.windows = sinks, windows
        self.total = torch.zeros(num_layers, num_heads, len(sinks), len(windows), dtype=torch.float64)
        self.rows = torch.zeros(len(sinks), len(windows), dtype=torch.float64)  # rows counted, same for every head

    def add(self, layer: int, probs: torch.Tensor, first_row: int) -> None:
        """probs [H, c, T]: causal probability rows first_row .. first_row + c - 1 of one window."""
        h, c, t = probs.shape
        run = probs.double().cumsum(-1)  # run[:, r, j] = mass on keys 0..j
        pos = torch.arange(first_row, first_row + c, device=probs.device)
        own = run.gather(-1, pos.view(1, c, 1).expand(h, c, 1))[..., 0]  # mass up to the query itself (~1)
        for a, s in enumerate(self.sinks):
            for b, w in enumerate(self.windows):
                keep = pos >= s + w
                if not bool(keep.any()):
                    continue
                p = pos[keep]
                before = run[:, keep].gather(-1, (p - w).view(1, -1, 1).expand(h, -1, 1))[..., 0]
                mass = own[:, keep] - before  # the last w keys
                if s > 0:
                    mass = mass + run[:, keep, s - 1]
                if layer == 0:
                    self.rows[a, b] += int(keep.sum())
                self.total[layer, :, a, b] += mass.sum(-1).cpu()

    def mean(self) -> torch.Tensor:
        """[L, H, S, W] mean kept mass; NaN where no query row lies beyond sinks + window."""
        return self.total / self.rows.where(self.rows > 0, torch.nan)


def smallest_span(mass: torch.Tensor, heads: list[int], sinks: tuple[int, ...], windows: tuple[int, ...],
                  threshold: float, limit: int) -> tuple[int, int] | None:
    """The (sinks, window) of least s + w (below `limit`) at which every head in `heads` keeps at least
    `threshold` of its mass; mass is one layer's [H, S, W]. None when no measured span qualifies."""
    best = None
    for a, s in enumerate(sinks):
        for b, w in enumerate(windows):
            m = mass[heads, a, b]
            if s + w < limit and not bool(m.isnan().any()) and bool((m >= threshold).all()):
                if best is None or s + w < sum(best):
                    best = (s, w)
    return best
