"""Span statistics: how much of each query head's attention mass `s` sink tokens plus the last `w` tokens keep.

For a query at position i beyond s + w (where the span actually leaves keys out) the kept mass is
    sum_{j < s} P[i, j] + sum_{i - w < j <= i} P[i, j],
read off a running sum of the row. A head whose mean kept mass is near 1 at some (s, w) is a streaming
head: its K and V beyond the span can go (DuoAttention's observation); one that is not is a retrieval head.
Rows are added chunk by chunk, so no T x T map is ever held for more than one layer.
"""

from __future__ import annotations

import torch

from chai_compile.choices import SPAN_SINKS as SINKS
from chai_compile.choices import SPAN_WINDOWS as WINDOWS

__all__ = ["SINKS", "WINDOWS", "SpanMass", "smallest_span"]


class SpanMass:
    """Running sums of kept mass per (layer, head, sinks, window).

    Every (s, w) is averaged over the same query rows: those at or beyond the largest s + w that fits the
    window length, so the table is comparable across cells and grows with s and with w by construction
    (rows beyond s + w for each cell alone would mix different positions). Cells with s + w >= seq_len
    cannot leave any key out and stay NaN. `from_row` moves the first row later (recall windows: only the
    repeated rows count)."""

    def __init__(self, num_layers: int, num_heads: int, sinks: tuple[int, ...], windows: tuple[int, ...],
                 seq_len: int, from_row: int = 0) -> None:
        self.sinks, self.windows = sinks, windows
        self.cells = [(a, b, s, w) for a, s in enumerate(sinks) for b, w in enumerate(windows) if s + w < seq_len]
        first = max((s + w for _, _, s, w in self.cells), default=seq_len)  # the common first row
        self.first = max(first, from_row)
        self.total = torch.zeros(num_layers, num_heads, len(sinks), len(windows), dtype=torch.float64)
        self.rows = torch.zeros(num_layers, dtype=torch.float64)
        self._run: torch.Tensor | None = None  # the running sums' buffer, reused (fresh ones page-fault on a CPU)

    def add(self, layer: int, probs: torch.Tensor, first_row: int) -> None:
        """probs [H, c, T]: causal probability rows first_row .. first_row + c - 1 of one window."""
        h, c, _ = probs.shape
        pos = torch.arange(first_row, first_row + c, device=probs.device)
        keep = pos >= self.first
        if not self.cells or not bool(keep.any()):
            return
        pos = pos[keep]
        rows = probs if bool(keep.all()) else probs[:, keep]
        if self._run is None or self._run.shape != rows.shape or self._run.device != rows.device:
            self._run = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
        run = torch.cumsum(rows, -1, dtype=torch.float64, out=self._run)  # run[:, r, j] = mass on keys 0..j
        own = run.gather(-1, pos.view(1, -1, 1).expand(h, -1, 1))[..., 0]  # mass up to the query itself (~1)
        for a, b, s, w in self.cells:
            mass = own - run.gather(-1, (pos - w).view(1, -1, 1).expand(h, -1, 1))[..., 0]  # the last w keys
            if s > 0:
                mass = mass + run[:, :, s - 1]
            self.total[layer, :, a, b] += mass.sum(-1).cpu()
        self.rows[layer] += pos.numel()

    def mean(self) -> torch.Tensor:
        """[L, H, S, W] mean kept mass; NaN where s + w does not fit the window."""
        out = torch.full_like(self.total, torch.nan)
        rows = self.rows.clamp_min(1).view(-1, 1)
        for a, b, _, _ in self.cells:
            out[:, :, a, b] = self.total[:, :, a, b] / rows
        return out


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
