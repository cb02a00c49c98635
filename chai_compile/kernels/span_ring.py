"""The ring of a bounded span cache: which row holds which real token. The one statement of the rule, read by
the rewrite's cache (rewrite/span_cache.py), the fused node's float64 reference (fused_op) and, through the
tests that compare them with it, the C++ op (plugins/onnxruntime/clusteredAttentionCpu.cc).

A bounded cache of `sinks + window` rows keeps a sequence's first `sinks` real tokens and its last `window`
ones. Real token r (left padding has no real index and is never stored) lives in row

    slot(r) = r                                  r < sinks
              sinks + (r - sinks) mod window     otherwise (the ring)

so rows fill in order while the sequence is shorter than the cache, and a new token overwrites the one
`window` tokens older. Survivors never collide: of the tokens that share a ring row only the newest is
within the last `window`. Which real token a row holds follows from r, the real tokens seen so far, alone
(`row_index`): nothing but the rows themselves travels between steps.
"""

from __future__ import annotations

import torch


def slot(index: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Row of each real index (any shape; entries < 0 map to garbage: callers mask them with `survives`)."""
    return torch.where(index < sinks, index, sinks + (index - sinks).remainder(window))


def survives(index: torch.Tensor, real_after: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Real indices [B, S] (-1: padding) still kept once a sequence has seen real_after [B] real tokens."""
    return (index >= 0) & ((index < sinks) | (index >= real_after[:, None] - window))


def row_index(rows: int, real: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[B, rows] real index held by each row of a ring (-1: empty) after real [B] real tokens."""
    j = torch.arange(rows, device=real.device)[None, :]
    r = real.to(torch.int64)[:, None]
    newest = r - 1 - (r - 1 - j).remainder(window)  # the newest real token whose ring row is j
    held = torch.where(j < sinks, j, newest)
    return torch.where(j < torch.clamp(r, max=sinks + window), held, -1)
