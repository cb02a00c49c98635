"""Option parsing shared by the commands: enum-valued options handed over as members, and list-valued
options ('0-3,7', '2,3,4') parsed without expanding, so a huge range costs nothing until it has been
checked against the model."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from chai_compile.choices import DTYPE_SPELLINGS, Choice, DType
from chai_compile.errors import UsageError


def choice_option(*names: str, enum: type[Choice], default: Choice, accepted: tuple[str, ...] | None = None,
                  **kwargs: Any) -> Callable[[Any], Any]:
    """A click option over `enum`'s values (or the `accepted` spellings): click refuses anything else with
    its one-line usage error, and the command receives the enum member, so reports carry one spelling."""

    def to_member(ctx: click.Context, param: click.Parameter, value: str | None) -> Choice | None:
        return None if value is None else enum.parse(value, param.opts[0])

    return click.option(*names, type=click.Choice(accepted or enum.values()), default=default.value,
                        show_default=True, callback=to_member, **kwargs)


def dtype_option(accepted: tuple[str, ...] = DTYPE_SPELLINGS, **kwargs: Any) -> Callable[[Any], Any]:
    """--dtype: both spellings (float32 or fp32, ...) accepted, the long one handed over."""
    return choice_option("--dtype", enum=DType, default=DType.FLOAT32, accepted=accepted, **kwargs)


_RANGE = re.compile(r"^\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?$")  # 9 digits: beyond any model, far below a MemoryError


def parse_ranges(text: str | None, option: str) -> list[tuple[int, int]]:
    """'0-3,7' -> [(0, 3), (7, 7)]; refuses negative, reversed or non-integer parts."""
    if not text or not text.strip():
        return []
    out = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise UsageError(f"{option} must be non-negative integers or ranges like 0-3,7", value=text,
                             fix=f"e.g. {option} 0-3,7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise UsageError(f"{option}: range {part.strip()} runs backwards", value=text, fix=f"write {hi}-{lo}")
        out.append((lo, hi))
    return out


def expand_ranges(ranges: list[tuple[int, int]], upper: int, option: str) -> list[int]:
    """The indices of `ranges`, after checking every end against `upper` (exclusive)."""
    for _, hi in ranges:
        if hi >= upper:
            raise UsageError(f"{option} index out of range 0..{upper - 1}", value=hi,
                             fix=f"the model has {upper}; pass indices below {upper}")
    return sorted({i for lo, hi in ranges for i in range(lo, hi + 1)})


def parse_int_list(text: str | None, option: str, minimum: int | None = None) -> list[int]:
    """'2,3,4' -> [2, 3, 4]."""
    if not text or not text.strip():
        return []
    values = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"-?\d{1,9}", part):
            raise UsageError(f"{option} expects comma-separated integers", value=text, fix=f"e.g. {option} 2,3,4")
        values.append(int(part))
    if minimum is not None and min(values) < minimum:
        raise UsageError(f"{option} values must be at least {minimum}", value=min(values),
                         fix=f"pass {option} values of {minimum} or more")
    return values
