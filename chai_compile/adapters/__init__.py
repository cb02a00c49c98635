"""Registry of architecture adapters: one small module per model family.

Adding a family: write `adapters/<family>.py` with a `ModelAdapter` subclass decorated with
`@register`, and import it at the bottom of this file.
"""

from __future__ import annotations

from torch import nn

from chai_compile.adapters.base import (
    AttentionCall,
    AttentionSpec,
    HeadProjections,
    ModelAdapter,
    apply_rotary,
)
from chai_compile.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}",
            fix="add an adapter in chai_compile/adapters/ (one small file) or use a supported model",
        )
    return cls(model)


__all__ = [
    "AttentionCall", "AttentionSpec", "HeadProjections", "ModelAdapter", "adapter_for", "apply_rotary",
    "register", "supported_model_types",
]

from chai_compile.adapters import gpt2, gpt_neox, llama, opt  # noqa: E402,F401  (registration)
