"""Evaluation tasks: the registry of task names and their readers (task_files.py: the local files in
../shared/data/eval and user files of the same kinds; task_hf.py: Hugging Face datasets).

A task name picks a file format and a prompt format (both as lm-evaluation-harness builds them):

- multiple choice (`MCItem`): a context and several answers; each answer is scored as the
  continuation `delimiter + answer` of the context;
- last word (`LastWordItem`, LAMBADA): a context and the final word as target;
- perplexity (`CorpusItem`, WikiText-2): one plain text scored with a sliding window (`wikitext2-4k`:
  the same text in 4096-token windows, capped at the model's positions);
- passkey (`PasskeyItem`, passkey.py): synthetic long-context retrieval, generated from a seed.

`--task NAME=PATH` reads a user file in NAME's format; `--task NAME=hf:ID[:CONFIG][@SPLIT]` (or just
`hf:`) loads a Hugging Face dataset when `datasets` is installed and a hub is reachable. Every
format problem becomes a `TaskError` that names the file, the line and the expected format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chai_compile.errors import TaskError
from chai_compile.verify.passkey import DEFAULT_LENGTHS, DEFAULT_SEED, passkey_items
from chai_compile.verify.task_files import (  # noqa: F401  (item types re-exported for scoring and tests)
    HELLASWAG_FMT,
    LAMBADA_FMT,
    PIQA_FMT,
    QUERY_FMT,
    WIKITEXT_FMT,
    CorpusItem,
    Kind,
    LastWordItem,
    MCItem,
    read_corpus,
    read_hellaswag,
    read_lambada,
    read_piqa,
    read_query_choices,
)
from chai_compile.verify.task_hf import HF_ROW, read_hf  # noqa: F401  (HF_ROW re-exported for tests)


@dataclass
class Task:
    name: str
    kind: Kind
    source: str  # file path or hf:... spec, for the report
    items: list[Any] = field(default_factory=list)
    window: int | None = None  # a long-window perplexity task's own window (overrides --window)
    explicit_lengths: bool = False  # passkey lengths the user stated: refused, not capped, above the model

    def limited(self, limit: int | None) -> list[Any]:
        """First `limit` items (lm-eval's --limit); perplexity tasks apply the limit to windows instead."""
        if limit is None or self.kind == "perplexity":
            return self.items
        return self.items[:limit]


# ---- registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    reader: Callable[[str, str], list[Any]]
    default_file: str | None  # relative to the eval data directory
    fmt: str
    hf: tuple[str, str | None, str]  # default Hugging Face dataset id, config, split
    window: int | None = None
    in_all: bool = True  # long-context tasks are asked for by name: `all` stays the short zero-shot set


PASSKEY_FMT = "synthetic (generated from a seed; no file)"


def _no_file(spec: str, task: str) -> list[Any]:
    raise TaskError(f"{task} is generated, it reads no file", value=spec,
                    fix=f"drop --task {task}=...; pass --tasks {task} (and --passkey-lengths)")


def _query(suffix: str) -> Callable[[str, str], list[MCItem]]:
    return lambda spec, task: read_query_choices(spec, task, suffix)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "multiple_choice", read_piqa, "piqa/valid.jsonl", PIQA_FMT, ("baber/piqa", None, "validation")),
    TaskSpec("hellaswag", "multiple_choice", read_hellaswag, "hellaswag_val.txt.bz2", HELLASWAG_FMT,
             ("Rowan/hellaswag", None, "validation")),
    TaskSpec("arc_easy", "multiple_choice", _query("\nAnswer:"), "arc_easy.jsonl", QUERY_FMT,
             ("allenai/ai2_arc", "ARC-Easy", "test")),
    TaskSpec("arc_challenge", "multiple_choice", _query("\nAnswer:"), None, QUERY_FMT,
             ("allenai/ai2_arc", "ARC-Challenge", "test")),
    TaskSpec("boolq", "multiple_choice", _query("\nAnswer:"), "boolq.jsonl", QUERY_FMT,
             ("google/boolq", None, "validation")),
    TaskSpec("copa", "multiple_choice", _query(""), "copa.jsonl", QUERY_FMT, ("aps/super_glue", "copa", "validation")),
    TaskSpec("openbookqa", "multiple_choice", _query(""), "openbook_qa.jsonl", QUERY_FMT,
             ("allenai/openbookqa", "main", "test")),
    TaskSpec("lambada", "last_word", read_lambada, "lambada_test.jsonl", LAMBADA_FMT,
             ("EleutherAI/lambada_openai", "default", "test")),
    TaskSpec("wikitext2", "perplexity", read_corpus, "wikitext2/test.txt", WIKITEXT_FMT,
             ("Salesforce/wikitext", "wikitext-2-v1", "test")),
    TaskSpec("wikitext2-4k", "perplexity", read_corpus, "wikitext2/test.txt", WIKITEXT_FMT,
             ("Salesforce/wikitext", "wikitext-2-v1", "test"), window=4096, in_all=False),
    TaskSpec("passkey", "passkey", _no_file, None, PASSKEY_FMT, ("", None, ""), in_all=False),
)}
ALIASES = {"openbook_qa": "openbookqa", "obqa": "openbookqa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge",
           "lambada_openai": "lambada", "wikitext": "wikitext2", "wikitext-2": "wikitext2",
           "wikitext2_4k": "wikitext2-4k", "passkey_retrieval": "passkey"}
# `--tasks all`: every task with a file in the shared data.
ALL_TASKS = [n for n, t in TASKS.items() if t.default_file and t.in_all]


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or 'all')", value=name,
                        fix="pick a known task; a user file is passed as --task KNOWN_NAME=PATH in that "
                            "task's format")
    return key


def default_data_dir() -> Path | None:
    """$CHAI_COMPILE_EVAL_DATA, else ../shared/data/eval beside the working directory or the checkout."""
    env = os.environ.get("CHAI_COMPILE_EVAL_DATA")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base.parent / "shared" / "data" / "eval"
        if cand.is_dir():
            return cand
    return None


def parse_task_list(text: str | None) -> list[str]:
    """'piqa,hellaswag' or 'all' -> canonical names (order kept, duplicates dropped)."""
    if not text:
        return []
    names: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        for n in ALL_TASKS if part.strip().lower() == "all" else [canonical_name(part)]:
            if n not in names:
                names.append(n)
    return names


def parse_task_option(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (canonical name, PATH)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise TaskError("--task expects NAME=PATH (or NAME=hf:DATASET)", value=text,
                        fix="e.g. --task piqa=my_piqa.jsonl or --task arc_easy=arc.jsonl")
    return canonical_name(name), path.strip()


def load_task(name: str, source: str | None = None, data_dir: str | Path | None = None,
              passkey_lengths: tuple[int, ...] | None = None) -> Task:
    """Read one task: `source` is a path, 'hf:...' or None for the shared data file (passkey: generated,
    at `passkey_lengths` or the default 1k-8k, which are capped at the model's positions)."""
    name = canonical_name(name)
    spec = TASKS[name]
    if spec.kind == "passkey":
        if source is not None:
            _no_file(source, name)
        return Task(name, spec.kind, f"synthetic seed {DEFAULT_SEED}",
                    passkey_items(passkey_lengths or DEFAULT_LENGTHS), explicit_lengths=passkey_lengths is not None)
    if source is None:
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if spec.default_file is None:
            raise TaskError(f"{name}: there is no local file for this task",
                            fix=f"pass --task {name}=PATH ({spec.fmt}) or --task {name}=hf:")
        if root is None or not (root / spec.default_file).exists():
            raise TaskError(f"{name}: the local evaluation data was not found"
                            + (f" ({root / spec.default_file})" if root else ""),
                            fix=f"set --data-dir or CHAI_COMPILE_EVAL_DATA to the eval folder, or pass "
                                f"--task {name}=PATH or --task {name}=hf:")
        source = str(root / spec.default_file)
    if source.startswith("hf:") or source == "hf":
        items = read_hf("hf:" + source[3:] if source != "hf" else "hf:", name, spec.hf)
    else:
        items = spec.reader(source, name)
    if not items:
        raise TaskError(f"{name}: {source} holds no items")
    return Task(name, spec.kind, source, items, window=spec.window)


def resolve_tasks(names: list[str], overrides: dict[str, str] | None = None,
                  data_dir: str | Path | None = None, passkey_lengths: tuple[int, ...] | None = None) -> list[Task]:
    """Tasks in order: `names` first (user files replace shared ones), then override-only tasks."""
    overrides = {canonical_name(k): v for k, v in (overrides or {}).items()}
    order = [canonical_name(n) for n in names]
    order += [n for n in overrides if n not in order]
    if not order:
        raise TaskError("no tasks selected", fix="pass --tasks piqa,hellaswag,... or --tasks all")
    return [load_task(n, overrides.get(n), data_dir, passkey_lengths) for n in order]
