"""Dynamic (per-request) membership, the CHAI paper's online mode, computed in torch on the model's device.

`DynamicClusteredAttention` decides clusters per request from the first 5 tokens, with the plan's
cluster count per layer. It needs every K head in the cache (membership is unknown ahead of time), so
it saves score compute and Q projection, not memory.

Per sequence: the attention map of every head over the first 5 real tokens (5 x 5, causal),
cosine distance between heads, average-linkage agglomerative clustering into the layer's cluster
count, lowest head index as representative. Batched over sequences with no host sync, so it can
run inside every prefill (the reference implementation calls scikit-learn on the CPU there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.choices import Membership
from chai_compile.rewrite.base import ClusteredAttention, RewriteError, masked_softmax, owned_linear

PREFIX_TOKENS = 5
# Attribute set on a transformers cache object to carry per-request dynamic membership per layer.
DYNAMIC_STATE_ATTR = "_chai_dynamic_membership"


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


class DynamicClusteredAttention(ClusteredAttention):
    membership = Membership.DYNAMIC

    def __init__(self, adapter: ModelAdapter, layer_index: int, num_clusters: int) -> None:
        super().__init__(adapter, layer_index, num_clusters, adapter.spec.num_kv_heads)
        # Representatives vary per request: keep every Q row (gathered per request) and every K head.
        p = adapter.projections(layer_index)
        self.q_weight = nn.Parameter(p.q_weight.detach().clone())
        self.q_bias = None if p.q_bias is None else nn.Parameter(p.q_bias.detach().clone())
        self.k_proj = owned_linear(p.k_weight, p.k_bias)

    def attend(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        x = call.hidden_states
        b, s, _ = x.shape
        h, c, d = self.num_heads, self.num_clusters, self.head_dim
        k = self.heads(self.k_proj(x), self.num_kv_heads)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        store = None if cache is None else cache.__dict__.setdefault(DYNAMIC_STATE_ATTR, {})
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        state = None if store is None or past == 0 else store.get(self.layer_idx)
        if state is None:
            if past:
                raise RewriteError(
                    f"layer {self.layer_idx}: dynamic membership is decided at prefill, but this cache holds "
                    f"{past} tokens from elsewhere", fix="prefill through the rewritten model")
            state = self._decide_membership(call)
            if store is not None:
                store[self.layer_idx] = state
        reps, cluster_of_head, w_sel, b_sel = state
        if reps.shape[0] != b:
            raise RewriteError(f"layer {self.layer_idx}: batch size changed from {reps.shape[0]} to {b} within a "
                               "request (beam search is not supported with dynamic membership)")
        q = torch.bmm(x, w_sel.transpose(1, 2))
        if b_sel is not None:
            q = q + b_sel[:, None, :]
        q = self.heads(q, c)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k = self.adapter.position(q, k, call)
        k, v = self.update_cache(cache, k, v)
        t = k.shape[-2]
        k_rep = k.gather(1, (reps // self.group)[:, :, None, None].expand(b, c, t, d))
        scores = torch.matmul(q * self.scale, k_rep.transpose(-1, -2))
        probs = masked_softmax(scores.float(), call.attention_mask).to(v.dtype)
        probs = probs.gather(1, cluster_of_head[:, :, None, None].expand(b, h, s, t))
        self.hand_over(probs)
        out = torch.matmul(probs.reshape(b, self.num_kv_heads, self.group * s, t), v)
        return out.view(b, h, s, d)

    def _decide_membership(self, call: AttentionCall) -> tuple[torch.Tensor, ...]:
        """Clusters per sequence from its first 5 real tokens; the request's Q weights for its representatives."""
        h, d = self.num_heads, self.head_dim

        def queries_keys(xw: torch.Tensor, sub: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
            q = self.heads(nn.functional.linear(xw, self.q_weight, self.q_bias), h) * self.q_scale
            k = self.heads(self.k_proj(xw), self.num_kv_heads)
            return self.adapter.position(q, k, sub)

        reps, cluster_of_head = membership_from_prefix(call, queries_keys, self.group, self.num_clusters, self.scale)
        w = self.q_weight.view(h, d, -1)[reps]  # [B, C, d, hidden]
        w_sel = w.reshape(w.shape[0], -1, w.shape[-1])
        b_sel = None if self.q_bias is None else self.q_bias.view(h, d)[reps].reshape(w.shape[0], -1)
        return reps, cluster_of_head, w_sel, b_sel
