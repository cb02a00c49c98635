"""Calibration data: text files, JSONL, Python strings, or the built-in offline corpus -> token windows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chai_compile.choices import BUILTIN_CALIBRATION
from chai_compile.errors import CalibrationError

BUILTIN = BUILTIN_CALIBRATION


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [samples, seq_len]
    source: str
    sha256: str  # of the token windows: identifies the exact calibration input

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def builtin_corpus() -> list[str]:
    """English prose that ships with every CPython: the language reference topics (offline, fixed)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_documents(source: str | Path | Sequence[str], text_field: str = "text") -> tuple[list[str], str]:
    """Return (documents, description). A str/Path is a .txt or .jsonl file or `builtin`."""
    if not isinstance(source, str | Path):
        docs = [d for d in source if isinstance(d, str) and d.strip()]
        if not docs:
            raise CalibrationError("calibration list holds no non-empty strings", fix="pass some text")
        return docs, f"python-list[{len(docs)}]"
    if str(source) == BUILTIN:
        return builtin_corpus(), "builtin:python-language-reference"
    path = Path(source)
    if not path.is_file():
        raise CalibrationError("calibration file not found", value=str(path),
                               fix="pass a .txt or .jsonl file, or --calib builtin")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:  # replacing bytes would calibrate on U+FFFD noise without a word
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: byte {e.start} is "
                               f"0x{e.object[e.start]:02x}", fix="convert it to UTF-8, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise CalibrationError("calibration file is empty", value=str(path), fix="pass a file with text in it")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationError(f"{path} line {n} is not JSON",
                                       fix="JSONL needs one JSON object per line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise CalibrationError(f"{path} line {n} has no string field {text_field!r}",
                                       fix="choose the field with --text-field")
            docs.append(rec[text_field])
        return docs, str(path)
    # Plain text: blank-line separated paragraphs keep documents apart.
    return [p for p in text.split("\n\n") if p.strip()], str(path)


def build_calibration(
    tokenizer,
    source: str | Path | Sequence[str] = BUILTIN,
    samples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    min_len: int = 5,
    text_field: str = "text",
) -> CalibrationSet:
    """Tokenize the documents into one stream and take `samples` non-overlapping windows at seeded offsets.

    Each window starts with BOS when the tokenizer has one, as real prompts do: the first tokens'
    attention (the paper's online features) depends on it.
    """
    if samples < 1:
        raise CalibrationError("--samples must be at least 1", value=samples)
    if seq_len < min_len:
        raise CalibrationError(f"--seq-len must be at least {min_len} tokens (the first-N feature window)",
                               value=seq_len, fix=f"use --seq-len {max(min_len, 16)} or more")
    docs, desc = read_documents(source, text_field)
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    body = seq_len - (1 if bos is not None else 0)
    available = len(stream) // body
    if available < 1:
        raise CalibrationError(
            f"calibration text has {len(stream)} tokens, fewer than one sequence of {seq_len}",
            value=desc, fix="pass more text or lower --seq-len",
        )
    n = min(samples, available)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(available, generator=g)[:n].sort().values.tolist()
    rows = []
    for s in slots:
        window = stream[s * body : (s + 1) * body]
        rows.append(([bos] if bos is not None else []) + window)
    ids = torch.tensor(rows, dtype=torch.long)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return CalibrationSet(input_ids=ids, source=desc, sha256=digest)


def recall_passage(seq_len: int) -> int:
    """Tokens of the passage (BOS included) in a `seq_len` recall window; the repeat fills the rest. The copy
    distance (3/4 of the window) lies beyond every span a window of that length can exercise (span windows
    are powers of two below seq_len, so at most half of it), so no span reaches back to the copied passage."""
    return 3 * seq_len // 4 + 1


def build_recall(tokenizer, source: str | Path | Sequence[str] = BUILTIN, samples: int = 2, seq_len: int = 2048,
                 seed: int = 1, text_field: str = "text") -> CalibrationSet:
    """Windows of `seq_len` tokens made of a passage, then the start of the same passage again.

    Predicting the repeat means copying from `recall_passage(seq_len) - 1` tokens back, so a head that
    retrieves from far away (what passkey and long-document questions need) shows up in the KL and in the
    kept mass of the repeated rows when it is cut to a short span; on running text alone such heads cost
    almost nothing and a span planner would bound them. The passages come from the calibration source,
    never from an evaluation set.
    """
    passage = build_calibration(tokenizer, source, samples, recall_passage(seq_len), seed, text_field=text_field)
    start = 1 if tokenizer.bos_token_id is not None else 0  # the repeat carries no second BOS
    ids = torch.cat([passage.input_ids, passage.input_ids[:, start:]], dim=1)[:, :seq_len]
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return CalibrationSet(input_ids=ids, source=f"{passage.source} (passage repeated)", sha256=digest)
