"""CHAI attention with any head-to-head source map, for planning on calibration windows.

Head h uses the attention probabilities of head source[h] (itself when source[h] == h) with its own V;
the planner switches sources in place to measure what a candidate merge costs, without rebuilding the
model. Calibration windows are unpadded and uncached, so the mask is plain causal.

    P_h  = softmax(q_h k_{g(h)}^T * scale + causal + band_h)
    out_h = P_{source[h]} v_{g(h)};   y = concat_h(out_h) W_o^T + b_o

Two more transforms are simulated for the planner: a span head (band_h masks every key j of query i
unless j < sinks or i - j < window) and a shared layer (`shared_from` = j: head h uses the probabilities
that layer j's head h used in the same forward, read from a `ProbStore`, with this layer's own V).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from chai_compile.adapters import ModelAdapter
from chai_compile.adapters.base import HeadProjections
from chai_compile.device_map import loaded
from chai_compile.mapping import Span

# Called with (module, x [B,T,hidden], position_embeddings, probs [B,H,T,T] before sharing, v [B,KV,T,d],
# head outputs [B,T,H*d], y [B,T,hidden]).
Capture = Callable[..., None]


class SharedScoresAttention(nn.Module):
    """Replacement attention module for planning; reads the family's original weights through the adapter."""

    def __init__(self, adapter: ModelAdapter, layer: int) -> None:
        super().__init__()
        s = adapter.spec
        self.adapter, self.layer = adapter, layer
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.group = s.num_heads // s.num_kv_heads
        self.scale = float(adapter.scaling())
        self.source = list(range(s.num_heads))
        # The original module stays in the model (its forward is patched): accelerate still finds, loads and
        # offloads its weights; `p` reads them afresh each time. Kept out of the module tree (a plain list).
        self._original = [adapter.attention(layer)]
        p = self.p
        self.q_scale = float(p.q_scale)
        # Refit parameters (None: the original's). q_weight/q_bias are the full [H*d, hidden] projection.
        self.q_weight: torch.Tensor | None = None
        self.q_bias: torch.Tensor | None = None
        self.o_weight: torch.Tensor | None = None
        self.refit_heads: list[int] = []  # representatives whose Q rows q_weight refits
        self.capture: Capture | None = None
        self.spans: list[Span | None] | None = None  # per query head; None: no span head in this layer
        self.shared_from: int | None = None  # an earlier layer whose used probabilities this layer takes
        self.store: ProbStore | None = None
        self.original_forward = adapter.attention_forward()

    @property
    def p(self) -> HeadProjections:
        """The original projections, live (real tensors only inside `live()` for offloaded layers)."""
        return self.adapter.projections(self.layer)

    def live(self) -> contextlib.AbstractContextManager[None]:
        """The original weights loaded while inside (a no-op unless accelerate offloaded them)."""
        return loaded(self._original[0])

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                torch.Tensor, torch.Tensor | None]:
        p = self.p
        q_w = p.q_weight if self.q_weight is None else self.q_weight
        q_b = p.q_bias if self.q_weight is None else self.q_bias
        o_w = p.o_weight if self.o_weight is None else self.o_weight
        return q_w, q_b, p.v_weight, p.v_bias, o_w, p.o_bias

    def probabilities(self, x: torch.Tensor, position_embeddings: Any, q_weight: torch.Tensor | None = None,
                      q_bias: torch.Tensor | None = None, band: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [B, H, T, T] in fp32 for every head, v [B, KV, T, d]) for inputs x [B, T, hidden];
        span heads banded unless `band` is False."""
        b, t, _ = x.shape
        q_w, q_b, v_w, v_b, _, _ = self._weights()
        if q_weight is not None:
            q_w, q_b = q_weight, q_bias
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = nn.functional.linear(x, q_w, q_b).view(b, t, h, d).transpose(1, 2) * self.q_scale
        q = self.rotate(q, position_embeddings)
        v = nn.functional.linear(x, v_w, v_b).view(b, t, kv, d).transpose(1, 2)
        scores = torch.matmul(q.float(), self.keys(x, position_embeddings).float().transpose(-1, -2)) * self.scale
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.spans is not None and band:
            allowed = allowed & band_mask(self.spans, t, x.device)  # [H, T, T]
        return scores.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1), v

    def rotate(self, t: torch.Tensor, position_embeddings: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The family's positions applied to t [B, heads, T', d] at `rows` of the window (all when None)."""
        if position_embeddings is not None and rows is not None:
            position_embeddings = tuple(p[:, rows] for p in position_embeddings)
        return self.adapter.position(t, t, Positions(position_embeddings))[0]  # type: ignore[arg-type]

    def keys(self, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """Positioned keys, one per query head: [B, H, T, d] (GQA groups repeated)."""
        b, t, _ = x.shape
        k = nn.functional.linear(x, self.p.k_weight, self.p.k_bias).view(b, t, self.num_kv_heads, self.head_dim)
        return self.rotate(k.transpose(1, 2), position_embeddings).repeat_interleave(self.group, dim=1)

    def head_outputs(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, T, H*d]: head h applies its source's probabilities to its own V."""
        b, h, t, _ = probs.shape
        src = torch.tensor(self.source, device=probs.device)
        shared = probs.index_select(1, src).to(v.dtype)
        out = torch.matmul(shared, v.repeat_interleave(self.group, dim=1))  # [B, H, T, d]
        return out.transpose(1, 2).reshape(b, t, h * self.head_dim)

    def original_output(self, x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """The original attention's output on x: own probabilities, original Q and W_o."""
        probs, v = self.probabilities(x, position_embeddings, self.p.q_weight, self.p.q_bias, band=False)
        b, h, t, _ = probs.shape
        out = torch.matmul(probs.to(v.dtype), v.repeat_interleave(self.group, dim=1))
        return nn.functional.linear(out.transpose(1, 2).reshape(b, t, -1), self.p.o_weight, self.p.o_bias)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = self.adapter.call_inputs(args, kwargs)
        x = call.hidden_states
        with self.live():
            if self.shared_from is not None:
                assert self.store is not None
                probs = self.store.probs[self.shared_from]  # already in head order: the source's used maps
                p = self.p
                b, t, _ = x.shape
                v = nn.functional.linear(x, p.v_weight, p.v_bias).view(b, t, self.num_kv_heads, self.head_dim)
                v = v.transpose(1, 2)
                out = torch.matmul(probs.to(v.dtype), v.repeat_interleave(self.group, dim=1))
                heads = out.transpose(1, 2).reshape(b, t, -1)
            else:
                probs, v = self.probabilities(x, call.position_embeddings)
                heads = self.head_outputs(probs, v)
                if self.store is not None and self.layer in self.store.sources:
                    self.store.probs[self.layer] = probs.index_select(1, torch.tensor(self.source, device=x.device))
            _, _, _, _, o_w, o_b = self._weights()
            y = nn.functional.linear(heads, o_w, o_b)
            if self.capture is not None:
                self.capture(self, x, call.position_embeddings, probs, v, heads, y)
        return y, None


def band_mask(spans: list[Span | None], t: int, device: torch.device) -> torch.Tensor:
    """[H, T, T] keys each head may read: all for a full-attention head, else j < sinks or i - j < window."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    full = torch.ones(t, t, dtype=torch.bool, device=device)
    return torch.stack([full if sp is None else (j < sp.sinks) | (i - j < sp.window) for sp in spans])


class ProbStore:
    """Probabilities of source layers within one forward, for the shared layers after them."""

    def __init__(self) -> None:
        self.sources: set[int] = set()
        self.probs: dict[int, torch.Tensor] = {}


class Positions:
    """The one field ModelAdapter.position reads."""

    def __init__(self, position_embeddings: Any) -> None:
        self.position_embeddings = position_embeddings


@contextmanager
def planning_modules(adapter: ModelAdapter) -> Iterator[list[SharedScoresAttention]]:
    """Run every attention module as a SharedScoresAttention; the original forwards come back on exit.

    The forward is patched, not the module swapped: the module tree stays as accelerate dispatched it, so
    a model spread over devices or offloaded keeps each layer's weights where they are."""
    mods = [SharedScoresAttention(adapter, i) for i in range(adapter.spec.num_layers)]
    patched = []
    try:
        for m in mods:
            old = m._original[0]
            # accelerate's hook replaced `forward` by a wrapper that calls `_old_forward`: patch under the hook.
            attr = "_old_forward" if hasattr(old, "_hf_hook") and hasattr(old, "_old_forward") else "forward"
            patched.append((old, attr, old.__dict__.get(attr)))
            setattr(old, attr, m.forward)
        yield mods
    finally:
        for old, attr, saved in reversed(patched):
            if saved is None:
                delattr(old, attr)
            else:
                setattr(old, attr, saved)
