"""Verification: the original and the CHAI model side by side on zero-shot tasks, cache bytes, FLOPs and time.

- `tasks`: readers for PIQA, HellaSwag, ARC, BoolQ, COPA, OpenBookQA, LAMBADA, WikiText-2 (local, user, HF);
- `scoring`: lm-evaluation-harness-style log-likelihood scoring, LAMBADA, sliding-window perplexity;
- `measure`: KV-cache bytes from the real cache tensors, attention FLOPs;
- `compare`: one code path for verify and sweep; `report`: JSON, Markdown, PNG; `cli`: the commands.
"""

from chai_compile.verify.compare import build_chai, compare_loaded, evaluate, max_drop_violations
from chai_compile.verify.scoring import loglikelihoods, prepare, score
from chai_compile.verify.sweep import collect_mappings, sweep
from chai_compile.verify.tasks import ALL_TASKS, TASKS, Task, load_task, resolve_tasks

__all__ = [
    "ALL_TASKS", "TASKS", "Task", "build_chai", "collect_mappings", "compare_loaded", "evaluate", "load_task",
    "loglikelihoods", "max_drop_violations", "prepare", "resolve_tasks", "score", "sweep",
]
