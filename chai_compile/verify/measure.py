"""What a mapping costs and saves, measured: KV-cache bytes from the real cache tensors, attention FLOPs, time.

Cache bytes come from the tensors the model actually stores after a prefill (and optional decode
steps), through `chai_compile.rewrite.kv_cache_bytes` when the rewrite is installed (it knows the
CHAI cache layout), else by summing the keys and values of the DynamicCache layers. FLOPs are
counted from the mapping's head counts (or the model's, for the original).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from chai_compile.choices import Membership
from chai_compile.compat import model_forward, output_cache
from chai_compile.device_map import input_device
from chai_compile.errors import ValidationFailed
from chai_compile.mapping import ClusterMapping


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def _fallback_cache_bytes(cache: Any) -> dict[str, Any]:
    """Sum the stored key/value tensors of a transformers cache (5.x layers, 4.x lists, or legacy tuples)."""
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        pairs = [(layer[0], layer[1]) for layer in cache]
    per_layer = [{"key_bytes": _tensor_bytes(k), "value_bytes": _tensor_bytes(v)} for k, v in pairs]
    key = sum(p["key_bytes"] for p in per_layer)
    value = sum(p["value_bytes"] for p in per_layer)
    return {"key_bytes": key, "value_bytes": value, "total_bytes": key + value, "per_layer": per_layer}


def cache_bytes(past_key_values: Any) -> dict[str, Any]:
    """Bytes held by a KV cache, from its tensors: key_bytes, value_bytes, total_bytes, per_layer."""
    try:
        from chai_compile.rewrite import kv_cache_bytes
    except ImportError:
        return _fallback_cache_bytes(past_key_values)
    return kv_cache_bytes(past_key_values)


@torch.no_grad()
def measure_kv_cache(model: nn.Module, tokens: int = 512, decode_steps: int = 0, batch: int = 1,
                     seed: int = 0) -> dict[str, Any]:
    """Prefill `tokens` random token ids (the cache size does not depend on content), then greedy-decode
    `decode_steps` tokens; report the cache's measured bytes, per token, and the elapsed times."""
    device = input_device(model)  # not `meta` when offloaded
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, tokens), generator=gen).to(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill_s = time.perf_counter() - t0
    cache = output_cache(out)
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model_forward(model, cache, input_ids=nxt)
        cache = output_cache(out)
    decode_s = time.perf_counter() - t0
    b = cache_bytes(cache)
    stored = batch * (tokens + decode_steps)
    return {
        "prefill_tokens": tokens, "decode_steps": decode_steps, "batch": batch,
        "total_bytes": b["total_bytes"], "key_bytes": b["key_bytes"], "value_bytes": b["value_bytes"],
        "bytes_per_token": b["total_bytes"] / stored,
        "key_bytes_per_token": b["key_bytes"] / stored, "value_bytes_per_token": b["value_bytes"] / stored,
        "per_layer_bytes_per_token": [
            (p["key_bytes"] + p["value_bytes"]) / stored for p in b.get("per_layer", [])
        ],
        "per_layer_bytes": [[p["key_bytes"], p["value_bytes"]] for p in b.get("per_layer", [])],
        "elem_bytes": next(model.parameters()).element_size(),
        "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
    }


@torch.no_grad()
def decode_differences(model: nn.Module, ids: torch.Tensor, splits: tuple[int, ...]) -> tuple[dict[str, float], Any]:
    """Max |logit difference| of cached decoding against the cache-free full forward of `ids`.

    One entry per prefill split point p (prefill ids[:, :p], then the rest in one step) and one for
    token-by-token decode; also returns the token-by-token cache, filled with every token. A layer
    that ignores its cache differs by whole logits here, not by rounding.
    """
    from transformers import DynamicCache

    full = model(input_ids=ids, use_cache=False).logits
    diffs = {}
    for p in splits:
        cache = DynamicCache(config=model.config)
        head = model_forward(model, cache, input_ids=ids[:, :p]).logits
        tail = model_forward(model, cache, input_ids=ids[:, p:]).logits
        diffs[f"split@{p}"] = (torch.cat([head, tail], 1) - full).abs().max().item()
    cache = DynamicCache(config=model.config)
    steps = [model_forward(model, cache, input_ids=ids[:, t : t + 1]).logits for t in range(ids.shape[1])]
    diffs["token_by_token"] = (torch.cat(steps, 1) - full).abs().max().item()
    return diffs, cache


def check_cache_prediction(kv: dict[str, Any], mapping: ClusterMapping,
                           membership: Membership = Membership.STATIC) -> None:
    """Fail when the cache a model really filled differs from what its mapping predicts.

    A rewritten layer that ran without its cache leaves it empty (a "100% saving"); one that stored
    the wrong heads leaves the wrong size. Either must stop verify, not be reported as a saving.
    """
    stored = kv["batch"] * (kv["prefill_tokens"] + kv["decode_steps"])
    predicted = [list(p) for p in mapping.cache_bytes(stored, kv["elem_bytes"], membership, batch=kv["batch"])]
    measured = kv["per_layer_bytes"]
    if measured != predicted:
        bad = next((i for i, p in enumerate(predicted) if i >= len(measured) or measured[i] != p), 0)
        got = measured[bad] if bad < len(measured) else None
        raise ValidationFailed(
            f"the KV cache the CHAI model filled differs from its mapping's prediction at layer {bad}: "
            f"(K, V) bytes measured {got}, predicted {predicted[bad]}",
            fix="install a transformers release in the tested range (docs/compat.md) and report the mismatch")


def head_counts(num_layers: int, num_heads: int, num_kv_heads: int,
                mapping: ClusterMapping | None = None) -> list[tuple[int, int]]:
    """(score heads, K heads) per layer: all of them for the original, the mapping's for CHAI."""
    if mapping is None:
        return [(num_heads, num_kv_heads)] * num_layers
    return [(len(lm.representatives(num_heads)), len(lm.kept_k_heads(num_heads, num_kv_heads)))
            for lm in mapping.layers]


def attention_flops(hidden_size: int, head_dim: int, num_heads: int, counts: list[tuple[int, int]],
                    context: int) -> dict[str, int]:
    """Per token: Q/K projections 2*hidden*d*(q + k) and scores q.K^T 2*d*context*q, summed over layers;
    P.V (2*d*context per query head) is unchanged by CHAI and reported for scale."""
    qk = sum(2 * hidden_size * head_dim * (q + k) for q, k in counts)
    scores = sum(2 * head_dim * context * q for q, _ in counts)
    pv = len(counts) * 2 * head_dim * context * num_heads
    return {"qk_projection": qk, "scores": scores, "pv": pv, "context": context}


def flops_comparison(model: nn.Module, mapping: ClusterMapping | None, context: int) -> dict[str, Any]:
    from chai_compile.adapters import adapter_for

    s = adapter_for(model).spec
    orig = attention_flops(s.hidden_size, s.head_dim, s.num_heads,
                           head_counts(s.num_layers, s.num_heads, s.num_kv_heads), context)
    out: dict[str, Any] = {"original": orig}
    if mapping is not None:
        chai = attention_flops(s.hidden_size, s.head_dim, s.num_heads,
                               head_counts(s.num_layers, s.num_heads, s.num_kv_heads, mapping), context)
        out["chai"] = chai
        out["saving_pct"] = {k: round(100 * (1 - chai[k] / orig[k]), 2) for k in ("qk_projection", "scores")}
        out["saving_pct"]["attention"] = round(
            100 * (1 - (chai["scores"] + chai["pv"]) / (orig["scores"] + orig["pv"])), 2)
    return out
