"""Evaluation tasks from Hugging Face datasets (`--task NAME=hf:ID[:CONFIG][@SPLIT]`): each row becomes the
same item, with the same prompt, as a line of the task's local file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chai_compile.errors import TaskError
from chai_compile.verify.task_files import CorpusItem, MCItem, hellaswag_preprocess, lambada_item


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


def read_hf(spec: str, task: str, default: tuple[str, str | None, str]) -> list[Any]:
    """`hf:` or `hf:ID[:CONFIG][@SPLIT]` (`default`: the task's dataset id, config and split); needs the
    `datasets` package and a reachable hub."""
    dataset_id, config, split = _hf_spec(spec, default)
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


def _hf_spec(spec: str, default: tuple[str, str | None, str]) -> tuple[str, str | None, str]:
    rest = spec[3:]
    if not rest:
        return default
    split = default[2]
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
    dataset_id, _, config = rest.partition(":")
    return dataset_id, config or None, split
