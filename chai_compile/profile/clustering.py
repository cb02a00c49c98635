"""Head clustering: cosine distance, average-linkage or k-means, automatic counts, representatives.

All functions are deterministic for a given seed. k-means runs on the exact Euclidean embedding of
the unit-normalised head features, recovered from their cosine Gram matrix (classical MDS), so it
clusters the same points it would on the raw features without storing them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans

from chai_compile.choices import METHODS, REPRESENTATIVES  # noqa: F401  (re-exported)
from chai_compile.errors import ClusteringError


def cosine_distance(similarity: np.ndarray) -> np.ndarray:
    d = 1.0 - np.asarray(similarity, dtype=np.float64)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def embed(similarity: np.ndarray) -> np.ndarray:
    """Points whose pairwise Euclidean distances equal those of the unit-normalised features."""
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    j = np.eye(n) - np.full((n, n), 1.0 / n)
    vals, vecs = np.linalg.eigh(j @ s @ j)
    vals = np.clip(vals, 0.0, None)
    x = vecs * np.sqrt(vals)
    # Fix eigenvector signs so the embedding (and k-means on it) is reproducible bit for bit.
    signs = np.sign(x[np.argmax(np.abs(x), axis=0), np.arange(n)])
    signs[signs == 0] = 1.0
    return x * signs


def kmeans_labels(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float]:
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    return km.labels_, float(km.inertia_)


def sse_curve(similarity: np.ndarray, seed: int) -> list[float]:
    """k-means error for k = 1..H (the curve the paper reads an elbow from)."""
    x = embed(similarity)
    return [kmeans_labels(x, k, seed)[1] for k in range(1, x.shape[0] + 1)]


def knee(sse: Sequence[float]) -> int:
    """Kneedle on a decreasing error curve: the k farthest below the chord from k=1 to k=H."""
    y = np.asarray(sse, dtype=np.float64)
    n = len(y)
    if n <= 2 or y[0] <= 1e-12:
        return 1
    x = np.linspace(0.0, 1.0, n)
    yn = (y - y.min()) / (y.max() - y.min())
    gap = (1.0 - x) - yn  # chord minus curve
    return int(np.argmax(gap)) + 1


def cluster_heads(similarity: np.ndarray, k: int, method: str, seed: int) -> list[list[int]]:
    n = similarity.shape[0]
    if not 1 <= k <= n:
        raise ClusteringError(f"cluster count must be between 1 and the number of heads ({n})", value=k,
                              fix=f"pass --clusters between 1 and {n}")
    if k == n:
        return [[h] for h in range(n)]
    if k == 1:
        return [list(range(n))]
    if method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(
            cosine_distance(similarity))
    elif method == "kmeans":
        labels = kmeans_labels(embed(similarity), k, seed)[0]
    else:
        raise ClusteringError(f"unknown clustering method; choose one of {', '.join(METHODS)}", value=method)
    groups: dict[int, list[int]] = {}
    for h, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(h)
    return sorted(groups.values(), key=lambda m: m[0])


@dataclass(frozen=True)
class RepresentativeChoice:
    representatives: list[int]
    cost: float  # sum over clusters of the representative's total distance to its members


def choose_representatives(
    clusters: list[list[int]], distance: np.ndarray, rule: str, group_size: int
) -> list[int]:
    """Pick one head per cluster whose scores the whole cluster shares.

    medoid: least total cosine distance to its cluster (the default for MHA);
    lowest: the lowest head index (the reference implementation's rule);
    kv-min: fewest distinct KV heads over all representatives, medoids among the minimal choices
            (GQA: a K head can only be dropped when no representative reads it);
    auto:   kv-min for GQA models, medoid otherwise.
    """
    if rule == "auto":
        rule = "kv-min" if group_size > 1 else "medoid"
    cost = {h: float(distance[h, m].sum()) for m in clusters for h in m}
    medoids = [min(m, key=lambda h: (cost[h], h)) for m in clusters]
    if rule == "medoid":
        return medoids
    if rule == "lowest":
        return [m[0] for m in clusters]
    if rule != "kv-min":
        raise ClusteringError(f"unknown representative rule; choose one of {', '.join(REPRESENTATIVES)}",
                              value=rule)
    if group_size == 1:
        return medoids
    groups_of = [sorted({h // group_size for h in m}) for m in clusters]
    all_groups = sorted({g for gs in groups_of for g in gs})
    best: tuple[float, list[int]] | None = None
    # Exact search over KV-head subsets by size; KV counts are small (<= 16 in practice).
    limit = len(all_groups) if len(all_groups) <= 16 else 0
    for size in range(1, limit + 1):
        for subset in itertools.combinations(all_groups, size):
            allowed = set(subset)
            if not all(allowed & set(gs) for gs in groups_of):
                continue
            reps = [min((h for h in m if h // group_size in allowed), key=lambda h: (cost[h], h))
                    for m in clusters]
            total = sum(cost[r] for r in reps)
            if best is None or total < best[0]:
                best = (total, reps)
        if best is not None:
            return best[1]
    # Many KV heads: greedy set cover.
    remaining = set(range(len(clusters)))
    reps = list(medoids)
    while remaining:
        g = max(all_groups, key=lambda g: (sum(g in groups_of[c] for c in remaining), -g))
        for c in [c for c in remaining if g in groups_of[c]]:
            reps[c] = min((h for h in clusters[c] if h // group_size == g), key=lambda h: (cost[h], h))
            remaining.discard(c)
    return reps


@dataclass(frozen=True)
class KVDrop:
    """Best way to drop `len(dropped)` K heads of one layer, and what it costs."""

    dropped: tuple[int, ...]  # KV heads whose K is no longer stored
    clusters: list[list[int]]
    representatives: list[int]
    cost: float  # sum over re-homed query heads of their cosine distance to the head they now share


def kv_drop_options(similarity: np.ndarray, group_size: int) -> list[KVDrop]:
    """For k = 0..KV-1 dropped K heads, the cheapest choice (exact search over KV subsets).

    Query heads of a dropped KV head join the cluster of their most similar head among the kept
    KV heads' query heads, which stay representatives. Fewer clusters than `cluster_heads` would
    make, but every merge here frees K-cache bytes, which is what a GQA model needs.
    """
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    n_kv = n // group_size
    heads_of = [list(range(g * group_size, (g + 1) * group_size)) for g in range(n_kv)]
    out = []
    for k in range(n_kv):
        best: KVDrop | None = None
        for dropped in itertools.combinations(range(n_kv), k):
            kept_heads = [h for g in range(n_kv) if g not in dropped for h in heads_of[g]]
            home = {h: [h] for h in kept_heads}
            cost = 0.0
            for g in dropped:
                for h in heads_of[g]:
                    r = max(kept_heads, key=lambda c, h=h: (s[h, c], -c))
                    home[r].append(h)
                    cost += 1.0 - s[h, r]
            if best is None or cost < best.cost - 1e-12:
                clusters = sorted((sorted(m) for m in home.values()), key=lambda m: m[0])
                reps = [next(r for r in home if sorted(home[r]) == m) for m in clusters]
                best = KVDrop(tuple(dropped), clusters, reps, cost)
        out.append(best)
    return out


def allocate_kv_budget(options: list[list[KVDrop]], heads_to_drop: int, frozen: set[int]) -> list[int]:
    """K heads to drop per layer: greedily take the cheapest next drop anywhere until the budget is met."""
    taken = [0] * len(options)
    for _ in range(heads_to_drop):
        best = None
        for i, opts in enumerate(options):
            if i in frozen or taken[i] + 1 >= len(opts):
                continue
            marginal = opts[taken[i] + 1].cost - opts[taken[i]].cost
            if best is None or marginal < best[0]:
                best = (marginal, i)
        if best is None:
            break
        taken[best[1]] += 1
    return taken
