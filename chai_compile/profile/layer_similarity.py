"""Layer-to-layer attention similarity: how well layer j's probabilities stand in for layer l's.

For every pair j <= l and head h (same head index, the one a shared layer would read):
    similarity[l, j, h] = 1 - mean over query rows of TV(P_l[h, i, :], P_j[h, i, :]),
with TV the total variation distance (half the L1 distance; 0 for identical rows, 1 for disjoint ones).
Rows arrive in chunks holding every layer's probabilities for the same query positions, so memory is
L x H x chunk x T, never L x T x T.
"""

from __future__ import annotations

import torch


class LayerSimilarity:
    """Accumulates 1 - TV for every (l, j <= l, head) over the rows it is shown."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.distance = torch.zeros(num_layers, num_layers, num_heads, dtype=torch.float64)
        self.rows = 0

    def add(self, probs: torch.Tensor) -> None:
        """probs [L, H, c, T]: the same c query rows of one window in every layer."""
        n = probs.shape[0]
        for lay in range(1, n):
            # TV of layer `lay` against each earlier layer at once: [lay, H, c] -> summed over rows
            tv = 0.5 * (probs[:lay] - probs[lay : lay + 1]).abs().sum(-1)
            self.distance[lay, :lay] += tv.sum(-1).double().cpu()
        self.rows += probs.shape[2]

    def result(self) -> torch.Tensor:
        """[L, L, H]: 1 - mean TV for j <= l (exactly 1 on the diagonal); NaN above it (a source comes first)."""
        n = self.distance.shape[0]
        sim = 1.0 - self.distance / max(self.rows, 1)
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        return sim.masked_fill(upper[..., None], torch.nan)


def top_pairs(similarity: torch.Tensor, count: int) -> list[dict[str, float | int]]:
    """The `count` (layer, source) pairs with the highest head-mean similarity, source strictly earlier."""
    mean = similarity.mean(-1)
    pairs = [(float(mean[lay, j]), lay, j) for lay in range(mean.shape[0]) for j in range(lay)]
    pairs.sort(reverse=True)
    return [{"layer": lay, "source": j, "similarity": round(s, 6)} for s, lay, j in pairs[:count]]
