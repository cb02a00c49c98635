"""Running chai-compile artifacts in other runtimes.

`CHAIModelForCausalLM` (Optimum) is imported on first use, so chai-compile itself never needs Optimum:
`from chai_compile.runtime import CHAIModelForCausalLM` in an environment that has optimum-onnx.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHAIModelForCausalLM", "cache_heads"]


def __getattr__(name: str) -> Any:
    if name == "CHAIModelForCausalLM":
        from chai_compile.runtime.optimum import CHAIModelForCausalLM

        return CHAIModelForCausalLM
    if name == "cache_heads":
        from chai_compile.runtime.heads import cache_heads

        return cache_heads
    raise AttributeError(f"module 'chai_compile.runtime' has no attribute {name!r}")
