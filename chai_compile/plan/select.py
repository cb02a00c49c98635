"""Choose which K heads to drop by measured loss: greedy over the whole model under one KV budget.

A candidate frees one K head: KV head g of layer l leaves the cache, and every query head that read
it (or shared the scores of a head that did) takes the scores of the kept head whose output differs
least from its own, measured on calibration tokens through W_o (the seed). The candidate's cost is
then measured where it matters: the KL divergence of the model's next-token distributions from the
original's on calibration windows. Each round scores every remaining candidate against the current
plan and accepts the cheapest few (at most one per layer, so accepted drops do not interact inside a
layer); the plan's real KL and perplexity are re-measured after every round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from chai_compile.adapters import ModelAdapter
from chai_compile.device_map import input_device
from chai_compile.plan.shared_scores import SharedScoresAttention

_KL_ROWS = 128  # token rows per block of Scorer.measure: 128 x 49k-vocab floats = 25 MB a temporary


@dataclasses.dataclass
class Round:
    """The plan after one round: K heads dropped so far, KL from the original, calibration perplexity."""

    k_heads_dropped: int
    kl: float
    ppl: float
    accepted: list[tuple[int, int]]  # (layer, kv head)


class Scorer:
    """KL and perplexity of the planning model against the original's stored log-probabilities."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.device = input_device(model)
        self.reference = [self._logprobs(b).to(torch.float16) for b in self._batches()]

    def _batches(self) -> list[torch.Tensor]:
        return [self.windows[i : i + self.batch_size] for i in range(0, len(self.windows), self.batch_size)]

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B * (T - 1), V] of ids [B, T]."""
        logits = self.model(input_ids=ids.to(self.device), use_cache=False).logits
        return logits[:, :-1].flatten(0, 1)

    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        return self._logits(ids).float().log_softmax(-1)

    @torch.no_grad()
    def measure(self) -> tuple[float, float]:
        """(mean KL(original || current) per token, perplexity of the next token)."""
        kl = nll = 0.0
        n = 0
        for ids, ref in zip(self._batches(), self.reference, strict=True):
            logits = self._logits(ids)
            target = ids[:, 1:].flatten().to(logits.device)  # the last layer's device on a spread model
            # In row blocks: full-vocabulary temporaries of a whole batch (B x T x V floats, several of them)
            # cost as much as the forward on a CPU, mostly in page faults; a block's stay small. The sums stay
            # on the device until the batch is done (no sync per block on a GPU).
            sums = torch.zeros(2, dtype=torch.float64, device=logits.device)
            for i in range(0, logits.shape[0], _KL_ROWS):
                lp = logits[i : i + _KL_ROWS].float().log_softmax(-1)
                r = ref[i : i + _KL_ROWS].float()
                sums[0] += (r.exp() * (r - lp)).sum()
                sums[1] -= lp.gather(-1, target[i : i + _KL_ROWS, None]).sum()
            batch_kl, batch_nll = sums.tolist()
            kl, nll, n = kl + batch_kl, nll + batch_nll, n + target.numel()
        return kl / n, math.exp(nll / n)


@torch.no_grad()
def head_errors(model: nn.Module, modules: Sequence[SharedScoresAttention], windows: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """[L, H, H]: mean squared change of head h's contribution to the layer output (through W_o) when it
    uses head r's probabilities instead of its own, on the original model's hidden states."""
    first = modules[0]
    h, d = first.num_heads, first.head_dim
    errors = torch.zeros(len(modules), h, h, dtype=torch.float64)
    tokens = 0

    def capture(mod: SharedScoresAttention, x, pe, probs, v, heads, y) -> None:
        v_per_head = v.repeat_interleave(mod.group, dim=1).float()  # [B, H, T, d]
        o = mod.p.o_weight.float()
        for head in range(h):
            change = torch.matmul(probs - probs[:, head : head + 1], v_per_head[:, head : head + 1])  # [B,H,T,d]
            contrib = torch.matmul(change, o[:, head * d : (head + 1) * d].t())  # [B, H, T, hidden]
            errors[mod.layer, head] += contrib.pow(2).sum(-1).sum((0, 2)).double().cpu()

    for m in modules:
        m.capture = capture
    try:
        device = input_device(model)
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size]
            model(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for m in modules:
            m.capture = None
    return errors / tokens


def reassign(errors: torch.Tensor, kept: set[int], group: int) -> list[int]:
    """Sources for one layer: heads of kept KV groups use their own scores; every other head the kept head
    whose scores change its output least."""
    h = errors.shape[0]
    reps = [r for r in range(h) if r // group in kept]
    return [x if x // group in kept else min(reps, key=lambda r: errors[x, r].item()) for x in range(h)]


def select(model: nn.Module, adapter: ModelAdapter, modules: Sequence[SharedScoresAttention],
           scorer: Scorer, errors: torch.Tensor, *, k_heads_to_drop: int, per_round: int = 4,
           max_ppl: float | None = None, frozen_layers: Sequence[int] = (), progress: bool = True,
           ) -> list[Round]:
    """Drop up to `k_heads_to_drop` K heads greedily by measured KL (stopping early once the calibration
    perplexity would pass `max_ppl`); leaves the chosen sources set on `modules` and returns the rounds."""
    spec = adapter.spec
    kept = [set(range(spec.num_kv_heads)) for _ in range(spec.num_layers)]
    kl, ppl = scorer.measure()
    rounds = [Round(0, kl, ppl, [])]
    dropped = 0

    def apply(layer: int, groups: set[int]) -> None:
        modules[layer].source = reassign(errors[layer], groups, spec.group_size)

    bar = tqdm(total=k_heads_to_drop, desc="plan: drop K heads", unit="head", disable=not progress)
    while dropped < k_heads_to_drop:
        costs = []
        for layer in range(spec.num_layers):
            if layer in frozen_layers or len(kept[layer]) < 2:  # a layer keeps at least one K head
                continue
            for g in sorted(kept[layer]):
                apply(layer, kept[layer] - {g})
                costs.append((scorer.measure()[0], layer, g))
                apply(layer, kept[layer])
        if not costs:
            break
        costs.sort()
        take, layers_taken = [], set()
        for _, layer, g in costs:
            if layer not in layers_taken and len(take) < min(per_round, k_heads_to_drop - dropped):
                take.append((layer, g))
                layers_taken.add(layer)
        accepted = _accept(take, kept, apply, scorer, max_ppl)
        if not accepted:
            break
        dropped += len(accepted)
        bar.update(len(accepted))
        kl, ppl = scorer.measure()
        rounds.append(Round(dropped, kl, ppl, accepted))
        if len(accepted) < len(take):  # the perplexity bound stopped this round
            break
    bar.close()
    return rounds


def _accept(take: list[tuple[int, int]], kept: list[set[int]], apply, scorer: Scorer,
            max_ppl: float | None) -> list[tuple[int, int]]:
    """Apply the round's drops; under a perplexity bound, add them one by one and stop before it is passed."""
    accepted = []
    for layer, g in take:
        kept[layer].discard(g)
        apply(layer, kept[layer])
        if max_ppl is not None and scorer.measure()[1] > max_ppl:
            kept[layer].add(g)
            apply(layer, kept[layer])
            break
        accepted.append((layer, g))
    return accepted
