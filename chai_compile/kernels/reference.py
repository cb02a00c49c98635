"""The float64 reference of clustered attention: the one implementation of the math that every form is
tested against (the rewrite's torch path, static and dynamic; the fused node's reference, which the ONNX
Runtime Python op runs; the Triton kernels; the C++ op and the TensorRT plugin). Runs on any device.

Semantics (heads already permuted by `chai_compile.layout` so that cluster c is the head range
[offsets[c], offsets[c+1])):

    P_c   = softmax(q_c K_{k_head_index[c]}^T * scale + mask)
    out_i = P_{cluster(i)} V_{v_head_index[i]}

Masked-row rule: a query row with no allowed key gives zeros (its weights are all zero, never NaN and
never uniform). The Triton kernels, the C++ op and the plugin follow it. The rewrite's torch path follows
transformers' eager attention instead (uniform weights over the fp32-minimum scores) so that it stays
bit-comparable with eager; such rows are left-padding queries whose outputs nothing reads, so tests
compare the forms on rows with at least one allowed key.

It materialises every score matrix: keep shapes small.
"""

from __future__ import annotations

import torch

from chai_compile.layout import check_offsets


def cluster_of_head(cluster_offsets: torch.Tensor) -> torch.Tensor:
    """[H] int64: the cluster each permuted head belongs to."""
    offs = torch.as_tensor(cluster_offsets).to(torch.int64)
    check_offsets(offs.tolist())
    return torch.repeat_interleave(torch.arange(len(offs) - 1, device=offs.device), offs[1:] - offs[:-1])


def _key_mask(
    lengths: torch.Tensor, t_max: int, span: torch.Tensor | None, sinks: int, device: torch.device
) -> torch.Tensor:
    """[B, T] bool: key t is attended by sequence b."""
    t = torch.arange(t_max, device=device)[None, :]
    mask = t < lengths.to(device=device, dtype=torch.int64)[:, None]
    if span is not None:
        span = span.to(device=device, dtype=torch.int64)
        in_span = (t >= span[:, :1]) & (t < span[:, 1:2])
        mask &= in_span | (t < sinks)
    return mask


def _attend(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax over the last dim, with the masked-row rule (no attended key: zero weights)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The math every clustered form is tested against, in float64.

    q [B, C, S, d], k [B, Hk, T, d], v [B, Hv, T, d], allowed bool [B, 1, S, T] or, per cluster, [B, C, S, T]
    (query row s may attend key t) -> [B, H, S, d] float64. Masked rows follow the module's rule; keys no row
    attends may hold anything (NaN padding): they are kept out of the products.
    """
    dev = q.device
    cl = cluster_of_head(torch.as_tensor(cluster_offsets).to(dev))
    used = allowed.any(dim=-2).any(dim=1, keepdim=True)[..., None]  # [B, 1, T, 1]: some row of some cluster
    kk = k.to(torch.float64).index_select(1, torch.as_tensor(k_head_index).to(dev, torch.int64))
    vv = v.to(torch.float64).index_select(1, torch.as_tensor(v_head_index).to(dev, torch.int64))
    kk, vv = kk.masked_fill(~used, 0.0), vv.masked_fill(~used, 0.0)
    scores = torch.einsum("bcsd,bctd->bcst", q.to(torch.float64), kk) * scale
    probs = _attend(scores, allowed)
    return torch.einsum("bhst,bhtd->bhsd", probs.index_select(1, cl), vv)


def clustered_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    scale: float,
    *,
    span: torch.Tensor | None = None,
    sinks: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q [B, C, d], caches [B, H*, Tmax, d], lengths [B] -> [B, H, d] (dtype of q unless out_dtype).

    span: optional int [B, 2] (start, end); with it a key t is attended iff t < lengths[b] and
    (t < sinks or start <= t < end).
    """
    allowed = _key_mask(lengths, k_cache.shape[2], span, sinks, q.device)[:, None, None, :]
    out = clustered_attention(q[:, :, None], k_cache, v_cache, allowed, cluster_offsets, k_head_index, v_head_index,
                              scale)
    return out[:, :, 0].to(out_dtype or q.dtype)


def clustered_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cluster_offsets: torch.Tensor,
    k_head_index: torch.Tensor,
    v_head_index: torch.Tensor,
    scale: float,
    causal: bool = True,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q [B, C, S, d], k [B, Hk, S, d], v [B, Hv, S, d] -> [B, H, S, d]."""
    s_len, t_len = q.shape[2], k.shape[2]
    allowed = torch.ones(s_len, t_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    out = clustered_attention(q, k, v, allowed[None, None], cluster_offsets, k_head_index, v_head_index, scale)
    return out.to(out_dtype or q.dtype)
