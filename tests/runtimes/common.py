"""Shared by the runtimes tests: where the artifacts are (CHAI_RUNTIME_ARTIFACTS, made by make_artifacts.py) and
how greedy sequences are compared (cut at the first EOS, which both runtimes stop at)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

MODELS = ("stories260k", "smollm2")
NEW_TOKENS = 20


def artifacts() -> Path:
    env = os.environ.get("CHAI_RUNTIME_ARTIFACTS")
    if not env or not (Path(env) / "references.json").is_file():
        pytest.skip("CHAI_RUNTIME_ARTIFACTS is not set to a make_artifacts.py output (tests/runtimes/run.sh sets it)")
    return Path(env)


def references() -> dict:
    return json.loads((artifacts() / "references.json").read_text())


def until_eos(tokens, eos: int) -> list[int]:
    out = []
    for t in np.asarray(tokens).tolist():
        out.append(int(t))
        if t == eos:
            break
    return out


def matched(want: list[int], have: list[int]) -> int:
    """Leading tokens in agreement; the tests require all of them (and equal lengths)."""
    n = 0
    for a, b in zip(want, have, strict=False):
        if a != b:
            break
        n += 1
    return n
