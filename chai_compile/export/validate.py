"""Artifact vs PyTorch, like Optimum's validate_model_outputs: logits (prefill, with a past, left padded) and
greedy tokens. A model with bounded span caches is generated from for as long as it takes them to drop tokens.

Two halves so the export can drop the PyTorch model before ONNX Runtime loads the graph (peak memory is
one copy of the weights, not two): `reference` runs the model and keeps only its outputs, `compare`
runs the decoder on the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from chai_compile.adapters import adapter_for
from chai_compile.choices import GREEDY_STEPS, DType
from chai_compile.compat import model_forward
from chai_compile.device_map import cast_in_place, is_dispatched
from chai_compile.export.ort_runner import OrtDecoder

PROMPTS = ("Once upon a time, there was a little girl named Lily. She loved to play",
           "The little dog ran to the park and saw a big red ball. He")
FP32_ATOL = 1e-4
# fp16 graphs are compared with the fp32 PyTorch model: 2% of the largest |logit| (about 20 fp16 ulps at that
# scale). A fixed bound does not fit every model: SmolLM2's fp16 logits sit 0.42 from fp32 (of |logit| <= 31).
FP16_RELATIVE = 0.02
PAST_SPLIT = 3  # the with-past check feeds the last 3 prompt tokens through the cache
PADDING = 2  # left-padding check: row 0 gets 2 pad tokens
EVICTING_STEPS = 8  # greedy steps checked after the largest bounded span cache first drops a token


def greedy_steps(model: nn.Module, prompt: int, steps: int) -> int:
    """`steps`, or more for a model with bounded span caches: enough that the largest one (sinks + window
    tokens) drops tokens for EVICTING_STEPS steps, within the model's positions. The graph's bounded caches
    follow a contract of their own (export/span_graph.py) that only a long enough generation exercises."""
    from chai_compile.export.onnx_export import cache_spec

    bound = cache_spec(model).longest_bound
    if not bound:
        return steps
    need = bound + 1 - prompt + EVICTING_STEPS  # fed tokens (prompt + steps - 1) past the bound
    positions = getattr(model.config, "max_position_embeddings", None) or prompt + need
    return max(steps, min(need, positions - prompt))


def prompt_ids(tokenizer: Any, prompts: tuple[str, ...] = PROMPTS, length: int = 12) -> torch.Tensor:
    """Real prompts cut to one length so batch rows need no padding (the padding path is checked separately)."""
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    n = min(length, *(len(r) for r in rows))
    return torch.tensor([r[:n] for r in rows], dtype=torch.int64)


def torch_greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> np.ndarray:
    from transformers import DynamicCache

    cache = DynamicCache()
    new = []
    with torch.no_grad():
        logits = model_forward(model, cache, input_ids=ids).logits
        for _ in range(steps):
            tok = logits[:, -1].argmax(-1)
            new.append(tok)
            if len(new) == steps:
                break
            logits = model_forward(model, cache, input_ids=tok[:, None]).logits
    return torch.stack(new, 1).numpy()


@dataclasses.dataclass
class Reference:
    """The PyTorch model's outputs on the validation inputs (numpy, so the model itself can be freed)."""

    ids: np.ndarray  # [B, S]
    logits: np.ndarray  # [B, S, V], no padding
    padded_ids: np.ndarray
    padded_mask: np.ndarray
    padded_logits: np.ndarray
    greedy: np.ndarray  # [B, steps]
    # The same model in float64: the truth both fp32 implementations are judged against, and how far
    # the fp32 PyTorch model itself is from it (its rounding over every layer).
    logits64: np.ndarray | None = None
    padded_logits64: np.ndarray | None = None
    torch_fp32_error: float = 0.0


def _padded(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pad_ids = ids.clone()
    pad_ids[0, :PADDING] = pad_id
    mask = torch.ones_like(ids)
    mask[0, :PADDING] = 0
    return pad_ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _owns_weights(module: nn.Module) -> bool:
    return any(t.is_floating_point() for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def _weights_of(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]


@contextlib.contextmanager
def float64_weights(model: nn.Module) -> Iterator[None]:
    """Run `model` in float64 inside the block, with its own weight storage back afterwards.

    A model held in one place is cast one unit at a time while that unit runs (each decoder layer whole,
    and every other module owning weights: embeddings, norms, the head), and each unit gets its original
    tensors back, not a cast copy: the float64 pass then costs one unit's memory, and weights loaded
    memory-mapped stay mapped (a cast back to float32 would allocate a second copy of the model).
    A model spread over devices by accelerate is cast whole in place (its hooks move the weights).
    """
    dtype = next(model.parameters()).dtype
    if is_dispatched(model):
        cast_in_place(model, torch.float64)
        try:
            yield
        finally:
            cast_in_place(model, dtype)
        return
    layers = list(adapter_for(model).decoder_layers())
    inside = {id(m) for layer in layers for m in layer.modules()}
    units = layers + [m for m in model.modules() if id(m) not in inside and _owns_weights(m)]
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its own data)

    def to_float64(unit: nn.Module, args: Any) -> None:
        for t in _weights_of(unit):
            if id(t) not in saved:  # a tied weight is cast once
                saved[id(t)] = (t, t.data)
                t.data = t.data.to(torch.float64)

    def restore(unit: nn.Module, *_: Any) -> None:
        for t in _weights_of(unit):
            if id(t) in saved:
                t.data = saved.pop(id(t))[1]

    handles = [h for unit in units for h in (unit.register_forward_pre_hook(to_float64),
                                             unit.register_forward_hook(restore))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for t, data in saved.values():  # a unit whose forward raised
            t.data = data
        saved.clear()


def reference(model: nn.Module, tokenizer: Any, steps: int = GREEDY_STEPS) -> Reference:
    """Run the fp32 PyTorch model the graph comes from (rewritten or not) on the validation inputs."""
    ids = prompt_ids(tokenizer)
    steps = greedy_steps(model, ids.shape[1], steps)
    pad_ids, pmask, ppos = _padded(ids, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu().numpy()  # on the last layer's device when spread over several
        plogits = model(pad_ids, attention_mask=pmask, position_ids=ppos).logits.float().cpu().numpy()
        greedy = torch_greedy(model, ids, steps)
        with float64_weights(model):
            logits64 = model(ids).logits.cpu().numpy()
            plogits64 = model(pad_ids, attention_mask=pmask, position_ids=ppos).logits.cpu().numpy()
    keep = pmask.numpy().astype(bool)
    error = max(float(np.abs(logits - logits64).max()), float(np.abs(plogits - plogits64)[keep].max()))
    return Reference(ids.numpy(), logits, pad_ids.numpy(), pmask.numpy(), plogits, greedy, logits64, plogits64, error)


def compare(ref: Reference, decoder: OrtDecoder, tokenizer: Any, *, dtype: str = DType.FLOAT32,
            atol: float | None = None) -> dict[str, Any]:
    """Numbers and pass/fail of the decoder against `ref`.

    fp32 graphs are judged against the float64 model: within FP32_ATOL, or within twice the fp32
    PyTorch model's own distance from float64 where rounding over many layers exceeds that (the graph
    may be no less exact than its source). fp16 graphs: relative to the logit scale, against fp32.
    """
    dtype = DType.parse(dtype)  # manifests before one spelling say "fp32"
    fp32 = dtype == DType.FLOAT32 and ref.logits64 is not None
    if atol is None:
        atol = max(FP32_ATOL, 2 * ref.torch_fp32_error) if fp32 else FP16_RELATIVE * float(np.abs(ref.logits).max())
    want, pwant = (ref.logits64, ref.padded_logits64) if fp32 else (ref.logits, ref.padded_logits)
    ids = ref.ids
    b, s = ids.shape
    mask = np.ones((b, s), np.int64)
    pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    got, _ = decoder.step(ids, mask, pos, decoder.empty_cache(b))
    d0 = float(np.abs(got.astype(np.float64) - want).max())
    split = s - PAST_SPLIT
    _, past = decoder.step(ids[:, :split], mask[:, :split], pos[:, :split], decoder.empty_cache(b))
    got2, _ = decoder.step(ids[:, split:], mask, pos[:, split:], past)
    d1 = float(np.abs(got2.astype(np.float64) - want[:, split:]).max())
    ppos = np.clip(np.cumsum(ref.padded_mask, axis=1) - 1, 0, None)
    gotp, _ = decoder.step(ref.padded_ids, ref.padded_mask, ppos, decoder.empty_cache(b))
    dp = float(np.abs(gotp.astype(np.float64) - pwant)[ref.padded_mask.astype(bool)].max())
    steps = ref.greedy.shape[1]
    have = decoder.greedy(ids, steps)
    tokens = ref.greedy
    same = int((tokens == have).all(axis=0).sum()) if tokens.shape == have.shape else 0
    first_diff = next((i for i in range(steps) if not (tokens[:, i] == have[:, i]).all()), None)
    tokens_ok = bool(np.array_equal(tokens, have))
    logits_ok = max(d0, d1, dp) <= atol
    return {
        "atol": atol, "reference": "float64" if fp32 else "float32", "torch_fp32_error": ref.torch_fp32_error,
        "max_abs_diff_past0": d0, "max_abs_diff_past": d1, "max_abs_diff_left_padded": dp,
        "batch": b, "prompt_tokens": s, "greedy_steps": steps, "greedy_identical": tokens_ok,
        "greedy_steps_matching": same, "greedy_first_difference": first_diff,
        "greedy_text": [tokenizer.decode(list(r)) for r in have],
        # fp16 against an fp32 reference may legitimately flip a near-tie token: report it, judge logits only
        "passed": logits_ok and (tokens_ok or dtype != DType.FLOAT32),
    }


def validate(model: nn.Module, decoder: OrtDecoder, tokenizer: Any, *, dtype: str = DType.FLOAT32,
             steps: int = GREEDY_STEPS, atol: float | None = None) -> dict[str, Any]:
    """`reference` then `compare`, for callers that keep the model anyway."""
    return compare(reference(model, tokenizer, steps), decoder, tokenizer, dtype=dtype, atol=atol)
