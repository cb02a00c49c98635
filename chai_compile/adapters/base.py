"""What every architecture adapter provides: layers, head counts, projections, positions.

An adapter turns one model family's attention module into a uniform view:
- `spec`: head counts and sizes;
- `projections(i)`: Q/K/V/O weights in `nn.Linear` layout ([out, in]) whatever the family stores
  (fused QKV, Conv1D, interleaved per-head), so profile, rewrite and export read one format;
- `call_inputs(args, kwargs)`: the attention forward's arguments, normalised (names and positions
  read off the installed attention forward's signature, so a transformers rename cannot hide the cache);
- `position(attn, call)`: how positions enter q and k (rotary or none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from chai_compile.compat import CacheCompatError, cache_parameter, misplaced_cache, positional_index


@dataclass(frozen=True)
class AttentionSpec:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    positional: str  # "rope" or "absolute" (added to embeddings, nothing in attention)
    rotary_dim: int  # 0 when positional != "rope"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class HeadProjections:
    """Projection weights in [out_features, in_features] layout; rows of q/k/v are head-major."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    o_weight: torch.Tensor  # [hidden, num_heads * head_dim]
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    q_scale: float = 1.0  # folded into q before scores (OPT scales q after projection)


@dataclass
class AttentionCall:
    """The attention forward's inputs under uniform names."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: Any
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    extra: dict[str, Any]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [B, heads, T, d]; rest passes through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


class ModelAdapter:
    """Base adapter. Subclasses set `name`, `model_types` and implement the abstract parts."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    description: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.spec = self._spec()
        forward = self.attention_forward()
        self.cache_kwarg = cache_parameter(forward)
        self._position_of = {name: positional_index(forward, name) for name in
                             ("hidden_states", "attention_mask", "position_embeddings", self.cache_kwarg)}

    # ---- to implement --------------------------------------------------------------------
    def _spec(self) -> AttentionSpec:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attention(self, layer_index: int) -> nn.Module:
        raise NotImplementedError

    def projections(self, layer_index: int) -> HeadProjections:
        raise NotImplementedError

    # ---- call convention ------------------------------------------------------------------
    def attention_forward(self) -> Callable:
        """The family's own attention forward (a rewritten layer remembers the one it replaced)."""
        module = self.attention(0)
        return getattr(module, "original_forward", None) or type(module).forward

    def _arg(self, args: tuple, kwargs: dict[str, Any], name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self._position_of.get(name)
        return args[index] if index is not None and index < len(args) else None

    def call_inputs(self, args: tuple, kwargs: dict[str, Any]) -> AttentionCall:
        cache = self._arg(args, kwargs, self.cache_kwarg)
        if cache is None:
            stray = misplaced_cache(kwargs, self.cache_kwarg)
            if stray is not None or kwargs.get("use_cache"):
                raise CacheCompatError(
                    f"the attention layer expected its KV cache as `{self.cache_kwarg}` but "
                    + (f"it came as `{stray}`" if stray else "none came although use_cache=True"),
                    fix="install a transformers release in the tested range (see docs/compat.md)")
        return AttentionCall(
            hidden_states=self._arg(args, kwargs, "hidden_states"),
            attention_mask=self._arg(args, kwargs, "attention_mask"),
            cache=cache,
            position_embeddings=self._arg(args, kwargs, "position_embeddings"),
            extra=kwargs,
        )

    # ---- shared ---------------------------------------------------------------------------
    def position(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.positional != "rope":
            return q, k
        cos, sin = call.position_embeddings
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def scaling(self) -> float:
        return self.spec.head_dim**-0.5

    def queries_keys(self, layer_index: int, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Positioned, scaled-ready q [B, H, T, d] and k [B, KV, T, d] recomputed from the inputs."""
        p = self.projections(layer_index)
        x = call.hidden_states
        b, t, _ = x.shape
        s = self.spec
        q = nn.functional.linear(x, p.q_weight, p.q_bias).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = nn.functional.linear(x, p.k_weight, p.k_bias).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        return self.position(q * p.q_scale, k, call)
