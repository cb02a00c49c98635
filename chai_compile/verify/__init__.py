"""Verification: the original and the CHAI model side by side on zero-shot tasks, cache bytes, FLOPs and time.

- `tasks`: readers for PIQA, HellaSwag, ARC, BoolQ, COPA, OpenBookQA, LAMBADA, WikiText-2 (local, user, HF),
  and the long-context tasks wikitext2-4k and passkey (`passkey`: generated from a seed);
- `scoring`: lm-evaluation-harness-style log-likelihood scoring, LAMBADA, sliding-window perplexity;
- `measure`: KV-cache bytes from the real cache tensors, attention FLOPs;
- `compare`: one code path for verify and sweep; `report`: JSON, Markdown, PNG; `cli`: the commands;
- `long_context`: KV bytes at stated context lengths, the passkey tables and heatmap; `baselines`: the
  StreamingLLM plan (sinks + window in every head) to compare at equal KV saving.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562): `chai_compile.verify.cli` must not import torch for `--help`.
_LAZY = {
    **dict.fromkeys(("build_chai", "compare_loaded", "evaluate", "max_drop_violations"), "compare"),
    **dict.fromkeys(("loglikelihoods", "prepare", "score"), "scoring"),
    "collect_mappings": "sweep",  # (`sweep` itself names the submodule here; use verify.sweep.sweep)
    **dict.fromkeys(("ALL_TASKS", "TASKS", "Task", "load_task", "resolve_tasks"), "tasks"),
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
