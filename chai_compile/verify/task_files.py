"""Evaluation task files: the item types and the readers of the local formats (the files in
../shared/data/eval and user files of the same kinds). Prompts are built as lm-evaluation-harness builds
them; every format problem becomes a `TaskError` that names the file, the line and the expected format."""

from __future__ import annotations

import bz2
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from chai_compile.errors import TaskError

Kind = Literal["multiple_choice", "last_word", "perplexity", "passkey"]


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]  # answer texts without the delimiter (acc_norm divides by their byte length)
    gold: int
    delimiter: str = " "


@dataclass(frozen=True)
class LastWordItem:
    context: str
    target: str  # the last word with its leading space


@dataclass(frozen=True)
class CorpusItem:
    text: str


# ---- file helpers ----------------------------------------------------------------------------

def _read_text(path: Path, task: str, fmt: str) -> str:
    """Whole file as text; bzip2 and gzip are recognised by their magic bytes, not the file name."""
    if not path.is_file():
        raise TaskError(f"{task}: task file not found", value=str(path), fix=f"pass an existing file in {fmt}")
    raw = path.read_bytes()
    try:
        if raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        elif raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, ValueError) as e:
        raise TaskError(f"{task}: {path} is a corrupt compressed file ({e}); expected {fmt}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaskError(f"{task}: {path} line {line}: not UTF-8 text (binary file?); expected {fmt}") from None


def _bad(task: str, path: Path | str, line: int | None, problem: str, fmt: str) -> TaskError:
    where = f"{path} line {line}" if line is not None else str(path)
    return TaskError(f"{task}: {where}: {problem}; expected {fmt}",
                     fix=f"pass a file in {task}'s format, or use the task name that matches the file")


def _jsonl(path: Path, task: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _read_text(path, task, fmt)
    n = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(task, path, lineno, f"not a JSON object ({e.msg})", fmt) from None
        if not isinstance(obj, dict):
            raise _bad(task, path, lineno, f"a JSON {type(obj).__name__}, not an object", fmt)
        n += 1
        yield lineno, obj
    if n == 0:
        raise _bad(task, path, None, "no items (empty file)", fmt)


def _field(obj: dict[str, Any], key: str, typ: type, task: str, path: Path, lineno: int, fmt: str) -> Any:
    if key not in obj:
        raise _bad(task, path, lineno, f"field {key!r} is missing", fmt)
    v = obj[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise _bad(task, path, lineno, f"field {key!r} must be {typ.__name__}, got {type(v).__name__}", fmt)
    return v


# ---- readers ------------------------------------------------------------------------------------

PIQA_FMT = ("PIQA format: JSON lines with goal, sol1, sol2, and labels (0/1) either in a 'label' field or one "
            "per line in a labels file (NAME-labels.lst beside it, or piqa=DATA.jsonl,LABELS.lst)")


def read_piqa(spec: str, task: str = "piqa") -> list[MCItem]:
    """PIQA as lm-eval prompts it: "Question: {goal}\\nAnswer:" + " " + solution."""
    data_path, labels_path = _piqa_paths(spec)
    rows = list(_jsonl(data_path, task, PIQA_FMT))
    fields = [(_field(obj, "goal", str, task, data_path, n, PIQA_FMT),
               tuple(_field(obj, k, str, task, data_path, n, PIQA_FMT) for k in ("sol1", "sol2"))) for n, obj in rows]
    inline = all("label" in obj for _, obj in rows)
    labels: list[tuple[int, int]] = []  # (label, line in the labels file or data file)
    if inline:
        labels = [(_field(obj, "label", int, task, data_path, n, PIQA_FMT), n) for n, obj in rows]
        labels_where = data_path
    else:
        if labels_path is None or not labels_path.is_file():
            raise _bad(task, data_path, None, f"no 'label' fields and no labels file {labels_path}", PIQA_FMT)
        labels_where = labels_path
        for lineno, line in enumerate(_read_text(labels_path, task, PIQA_FMT).splitlines(), 1):
            if not line.strip():
                continue
            if line.strip() not in ("0", "1"):
                raise _bad(task, labels_path, lineno, f"label must be 0 or 1, got {line.strip()[:40]!r}", PIQA_FMT)
            labels.append((int(line), lineno))
        if len(labels) != len(rows):
            raise _bad(task, labels_path, None, f"{len(labels)} labels for {len(rows)} items in {data_path}",
                       PIQA_FMT)
    items = []
    for (goal, sols), (label, label_line) in zip(fields, labels, strict=True):
        if label not in (0, 1):
            raise _bad(task, labels_where, label_line, f"label must be 0 or 1, got {label}", PIQA_FMT)
        items.append(MCItem(f"Question: {goal}\nAnswer:", sols, label))
    return items


def _piqa_paths(spec: str) -> tuple[Path, Path | None]:
    if "," in spec:
        data, labels = spec.split(",", 1)
        return Path(data).expanduser(), Path(labels).expanduser()
    data = Path(spec).expanduser()
    for cand in (data.with_name(data.stem + "-labels.lst"), data.with_suffix(".lst")):
        if cand.is_file():
            return data, cand
    return data, data.with_name(data.stem + "-labels.lst")


HELLASWAG_FMT = ("HellaSwag text format: 6 lines per item (context, gold index 0-3, four endings), "
                 "plain or bzip2/gzip-compressed")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow markup out, double spaces collapsed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(spec: str, task: str = "hellaswag") -> list[MCItem]:
    """The 6-line text form (klosax/hellaswag_text_data). Its context joins ctx_a and ctx_b with ctx_b
    left lowercase, where lm-eval capitalises ctx_b; the boundary is not in the file, so the text is
    kept as is. Measured on SmolLM2-135M, first 200 items: acc 0.395 / acc_norm 0.465 as is, 0.405 /
    0.47 with ctx_b capitalised (lm-eval's prompt, which the hf: path builds)."""
    path = Path(spec).expanduser()
    lines = _read_text(path, task, HELLASWAG_FMT).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _bad(task, path, None, "no items (empty file)", HELLASWAG_FMT)
    if lines[0].lstrip().startswith("{"):
        raise _bad(task, path, 1, "looks like JSON lines", HELLASWAG_FMT)
    items = []
    for start in range(0, len(lines), 6):
        block = lines[start:start + 6]
        if len(block) < 6:
            raise _bad(task, path, start + 1, f"incomplete item: {len(block)} of 6 lines (file has {len(lines)} "
                       "lines, not a multiple of 6)", HELLASWAG_FMT)
        gold = block[1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise _bad(task, path, start + 2, f"gold index must be 0-3, got {gold[:40]!r}", HELLASWAG_FMT)
        items.append(MCItem(hellaswag_preprocess(block[0]), tuple(hellaswag_preprocess(e) for e in block[2:6]),
                            int(gold)))
    return items


QUERY_FMT = "JSON lines {query, choices, gold} (llm-foundry format): query a string, choices 2+ strings, gold an index"


def read_query_choices(spec: str, task: str, suffix: str = "") -> list[MCItem]:
    """The llm-foundry {query, choices, gold} files; `suffix` completes the prompt as lm-eval writes it."""
    path = Path(spec).expanduser()
    items = []
    for lineno, obj in _jsonl(path, task, QUERY_FMT):
        query = _field(obj, "query", str, task, path, lineno, QUERY_FMT)
        choices = _field(obj, "choices", list, task, path, lineno, QUERY_FMT)
        gold = _field(obj, "gold", int, task, path, lineno, QUERY_FMT)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise _bad(task, path, lineno, "choices must be a list of at least 2 strings", QUERY_FMT)
        if not 0 <= gold < len(choices):
            raise _bad(task, path, lineno, f"gold {gold} is out of range for {len(choices)} choices", QUERY_FMT)
        items.append(MCItem(query + suffix, tuple(choices), gold))
    return items


LAMBADA_FMT = "LAMBADA format: JSON lines {text}, the last space-separated word is the target"


def lambada_item(text: str) -> LastWordItem | None:
    """lm-eval lambada_openai: context is all but the last word, target is ' ' + last word."""
    if " " not in text.strip():
        return None
    context, last = text.rsplit(" ", 1)
    return LastWordItem(context, " " + last)


def read_lambada(spec: str, task: str = "lambada") -> list[LastWordItem]:
    path = Path(spec).expanduser()
    items = []
    for lineno, obj in _jsonl(path, task, LAMBADA_FMT):
        item = lambada_item(_field(obj, "text", str, task, path, lineno, LAMBADA_FMT))
        if item is None:
            raise _bad(task, path, lineno, "text has no space-separated last word", LAMBADA_FMT)
        items.append(item)
    return items


WIKITEXT_FMT = "plain text (WikiText-2 style), scored as one document"


def read_corpus(spec: str, task: str = "wikitext2") -> list[CorpusItem]:
    path = Path(spec).expanduser()
    text = _read_text(path, task, WIKITEXT_FMT)
    if not text.strip():
        raise _bad(task, path, None, "no text (empty file)", WIKITEXT_FMT)
    first = next(line for line in text.splitlines() if line.strip())
    if first.lstrip().startswith("{"):
        try:
            json.loads(first)
        except json.JSONDecodeError:
            pass
        else:
            line = text.splitlines().index(first) + 1
            raise _bad(task, path, line, "looks like JSON lines, not plain text", WIKITEXT_FMT)
    return [CorpusItem(text)]
