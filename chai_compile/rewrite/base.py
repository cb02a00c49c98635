"""What static and dynamic clustered attention share: the family's call convention, V and O projections,
the cache, and the softmax under whatever mask transformers hands an attention module.

For one layer with H query heads, KV key/value heads (GQA group g = H / KV) and C clusters:

    q      = x W_q[reps]          # C heads: only representatives are projected
    k      = x W_k[kept]          # the KV heads some representative reads (static), or all (dynamic)
    v      = x W_v                # whole
    P_c    = softmax(q_c k_{kv(c)}^T * scale + mask)        # C score matrices, fp32 softmax
    out_h  = P_{cluster(h)} v_{h // g}                       # every head keeps its own V
    y      = concat_h(out_h) W_o                             # whole

The cache receives K with its kept heads and V with KV heads; transformers' DynamicCache concatenates
whatever it is given, so the saving is real memory, measured by `kv_cache_bytes`. The membership
variants are `static.StaticClusteredAttention` (the plan's clusters, frozen: what export uses) and
`dynamic.DynamicClusteredAttention` (the paper's online mode).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from chai_compile.adapters import AttentionCall, ModelAdapter
from chai_compile.choices import Membership
from chai_compile.errors import ChaiError, UnsupportedArchitectureError


class RewriteError(ChaiError):
    """The rewrite cannot be applied or run as asked."""


def owned_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear owning copies of weight [out, in] and bias (no random init of a throwaway)."""
    out_f, in_f = weight.shape
    lin = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def head_rows(w: torch.Tensor | None, heads: Sequence[int], head_dim: int) -> torch.Tensor | None:
    """Rows of a head-major [heads * d, ...] weight or [heads * d] bias for the given heads (a copy)."""
    if w is None:
        return None
    idx = torch.tensor(list(heads), device=w.device)
    per_head = w.reshape(-1, head_dim, *w.shape[1:])
    return per_head.index_select(0, idx).reshape(len(heads) * head_dim, *w.shape[1:])


def _static_layer_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return ()
    return (StaticLayer,)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 softmax of scores [B, X, S, T] under any mask transformers hands an attention module.

    None: causal, aligned bottom-right (queries are the last S of T positions); 4D bool: True
    attends; 4D float: additive (eager); 2D [B, T]: padding (flash-attention style), plus causal.
    Masked entries get the fp32 minimum, not -inf, so fully masked rows (left-padding queries) give
    uniform weights instead of NaN, as the eager path does (kernels/reference.py states the rule the
    other forms follow; those rows are padding, so no output depends on them).
    """
    s, t = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if mask is not None and mask.dim() == 4 and mask.dtype != torch.bool:
        return (scores + mask[..., :t].to(scores.dtype)).softmax(-1)
    keep = None
    if mask is None or mask.dim() == 2:
        if s > 1:
            pos = torch.arange(t, device=scores.device)
            keep = pos[None, :] <= pos[t - s :, None]  # [S, T]
        if mask is not None:
            pad = mask[:, None, None, :t].bool()
            keep = pad if keep is None else pad & keep
    else:
        keep = mask[..., :t]
    if keep is not None:
        scores = scores.masked_fill(~keep, lowest)
    return scores.softmax(-1)


class ClusteredAttention(nn.Module):
    """Drop-in replacement for a family's attention module: same call convention, returns (output, None).

    Subclasses project Q and K (`q_proj`/`k_proj` or their dynamic counterparts) and implement `attend`."""

    membership: Membership
    # Set by the rewrite on a layer that shared layers read: it hands its per-head probabilities over.
    publish: Any = None  # a shared.ProbabilityStore

    @property
    def scaling(self) -> float:
        """The attribute Hugging Face attention modules carry: adapters read it from layer 0, which may already be
        rewritten when a later layer is built."""
        return self.scale

    def __init__(self, adapter: ModelAdapter, layer_index: int, num_clusters: int, num_kept: int) -> None:
        super().__init__()
        spec = adapter.spec
        self.layer_idx = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.group = spec.num_heads // spec.num_kv_heads
        self.num_clusters = num_clusters
        self.num_kept = num_kept  # K heads in the cache
        try:
            self.scale = float(adapter.scaling())
        except NotImplementedError as e:
            raise UnsupportedArchitectureError(f"layer {layer_index}: {e}") from None
        # The adapter parses the family's call convention and applies its positions; keep a copy
        # without the model so the module does not hold its own model alive (and deep-copies cleanly).
        self.adapter = copy.copy(adapter)
        self.adapter.model = None
        # What adapter_for() reads on a rewritten model to find the family's call convention.
        self.original_forward = adapter.attention_forward()
        p = adapter.projections(layer_index)
        self.q_scale = float(p.q_scale)
        self.v_proj = owned_linear(p.v_weight, p.v_bias)
        self.o_proj = owned_linear(p.o_weight, p.o_bias)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, membership={self.membership}, heads={self.num_heads}, "
                f"clusters={self.num_clusters}, k_heads={self.num_kept}/{self.num_kv_heads}, head_dim={self.head_dim}")

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = self.adapter.call_inputs(args, kwargs)
        b, s, _ = call.hidden_states.shape
        cache = getattr(call.cache, "self_attention_cache", call.cache)  # GPT-2 may hand an EncoderDecoderCache
        out = self.attend(call, cache)  # [B, H, S, d] in original head order
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)), None

    def attend(self, call: AttentionCall, cache: Any) -> torch.Tensor:
        raise NotImplementedError

    def hand_over(self, probs: torch.Tensor) -> None:
        """Give per-head probabilities [B, H, S, T] to the shared layers that read this one, if any."""
        if self.publish is not None:
            self.publish.put(self.layer_idx, probs)

    def update_cache(self, cache: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None:
            return k, v
        if k.shape[1] != v.shape[1] and hasattr(cache, "layers") and self.layer_idx < len(cache.layers) \
                and isinstance(cache.layers[self.layer_idx], _static_layer_types()):
            raise RewriteError(
                f"layer {self.layer_idx} keeps {k.shape[1]} K heads and {v.shape[1]} V heads; a StaticCache "
                "allocates both with the K head count",
                fix="use the default DynamicCache (cache_implementation='dynamic')",
            )
        return cache.update(k, v, self.layer_idx)

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """[B, S, n * d] -> [B, n, S, d]."""
        b, s, _ = t.shape
        return t.view(b, s, n, self.head_dim).transpose(1, 2)
