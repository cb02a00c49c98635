"""End-to-end reconstruction: the refit parameters of every clustered layer, trained together so the
CHAI model's next-token distributions match the original's on calibration windows.

The layer-local refits (shared queries, closed-form W_o) each match one layer's output on that layer's
inputs; errors still compound through the depth of the model. Distillation corrects what they leave:
only the parameters a plan already carries are trained (each clustered layer's Q projection rows of
its representatives and its W_o), everything else stays frozen, and the loss is KL(original || CHAI)
of the next-token distributions. The original is the same model with identity sources and no refits,
so no second copy of the weights is held. Windows held out from training (the planner's scoring
windows) decide which step's weights are kept: the best held-out KL, or none when no step beats the
starting point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from chai_compile.plan.shared_scores import SharedScoresAttention


@contextmanager
def _original(modules: Sequence[SharedScoresAttention]) -> Iterator[None]:
    """The planning model as the original: identity sources, no refit weights (restored on exit)."""
    saved = [(m.source, m.q_weight, m.q_bias, m.o_weight) for m in modules]
    for m in modules:
        m.source, m.q_weight, m.q_bias, m.o_weight = list(range(m.num_heads)), None, None, None
    try:
        yield
    finally:
        for m, (src, qw, qb, ow) in zip(modules, saved, strict=True):
            m.source, m.q_weight, m.q_bias, m.o_weight = src, qw, qb, ow


def _trainable(m: SharedScoresAttention) -> list[torch.Tensor]:
    """Make m's refit tensors leaves that require grad (starting from the layer-local refits, if any)."""
    p = m.p
    q_w = p.q_weight if m.q_weight is None else m.q_weight
    q_b = p.q_bias if m.q_weight is None else m.q_bias
    o_w = p.o_weight if m.o_weight is None else m.o_weight
    m.q_weight = q_w.detach().clone().requires_grad_(True)
    m.q_bias = None if q_b is None else q_b.detach().clone().requires_grad_(True)
    m.o_weight = o_w.detach().clone().requires_grad_(True)
    m.refit_heads = sorted(set(m.source))  # only representatives' Q rows are ever read
    return [t for t in (m.q_weight, m.q_bias, m.o_weight) if t is not None]


def _kl(model: nn.Module, modules: Sequence[SharedScoresAttention], ids: torch.Tensor) -> torch.Tensor:
    """Mean KL(original || current) per predicted token on one batch; differentiable in the refit tensors."""
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad(), _original(modules):
        ref = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    lp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    return (ref.exp() * (ref - lp)).sum(-1).mean()


def _snapshot(modules: Sequence[SharedScoresAttention]) -> list[tuple]:
    return [(*(None if t is None else t.detach().clone() for t in (m.q_weight, m.q_bias, m.o_weight)),
             list(m.refit_heads)) for m in modules]


def distill(model: nn.Module, modules: Sequence[SharedScoresAttention], train: torch.Tensor, held_out: torch.Tensor,
            batch_size: int, steps: int, lr: float = 5e-5, evals: int = 5,
            progress: bool = True) -> dict:
    """Train the clustered layers' refit tensors on `train` windows; keep the step with the best held-out KL.

    Returns what it measured: held-out KL before, after each evaluation, the step kept (0: none kept,
    every refit tensor is then left as it was).
    """
    todo = [m for m in modules if m.source != list(range(m.num_heads))]
    if not todo or steps < 1 or len(train) == 0:
        return {"steps": 0, "kept_step": 0, "layers": 0}

    def held_kl() -> float:
        with torch.no_grad():
            return sum(_kl(model, modules, held_out[i : i + batch_size]).item()
                       for i in range(0, len(held_out), batch_size)) / max(1, -(-len(held_out) // batch_size))

    start = _snapshot(todo)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        params = [t for m in todo for t in _trainable(m)]
        best_kl, best_step, best = held_kl(), 0, start
        curve = [{"step": 0, "held_out_kl": best_kl}]
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(0)
        every = max(1, steps // evals)
        for step in tqdm(range(1, steps + 1), desc="distill", unit="step", disable=not progress):
            idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)
            opt.zero_grad(set_to_none=True)
            _kl(model, modules, train[idx]).backward()
            opt.step()
            if step % every == 0 or step == steps:
                kl = held_kl()
                curve.append({"step": step, "held_out_kl": kl})
                if kl < best_kl:
                    best_kl, best_step, best = kl, step, _snapshot(todo)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for m, (q_w, q_b, o_w, heads) in zip(todo, best, strict=True):
        m.q_weight, m.q_bias, m.o_weight, m.refit_heads = q_w, q_b, o_w, heads
    return {"steps": steps, "lr": lr, "kept_step": best_step, "layers": len(todo), "curve": curve}
