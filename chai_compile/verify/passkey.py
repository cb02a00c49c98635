"""Passkey retrieval: a synthetic long-context task (a 5-digit key hidden in filler text, asked for at the end).

Items are generated deterministically from a seed: for every context length and key depth (the fraction of
the filler before the key) `samples` keys. The prompt is built per tokenizer so that prompt plus answer
is the stated number of tokens. Scoring is exact match of greedy decoding: the answer's digits are the
model's argmax at every answer position given the prompt, which is what greedy decoding would print, and
needs only one forward pass per item (so ONNX backends score it too).

The filler is three fixed sentences, cycled (written for this project, no evaluation or calibration text), so
the only information in the context is the key itself: a model that keeps the key's tokens finds it, one
whose heads evict the middle of the context does not.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chai_compile.errors import ChaiError, TaskError

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_SAMPLES = 5
DEFAULT_SEED = 1234
MIN_LENGTH = 64  # instructions, key sentence and question take about 50 tokens

HEADER = ("A pass key is hidden somewhere in the long text below. Read carefully, find the pass key and "
          "remember it, because you will be asked for it at the end.\n\n")
# Filler sentences, cycled: whole sentences are the unit, so a key lands close to its depth even in short
# contexts and the prompt comes within one sentence of its length.
FILLER = ("The morning was quiet and the lake was still. ", "A few boats rested by the wooden pier. ",
          "People walked along the shore and talked about the weather. ")
KEY_SENTENCE = "The pass key is {key}. Remember it: {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyItem:
    length: int  # target tokens of prompt plus answer (capped at the model's positions when scored)
    depth: float  # fraction of the filler placed before the key
    key: str
    sample: int


def passkey_items(lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
                  samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED) -> list[PasskeyItem]:
    """Sample-major order (every length x depth cell once, then again), so --limit N covers the grid evenly."""
    for n in lengths:
        if n < MIN_LENGTH:
            raise TaskError(f"passkey: a context of {n} tokens is too short for the prompt",
                            value=n, fix=f"pass lengths of at least {MIN_LENGTH} tokens")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise TaskError("passkey: a depth is a fraction of the context in [0, 1]", value=d,
                            fix="pass depths such as 0.1,0.5,0.9")
    rng = random.Random(seed)  # one stream, drawn in item order: the same seed gives the same keys
    return [PasskeyItem(n, d, str(rng.randint(10000, 99999)), s)
            for s in range(samples) for n in lengths for d in depths]


def parse_lengths(text: str, option: str, error: type[ChaiError] = TaskError) -> tuple[int, ...]:
    """'1024,2k,4K' -> (1024, 2048, 4096)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        try:
            out.append(int(p[:-1]) * 1024 if p.endswith("k") else int(p))
        except ValueError:
            raise error(f"{option} expects a comma list of token counts", value=text,
                            fix=f"e.g. {option} 1024,2048 or {option} 4k,8k") from None
        if out[-1] < 1:
            raise error(f"{option}: a token count must be >= 1", value=text, fix=f"e.g. {option} 4096,8192")
    if not out:
        raise error(f"{option} is empty", value=text, fix=f"e.g. {option} 4096,8192")
    return tuple(dict.fromkeys(out))


def check_lengths(lengths: Sequence[int], max_length: int, option: str,
                  error: type[ChaiError] = TaskError) -> None:
    """A stated context longer than the model's positions would silently be truncated: refuse it."""
    over = [n for n in lengths if n > max_length]
    if over:
        raise error(f"{option}: {over[0]} tokens is above the model's {max_length} positions", value=over[0],
                        fix=f"pass lengths up to {max_length}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptBuilder:
    """Builds each item's prompt for one tokenizer, to the item's token length."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # per-unit cost measured inside running text (merges across unit boundaries included)
        self.unit_tokens = len(_encode(tokenizer, "".join(FILLER) * 8)) / (8 * len(FILLER))

    def text(self, item: PasskeyItem, units: int) -> tuple[str, str]:
        """(text before the key, whole prompt) for `units` filler sentences."""
        before = round(item.depth * units)
        filler = [FILLER[i % len(FILLER)] for i in range(units)]
        head = HEADER + "".join(filler[:before])
        return head, head + KEY_SENTENCE.format(key=item.key) + "".join(filler[before:]) + QUESTION

    def build(self, item: PasskeyItem, length: int) -> tuple[str, str, dict[str, float | int]]:
        """(prompt, answer, facts): prompt + answer fit in `length` tokens, as close to it as whole filler
        sentences allow; facts give the real token count and the key's token position."""
        answer = " " + item.key
        fixed = len(_encode(self.tokenizer, HEADER + KEY_SENTENCE.format(key=item.key) + QUESTION + answer))
        units = max(0, int((length - fixed) / self.unit_tokens) + 2)  # from above: the estimate can be short
        while True:
            head, prompt = self.text(item, units)
            total = len(_encode(self.tokenizer, prompt + answer))
            if total <= length or units == 0:
                break
            units -= 1
        if total > length:
            raise TaskError(f"passkey: a context of {length} tokens is too short for the prompt ({total} tokens)",
                            value=length, fix=f"pass lengths of at least {total} tokens")
        key_at = len(_encode(self.tokenizer, head))
        return prompt, answer, {"tokens": total, "key_token": key_at, "key_fraction": key_at / total}


def build_prompts(items: Sequence[PasskeyItem], tokenizer: Any, max_length: int,
                  explicit: bool) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(prompt, answer) per item and the task facts for the report. Default lengths above the model's
    positions are capped to them; lengths the user stated are refused there."""
    if explicit:
        check_lengths([it.length for it in items], max_length, "--passkey-lengths")
    builder = PromptBuilder(tokenizer)
    pairs, lengths, facts = [], [], []
    for it in items:
        n = min(it.length, max_length)
        prompt, answer, f = builder.build(it, n)
        pairs.append((prompt, answer))
        lengths.append(n)
        facts.append(f)
    # underscored: per-item facts for scoring and tests, kept out of the report's task_info
    return pairs, {"lengths": sorted(set(lengths)), "depths": sorted({it.depth for it in items}),
                   "prompt_tokens": [min(f["tokens"] for f in facts), max(f["tokens"] for f in facts)],
                   "_item_lengths": lengths, "_facts": facts}


def passkey_metrics(items: Sequence[PasskeyItem], lengths: Sequence[int], hits: Sequence[bool]) -> dict[str, Any]:
    """acc overall, per (effective) length, per depth and per length x depth cell."""
    def acc(sel: list[int]) -> float:
        return sum(hits[i] for i in sel) / len(sel)

    idx = range(len(items))
    by_len = sorted(set(lengths))
    by_depth = sorted({it.depth for it in items})
    cells = {str(n): {str(d): acc(sel) for d in by_depth
                      if (sel := [i for i in idx if lengths[i] == n and items[i].depth == d])}
             for n in by_len}
    return {
        "n": len(items), "acc": acc(list(idx)),
        "by_length": {str(n): acc([i for i in idx if lengths[i] == n]) for n in by_len},
        "by_depth": {str(d): acc([i for i in idx if items[i].depth == d]) for d in by_depth},
        "by_cell": cells,
        "predictions": [int(h) for h in hits],
    }
