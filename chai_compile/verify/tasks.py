"""Evaluation task readers: the local files in ../shared/data/eval, user files of the same kinds, HF datasets.

A task name picks a file format and a prompt format (both as lm-evaluation-harness builds them):

- multiple choice (`MCItem`): a context and several answers; each answer is scored as the
  continuation `delimiter + answer` of the context;
- last word (`LastWordItem`, LAMBADA): a context and the final word as target;
- perplexity (`CorpusItem`, WikiText-2): one plain text scored with a sliding window.

`--task NAME=PATH` reads a user file in NAME's format; `--task NAME=hf:ID[:CONFIG][@SPLIT]` (or just
`hf:`) loads a Hugging Face dataset when `datasets` is installed and a hub is reachable. Every
format problem becomes a `TaskError` that names the file, the line and the expected format.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chai_compile.errors import TaskError

Kind = Literal["multiple_choice", "last_word", "perplexity"]


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


@dataclass
class Task:
    name: str
    kind: Kind
    source: str  # file path or hf:... spec, for the report
    items: list[Any] = field(default_factory=list)

    def limited(self, limit: int | None) -> list[Any]:
        """First `limit` items (lm-eval's --limit); perplexity tasks apply the limit to windows instead."""
        if limit is None or self.kind == "perplexity":
            return self.items
        return self.items[:limit]


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


# ---- Hugging Face rows (same prompts as the local files) -----------------------------------

def _gold_from_key(row: dict[str, Any]) -> int:
    return list(row["choices"]["label"]).index(row["answerKey"])


def _hf_hellaswag(row: dict[str, Any]) -> MCItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCItem(hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                  tuple(hellaswag_preprocess(e) for e in row["endings"]), int(row["label"]))


def _hf_copa(row: dict[str, Any]) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]

    def lower_first(s: str) -> str:
        return s[:1].lower() + s[1:]

    return MCItem(row["premise"].strip()[:-1] + f", {connector}", (lower_first(row["choice1"]),
                                                                  lower_first(row["choice2"])), int(row["label"]))


def _hf_boolq(row: dict[str, Any]) -> MCItem:
    answer = row["answer"] if "answer" in row else bool(row["label"])
    return MCItem(f"Passage: {row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), int(answer))


HF_ROW: dict[str, Callable[[dict[str, Any]], Any]] = {
    "piqa": lambda r: MCItem(f"Question: {r['goal']}\nAnswer:", (r["sol1"], r["sol2"]), int(r["label"])),
    "hellaswag": _hf_hellaswag,
    "arc_easy": lambda r: MCItem(f"Question: {r['question']}\nAnswer:", tuple(r["choices"]["text"]),
                                 _gold_from_key(r)),
    "arc_challenge": lambda r: MCItem(f"Question: {r['question']}\nAnswer:", tuple(r["choices"]["text"]),
                                      _gold_from_key(r)),
    "boolq": _hf_boolq,
    "copa": _hf_copa,
    "openbookqa": lambda r: MCItem(r["question_stem"], tuple(r["choices"]["text"]), _gold_from_key(r)),
    "lambada": lambda r: lambada_item(r["text"]),
}


def read_hf(spec: str, task: str) -> list[Any]:
    """`hf:` or `hf:ID[:CONFIG][@SPLIT]`; needs the `datasets` package and a reachable hub."""
    dataset_id, config, split = _hf_spec(spec, task)
    try:
        import datasets  # noqa: F401  (optional dependency)
        from datasets import load_dataset
    except ImportError:
        raise TaskError(f"{task}: {spec} needs the Hugging Face `datasets` package, which is not installed",
                        fix=f"pip install datasets (and have a reachable hub), or pass a local file: "
                            f"--task {task}=PATH") from None
    try:
        rows = load_dataset(dataset_id, config, split=split)
    except Exception as e:  # offline, unknown id, bad split: the library raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TaskError(f"{task}: could not load Hugging Face dataset {dataset_id}"
                        f"{'/' + config if config else ''} split {split}: {first}",
                        fix=f"check that the hub is reachable (HF_HUB_OFFLINE unset), or pass a local file: "
                            f"--task {task}=PATH") from None
    if task == "wikitext2":
        return [CorpusItem("".join(r["text"] for r in rows))]
    items = []
    for i, row in enumerate(rows):
        try:
            item = HF_ROW[task](row)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise TaskError(f"{task}: {dataset_id} row {i}: unexpected fields for {task} ({type(e).__name__}: {e})",
                            fix=f"use a dataset with {task}'s fields, or convert it to a local file") from None
        if item is not None:
            items.append(item)
    return items


def _hf_spec(spec: str, task: str) -> tuple[str, str | None, str]:
    default = TASKS[task].hf
    rest = spec[3:]
    if not rest:
        return default
    split = default[2]
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    dataset_id, _, config = rest.partition(":")
    return dataset_id, config or None, split


# ---- registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    reader: Callable[[str, str], list[Any]]
    default_file: str | None  # relative to the eval data directory
    fmt: str
    hf: tuple[str, str | None, str]  # default Hugging Face dataset id, config, split


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
)}
ALIASES = {"openbook_qa": "openbookqa", "obqa": "openbookqa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge",
           "lambada_openai": "lambada", "wikitext": "wikitext2", "wikitext-2": "wikitext2"}
# `--tasks all`: every task with a file in the shared data.
ALL_TASKS = [n for n, t in TASKS.items() if t.default_file]


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


def load_task(name: str, source: str | None = None, data_dir: str | Path | None = None) -> Task:
    """Read one task: `source` is a path, 'hf:...' or None for the shared data file."""
    name = canonical_name(name)
    spec = TASKS[name]
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
        items = read_hf("hf:" + source[3:] if source != "hf" else "hf:", name)
    else:
        items = spec.reader(source, name)
    if not items:
        raise TaskError(f"{name}: {source} holds no items")
    return Task(name, spec.kind, source, items)


def resolve_tasks(names: list[str], overrides: dict[str, str] | None = None,
                  data_dir: str | Path | None = None) -> list[Task]:
    """Tasks in order: `names` first (user files replace shared ones), then override-only tasks."""
    overrides = {canonical_name(k): v for k, v in (overrides or {}).items()}
    order = [canonical_name(n) for n in names]
    order += [n for n in overrides if n not in order]
    if not order:
        raise TaskError("no tasks selected", fix="pass --tasks piqa,hellaswag,... or --tasks all")
    return [load_task(n, overrides.get(n), data_dir) for n in order]
