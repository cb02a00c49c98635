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
        n, h = probs.shape[:2]
        # one [H, c, T] buffer for every pair: fresh pair-sized temporaries cost more in page faults than in
        # arithmetic on a CPU (4.0 -> 0.9 s a chunk of 64 rows x 4096 keys for SmolLM2's 30 layers)
        diff = torch.empty_like(probs[0])
        l1 = torch.zeros(n, n, h, dtype=torch.float64, device=probs.device)
        for lay in range(1, n):
            for j in range(lay):
                l1[lay, j] = torch.sub(probs[j], probs[lay], out=diff).abs_().sum((-2, -1))
        self.distance += 0.5 * l1.cpu()  # TV summed over the rows
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
