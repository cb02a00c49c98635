"""Dynamic (per-request) membership, the CHAI paper's online mode, computed in torch on the model's device.

Per sequence: the attention map of every head over the first 5 real tokens (5 x 5, causal),
cosine distance between heads, average-linkage agglomerative clustering into the layer's cluster
count, lowest head index as representative. Batched over sequences with no host sync, so it can
run inside every prefill (the reference implementation calls scikit-learn on the CPU there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from chai_compile.adapters import AttentionCall

PREFIX_TOKENS = 5


def average_linkage(features: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Average-linkage agglomerative clustering under cosine distance, batched.

    features [B, H, F] -> labels [B, H]: each head's cluster named by its lowest head index (the
    representative). Merges the closest pair H - num_clusters times, updating distances by the
    Lance-Williams rule for average linkage (size-weighted mean), as scipy/sklearn do.
    """
    b, h, _ = features.shape
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    inf = torch.tensor(float("inf"), device=x.device)
    dist = (1.0 - x @ x.transpose(1, 2)).clamp_min(0.0)
    dist = dist.masked_fill(torch.eye(h, dtype=torch.bool, device=x.device), inf)
    size = torch.ones(b, h, device=x.device)
    labels = torch.arange(h, device=x.device).expand(b, h).clone()
    rows = torch.arange(b, device=x.device)
    for _ in range(h - num_clusters):
        flat = dist.view(b, -1).argmin(-1)
        i, j = flat // h, flat % h
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)  # keep the lower index: it stays the cluster's name
        n_lo, n_hi = size[rows, lo], size[rows, hi]
        merged = (n_lo[:, None] * dist[rows, lo] + n_hi[:, None] * dist[rows, hi]) / (n_lo + n_hi)[:, None]
        merged[rows, lo] = inf
        merged[rows, hi] = inf
        dist[rows, lo] = merged
        dist[rows, :, lo] = merged
        dist[rows, hi] = inf  # hi is no longer a cluster
        dist[rows, :, hi] = inf
        size[rows, lo] = n_lo + n_hi
        labels = torch.where(labels == hi[:, None], lo[:, None], labels)
    return labels


def clusters_from_labels(labels: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, H] (cluster named by its lowest head) -> representatives [B, C] ascending, cluster of head [B, H]."""
    h = labels.shape[1]
    is_rep = labels == torch.arange(h, device=labels.device)
    # Stable sort puts representatives first, in head order, without a data-dependent shape.
    reps = torch.argsort((~is_rep).to(torch.int8), dim=1, stable=True)[:, :num_clusters]
    rank = is_rep.long().cumsum(1) - 1  # representative head -> its cluster number
    return reps, rank.gather(1, labels)


def _valid_keys(mask: torch.Tensor | None, b: int, s: int, device: torch.device) -> torch.Tensor:
    """[B, S] bool: positions that are real tokens (not left padding), read from the decoder's mask."""
    if mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=device)
    if mask.dim() == 2:
        return mask[:, -s:].bool().expand(b, s)
    m = mask[..., -s:] if mask.dtype == torch.bool else mask[..., -s:] > torch.finfo(mask.dtype).min / 2
    return m.any(dim=2)[:, 0].expand(b, s)  # a key is real when any query may attend it


def membership_from_prefix(
    call: AttentionCall,
    queries_keys: Callable[[torch.Tensor, AttentionCall], tuple[torch.Tensor, torch.Tensor]],
    group: int,
    num_clusters: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representatives [B, C] and cluster of head [B, H] from the first PREFIX_TOKENS real tokens of the prompt.

    `queries_keys(x_window, call_window)` gives positioned q [B, H, W, d] and k [B, KV, W, d] for the
    window's hidden states; positions (RoPE) are gathered to the window so they match the prompt.
    """
    x = call.hidden_states
    b, s, hidden = x.shape
    valid = _valid_keys(call.attention_mask, b, s, x.device)
    start = valid.int().argmax(dim=1)  # first real token (left padding before it)
    idx = start[:, None] + torch.arange(PREFIX_TOKENS, device=x.device)
    in_window = idx < s  # prompts shorter than the window use what they have
    idx = idx.clamp(max=s - 1)
    xw = x.gather(1, idx[..., None].expand(-1, -1, hidden))
    sub = call
    if call.position_embeddings is not None:
        cos, sin = (t.expand(b, *t.shape[1:]).gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
                    for t in call.position_embeddings)
        sub = dataclasses.replace(call, hidden_states=xw, position_embeddings=(cos, sin))
    q, k = queries_keys(xw, sub)
    k = k.repeat_interleave(group, dim=1)
    scores = (q.float() * scale) @ k.float().transpose(-1, -2)  # [B, H, W, W]
    w = PREFIX_TOKENS
    keep = torch.ones(w, w, dtype=torch.bool, device=x.device).tril() & in_window[:, None, None, :]
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    probs = torch.nan_to_num(probs) * in_window[:, None, :, None]  # rows past a short prompt: zero
    labels = average_linkage(probs.flatten(2), num_clusters)
    return clusters_from_labels(labels, num_clusters)
