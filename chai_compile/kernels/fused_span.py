"""The fused node's span path in float64: the reference of a `ClusteredAttention` node with span attributes
(fused_op's docstring states the contract; the C++ op and the Python op are tested against this).

Every key and every query row gets its sequence's real-token index (-1: padding or an empty ring row): new
tokens and a full-length past from the mask, a ring's rows from the real tokens seen before the call
(kernels/span_ring.py). Cluster c's row of real index i reads key j when

    0 <= j <= i  and  (span_window[c] == 0 or j < span_sinks[c] or j > i - span_window[c])

which is the rewrite's span rule (rewrite/span.py). The ring present then keeps the survivors of the new
tokens at their ring rows (span_ring.slot), so a chunk longer than the window still reads its own early
tokens before they are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.kernels import span_ring
from chai_compile.kernels.reference import clustered_attention


def real_index(valid: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """[B, T] real-token index of each slot (-1: padding), after `before` [B] real tokens."""
    return torch.where(valid, before[:, None] + valid.long().cumsum(1) - 1, -1)


def _ring_present(past: torch.Tensor, new: torch.Tensor, index: torch.Tensor, real_after: torch.Tensor, rows: int,
                  sinks: int, window: int, share: bool) -> torch.Tensor:
    """The ring after the call: the past's rows (the buffer itself, or grown to `rows`), survivors written."""
    b, n, _, d = new.shape
    if share:
        present = past.clone()
    else:
        present = past.new_zeros(b, n, rows, d)
        present[:, :, : past.shape[2]] = past
    keep = span_ring.survives(index, real_after, sinks, window)
    at = span_ring.slot(index, sinks, window)
    for bi, si in keep.nonzero().tolist():  # survivors never collide: the order does not matter
        present[bi, :, int(at[bi, si])] = new[bi, :, si]
    return present


def _rows_error(what: str, got: int, want: str) -> ValueError:
    return ValueError(f"{what} holds {got} rows, expected {want}")


def span_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                   past_value: torch.Tensor, attention_mask: torch.Tensor, attrs: dict[str, Any]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [B, S, H*d] float64, present_key, present_value) of a node with span attributes."""
    h, s = int(attrs["num_heads"]), query.shape[2]
    b, d = query.shape[0], query.shape[3]
    t = attention_mask.shape[1]
    p = t - s
    share = bool(int(attrs["past_present_share_buffer"]))
    sinks, window = int(attrs["ring_sinks"]), int(attrs["ring_window"])
    valid = (attention_mask != 0).to(query.device)
    real_past = valid[:, :p].sum(1)
    real_after = valid.sum(1)
    new_index = real_index(valid[:, p:], real_past)
    rows = past_key.shape[2]
    if p < 0 or past_value.shape[2] != rows:
        raise ValueError(f"attention_mask covers {t} tokens, fewer than the {s} new ones, or past_value's rows "
                         f"({past_value.shape[2]}) differ from past_key's ({rows})")
    if window:
        cap = sinks + window
        if share and rows < min(t, cap):
            raise _rows_error("the shared ring buffer", rows, f">= min(past + new, sinks + window) = {min(t, cap)}")
        if not share and rows != min(p, cap):
            raise _rows_error("past_key (a ring)", rows, f"min(past, sinks + window) = {min(p, cap)}")
        past_index = span_ring.row_index(rows, real_past, sinks, window)
        keys, values = torch.cat([past_key, key], 2), torch.cat([past_value, value], 2)
        present_rows = rows if share else min(t, cap)
        present_key = _ring_present(past_key, key, new_index, real_after, present_rows, sinks, window, share)
        present_value = _ring_present(past_value, value, new_index, real_after, present_rows, sinks, window, share)
    else:
        if share and rows < t:
            raise _rows_error("the shared cache buffer", rows, f">= past + new = {t}")
        if not share and rows != p:
            raise _rows_error("past_key", rows, f"the mask's past = {p}")
        past_index = real_index(valid[:, :p], torch.zeros_like(real_past))
        keys, values = torch.cat([past_key[:, :, :p], key], 2), torch.cat([past_value[:, :, :p], value], 2)
        if share:
            present_key, present_value = past_key.clone(), past_value.clone()
            present_key[:, :, p:t], present_value[:, :, p:t] = key, value
        else:
            present_key, present_value = keys, values
    key_index = torch.cat([past_index, new_index], 1)
    i, j = new_index[:, None, :, None], key_index[:, None, None, :]  # [B, 1, S, 1], [B, 1, 1, E]
    span_s = torch.as_tensor(attrs["span_sinks"], device=query.device)[None, :, None, None]
    span_w = torch.as_tensor(attrs["span_window"], device=query.device)[None, :, None, None]
    allowed = (j >= 0) & (j <= i) & ((span_w == 0) | (j < span_s) | (j > i - span_w))  # [B, C, S, E]
    out = clustered_attention(query, keys, values, allowed, attrs["cluster_offsets"], attrs["k_head_index"],
                              attrs["v_head_index"], float(attrs["scale"]))
    return out.permute(0, 2, 1, 3).reshape(b, s, h * d), present_key, present_value
