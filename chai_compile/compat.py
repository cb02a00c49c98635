"""Where the installed transformers puts the KV cache, derived from its signatures (never assumed).

transformers renames cache arguments inside 5.x: 5.24 hands the attention layer `cache=` where
earlier releases used `past_key_values=` (GPT-NeoX has always used `layer_past=`), and model outputs
moved from `.past_key_values` to `.cache`. Code that reads the old name gets None and silently runs
without a cache, so every name here is read off the installed forward's signature, once per class.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from chai_compile.errors import ChaiError

# Every name a transformers release has used for the cache argument, newest first.
CACHE_NAMES = ("cache", "past_key_values", "layer_past", "past_key_value")


class CacheCompatError(ChaiError):
    """The installed transformers passes the KV cache in a way this release does not recognise."""


@functools.cache
def _parameters(forward: Callable) -> tuple[str, ...]:
    # inspect.signature follows __wrapped__, so deprecation decorators show the current names.
    names = tuple(inspect.signature(forward).parameters)
    return names[1:] if names and names[0] == "self" else names


def cache_parameter(forward: Callable) -> str:
    """The name under which `forward` (an attention or model forward) takes its KV cache."""
    params = _parameters(forward)
    found = [n for n in CACHE_NAMES if n in params]
    if len(found) != 1:
        raise CacheCompatError(
            f"cannot tell which argument of {forward.__qualname__} carries the KV cache",
            value=list(params), fix="install a transformers release in the tested range (see docs/compat.md)")
    return found[0]


def positional_index(forward: Callable, name: str) -> int | None:
    """Position of parameter `name` among the positional arguments after self, or None."""
    params = _parameters(forward)
    return params.index(name) if name in params else None


@functools.cache
def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


def misplaced_cache(kwargs: dict[str, Any], expected: str) -> str | None:
    """The name of a kwarg other than `expected` that holds a transformers Cache, if any.

    A cache under another name means the caller's convention changed: reading `expected` would
    give None and the layer would run without its cache.
    """
    cache_type = _cache_base()
    for key, value in kwargs.items():
        if key != expected and isinstance(value, cache_type):
            return key
    return None


def model_cache_kwarg(model: nn.Module) -> str:
    """The keyword the model's top-level forward takes its cache under (`cache` or `past_key_values`)."""
    return cache_parameter(type(model).forward)


def model_forward(model: nn.Module, cache: Any, **inputs: Any) -> Any:
    """Call `model(**inputs)` with `cache` under the installed release's name and use_cache=True."""
    return model(**inputs, **{model_cache_kwarg(model): cache}, use_cache=True)


def output_cache(output: Any) -> Any:
    """The cache a model returned (`.cache` in newer releases, `.past_key_values` before), or None."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return output[name]
    return None
