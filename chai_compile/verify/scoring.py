"""Zero-shot scoring as lm-evaluation-harness does it, for any causal LM (original or CHAI).

Everything reduces to one primitive, the log-likelihood of a continuation given a context
(`loglikelihoods`), batched with right padding and sorted by length:

- multiple choice: each answer's log-likelihood; acc = argmax, acc_norm = argmax of the
  log-likelihood divided by the answer's length in UTF-8 bytes (lm-eval divides by len(answer) in
  characters, the same for ASCII text);
- LAMBADA: acc = the greedy (argmax) prediction reproduces every target token; ppl = exp(-mean ll);
- passkey: exact match of greedy decoding (every answer token is the argmax given the prompt), per
  context length and key depth (passkey.py builds the prompts);
- perplexity: a sliding window (HF's recipe) where each window contributes only the tokens the
  previous one did not predict, so every token after the first is scored once.

Tokenisation happens once per task (`prepare`) so the original and each CHAI model see identical
requests.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from chai_compile.device_map import input_device
from chai_compile.verify.passkey import build_prompts, passkey_metrics
from chai_compile.verify.tasks import MCItem, Task


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class Prepared:
    """A task turned into token requests (model independent; reused for every model compared)."""

    task: Task
    requests: list[Request]
    items: list[Any]
    meta: dict[str, Any]


# ---- tokenisation -------------------------------------------------------------------------------

def _encode(tokenizer: Any, text: str) -> list[int]:
    # lm-eval scores causal LMs without special tokens (no BOS) unless the model needs one
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_token(tokenizer: Any) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
    """lm-eval's `_encode_pair`: trailing spaces move to the continuation, which is the tail of the
    whole string's tokens (so merges across the boundary tokenise as in running text)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return Request((_prefix_token(tokenizer),), tuple(_encode(tokenizer, continuation)))
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont:  # the continuation merged into the context's last token; score it on its own
        cont = _encode(tokenizer, continuation)
    return Request(tuple(ctx), tuple(cont))


def model_max_length(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def perplexity_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) per window: windows of `max_length` start every `stride` tokens;
    each scores the tokens after the previous window's end (the first window from token 1). A window
    starts at most at the previous end - 1, so with stride == max_length every scored token still has
    context (lm-eval's rolling windows) instead of HF's recipe silently dropping one token per window."""
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride <= max_length, got {max_length}, {stride}")
    windows = []
    prev_end = 1  # token 0 has no context and is never predicted
    begin = 0
    while prev_end < n_tokens:
        begin = min(begin, prev_end - 1)
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return windows


def _encode_prefix(tokenizer: Any, text: str, needed: int) -> list[int]:
    """The first `needed` tokens of `text`, tokenising only a prefix cut at a line end (with --limit a
    whole corpus would cost seconds for a few windows). Tokens well before the cut are those of the
    whole text; the surplus past `needed` absorbs any boundary effect."""
    chars = needed * 8
    while chars < len(text):
        cut = text.find("\n", chars)
        if cut < 0:
            break
        ids = _encode(tokenizer, text[:cut + 1])
        if len(ids) >= needed + 64:
            return ids[:needed]
        chars *= 2
    return _encode(tokenizer, text)


def prepare(task: Task, tokenizer: Any, model: nn.Module | LogitsBackend, limit: int | None = None,
            window: int | None = None, stride: int | None = None) -> Prepared:
    """Tokenise `task` for `model`'s context length; `limit` is items, or windows for perplexity."""
    max_len = model.max_length if not isinstance(model, nn.Module) else model_max_length(model)
    items = task.limited(limit)
    meta: dict[str, Any] = {"max_length": max_len}
    if task.kind == "multiple_choice":
        reqs = [encode_pair(tokenizer, it.context, it.delimiter + ch) for it in items for ch in it.choices]
    elif task.kind == "last_word":
        reqs = [encode_pair(tokenizer, it.context, it.target) for it in items]
    elif task.kind == "passkey":
        pairs, facts = build_prompts(items, tokenizer, max_len, task.explicit_lengths)
        reqs = [encode_pair(tokenizer, prompt, answer) for prompt, answer in pairs]
        meta.update(facts)
    else:
        win = min(task.window or window or 1024, max_len)
        step = min(stride or win // 2, win)
        text = "".join(it.text for it in items)
        ids = _encode_prefix(tokenizer, text, win + step * limit + 1) if limit else _encode(tokenizer, text)
        wins = perplexity_windows(len(ids), win, step)
        if limit is not None:
            wins = wins[:limit]
        reqs = [Request(tuple(ids[b:t]), tuple(ids[t:e])) for b, e, t in wins]
        meta.update(window=win, stride=step, corpus_tokens=len(ids), windows=len(wins))
    return Prepared(task, reqs, items, meta)


# ---- backends ------------------------------------------------------------------------------------

@runtime_checkable
class LogitsBackend(Protocol):
    """What the harness needs from a model: logits over a right-padded batch.

    The PyTorch model is one backend (`TorchBackend`); an ONNX Runtime session, or any other engine,
    is another: implement `logits` (return a torch tensor or a numpy array) and `max_length`.
    """

    name: str
    max_length: int

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int) -> Any:
        """[B, T - first, V] logits of positions first..T-1 (ids and mask are [B, T] int64 on CPU).

        `first` lets a backend skip the LM head for positions that predict no scored token; one that
        cannot may return all T positions ([B, T, V]) instead."""
        ...


class TorchBackend:
    """A Hugging Face causal LM (original or CHAI-rewritten) as a logits backend."""

    def __init__(self, model: nn.Module, name: str = "torch") -> None:
        self.model = model
        self.name = name
        self.max_length = model_max_length(model)
        self.device = input_device(model)  # not `meta` when offloaded
        self._keep_ok = _accepts_logits_to_keep(model)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask.to(self.device), "use_cache": False}
        if self._keep_ok:  # the LM head is the largest matmul on small models: only where needed
            kwargs["logits_to_keep"] = torch.arange(first, input_ids.shape[1], device=self.device)
        out = self.model(input_ids=input_ids.to(self.device), **kwargs).logits
        return out if self._keep_ok else out[:, first:]


def as_backend(model: nn.Module | LogitsBackend) -> LogitsBackend:
    """An nn.Module is wrapped in a TorchBackend; anything with `logits` and `max_length` is used as is."""
    if isinstance(model, nn.Module):
        return TorchBackend(model)
    if not callable(getattr(model, "logits", None)) or not isinstance(getattr(model, "max_length", None), int):
        raise TypeError(f"{type(model).__name__} is neither an nn.Module nor a LogitsBackend (logits, max_length)")
    return model


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ---- the primitive --------------------------------------------------------------------------

@torch.no_grad()
def loglikelihoods(model: nn.Module | LogitsBackend, requests: list[Request], batch_size: int = 8,
                   max_length: int | None = None, pad_id: int = 0,
                   progress: str | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy match) per request, in request order.

    Inputs are (context + continuation)[-(max_length+1):][:-1] as in lm-eval, right-padded; the
    longest come first so a batch that does not fit fails at once. Only the positions that predict
    continuation tokens are asked of the backend.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    backend = as_backend(model)
    max_length = max_length or backend.max_length
    rows = []
    for i, r in enumerate(requests):
        full = (r.context + r.continuation)[-(max_length + 1):]
        cont = r.continuation[-(len(full) - 1):] if len(r.continuation) >= len(full) else r.continuation
        rows.append((i, full[:-1], cont))
    rows.sort(key=lambda x: (-len(x[1]), x[0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = tqdm(total=len(rows), desc=progress, disable=None if progress else True, leave=False, unit="req")
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        width = max(len(inp) for _, inp, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (_, inp, _) in enumerate(batch):
            ids[j, : len(inp)] = torch.tensor(inp)
            mask[j, : len(inp)] = 1
        # logits at position p predict token p+1: continuation k of a row is predicted at len-n+k
        starts = [len(inp) - len(cont) for _, inp, cont in batch]
        first = min(starts)
        logits = torch.as_tensor(backend.logits(ids, mask, first))
        offset = first if logits.shape[1] == width - first else 0  # a backend may return every position
        for j, (i, _inp, cont) in enumerate(batch):
            a = starts[j] - offset
            lp = torch.log_softmax(logits[j, a:a + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            ll = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all().item())
            out[i] = (ll, greedy)
        bar.update(len(batch))
    bar.close()
    return out


# ---- task scoring ------------------------------------------------------------------------------

def _stderr(p: float, n: int) -> float:
    # lm-eval's sample standard error of a mean of 0/1 outcomes
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def mc_metrics(items: list[MCItem], lls: list[float]) -> dict[str, Any]:
    """acc and acc_norm from per-choice log-likelihoods (flattened in item, choice order)."""
    preds, preds_norm = [], []
    pos = 0
    for it in items:
        scores = lls[pos:pos + len(it.choices)]
        pos += len(it.choices)
        norm = [s / max(len(c.encode("utf-8")), 1) for s, c in zip(scores, it.choices, strict=True)]
        preds.append(max(range(len(scores)), key=scores.__getitem__))  # first max, like np.argmax
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    n = len(items)
    acc = sum(p == it.gold for p, it in zip(preds, items, strict=True)) / n
    acc_norm = sum(p == it.gold for p, it in zip(preds_norm, items, strict=True)) / n
    return {"n": n, "acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr(acc_norm, n), "predictions": preds, "predictions_norm": preds_norm}


def score(model: nn.Module | LogitsBackend, prepared: Prepared, tokenizer: Any, batch_size: int = 8,
          label: str = "") -> dict[str, Any]:
    """Run one prepared task on one model; metrics plus wall time. `predictions*` are per item."""
    task = prepared.task
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    res = loglikelihoods(model, prepared.requests, batch_size, prepared.meta["max_length"], pad,
                         progress=f"{task.name} {label}".strip())
    wall = time.perf_counter() - t0
    tokens = sum(len(r.context) + len(r.continuation) for r in prepared.requests)
    if task.kind == "multiple_choice":
        out = mc_metrics(prepared.items, [ll for ll, _ in res])
    elif task.kind == "passkey":
        out = passkey_metrics(prepared.items, prepared.meta["_item_lengths"], [g for _, g in res])
    elif task.kind == "last_word":
        n = len(res)
        acc = sum(g for _, g in res) / n
        out = {"n": n, "acc": acc, "acc_stderr": _stderr(acc, n),
               "ppl": math.exp(-sum(ll for ll, _ in res) / n), "predictions": [int(g) for _, g in res]}
    else:
        scored = sum(len(r.continuation) for r in prepared.requests)
        nll = -sum(ll for ll, _ in res)
        out = {"n": prepared.meta["windows"], "tokens": scored, "nll": nll, "ppl": math.exp(nll / scored),
               **{k: prepared.meta[k] for k in ("window", "stride", "corpus_tokens")}}
    out.update(wall_s=round(wall, 3), tokens_forwarded=tokens)
    return out
