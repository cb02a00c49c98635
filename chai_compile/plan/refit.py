"""Reconstruction after the choice: refit cheap parameters so the CHAI model keeps the original's function.

- Shared queries: each representative's Q projection rows are fitted (Adam, everything else frozen)
  to minimise the KL divergence from every member's original attention distribution to the shared
  one, on the original model's hidden states.
- W_o: layer after layer, the output projection is refit in closed form (ridge toward the original
  W_o) so the CHAI layer's output matches the original attention's output on the same hidden states,
  the CHAI model's own; earlier layers' refits are in place when a later layer is fitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from chai_compile.device_map import input_device
from chai_compile.plan.shared_scores import SharedScoresAttention


class _Stop(Exception):
    """Ends a forward pass once the layer being fitted has been seen."""


def _merged(mod: SharedScoresAttention) -> dict[int, list[int]]:
    """Representative -> heads that use its scores, for representatives shared by more than themselves."""
    groups: dict[int, list[int]] = {}
    for h, r in enumerate(mod.source):
        groups.setdefault(r, []).append(h)
    return {r: hs for r, hs in groups.items() if len(hs) > 1}


def _run_until(model: nn.Module, mod: SharedScoresAttention, windows: torch.Tensor, batch_size: int,
               capture) -> None:
    """Forward every window up to `mod`'s layer, calling capture there."""
    device = input_device(model)

    def hook(m, x, pe, probs, v, heads, y):
        capture(x, pe, probs, v, heads, y)
        raise _Stop

    mod.capture = hook
    try:
        for i in range(0, len(windows), batch_size):
            try:
                with torch.no_grad():
                    model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        mod.capture = None


def refit_queries(model: nn.Module, modules: Sequence[SharedScoresAttention], windows: torch.Tensor,
                  batch_size: int, steps: int = 150, lr: float = 1e-3, progress: bool = True) -> int:
    """Fit each shared representative's Q rows to its members' distributions; returns how many were fitted.

    Hidden states come from one pass of the original model (identity sources, no refits), so each
    layer's targets are the original attention distributions on the original stream.
    """
    todo = [m for m in modules if _merged(m)]
    if not todo:
        return 0
    saved = [list(m.source) for m in modules]
    inputs: dict[int, list] = {m.layer: [] for m in todo}

    def capture(mod, x, pe, *rest) -> None:
        if mod.layer in inputs:
            inputs[mod.layer].append((x, pe))

    device = input_device(model)
    for m in modules:
        m.source, m.capture = list(range(m.num_heads)), capture
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        for m, src in zip(modules, saved, strict=True):
            m.source, m.capture = src, None
    fitted = 0
    for m in tqdm(todo, desc="refit shared queries", unit="layer", disable=not progress):
        with m.live():  # outside any forward: offloaded weights are loaded for this layer alone
            fitted += _fit_layer(m, _merged(m), inputs.pop(m.layer), steps, lr)
    return fitted


def _fit_layer(m: SharedScoresAttention, groups: dict[int, list[int]], batches: list, steps: int,
               lr: float, rows_per_window: int = 64) -> int:
    """Adam on the representatives' Q rows: KL(member's original distribution || shared) on sampled query rows."""
    d, p = m.head_dim, m.p
    reps = list(groups)
    idx = torch.cat([torch.arange(r * d, (r + 1) * d) for r in reps]).to(p.q_weight.device)
    data = []
    gen = torch.Generator().manual_seed(m.layer)
    with torch.no_grad():
        for x, pe in batches:
            b, t, _ = x.shape
            rows = torch.randperm(t, generator=gen)[: min(rows_per_window, t)].sort().values.to(x.device)
            probs, _ = m.probabilities(x, pe, p.q_weight, p.q_bias)  # original distributions, every head
            k = m.keys(x, pe)[:, reps].float()  # [B, reps, T, d]
            targets = [probs[:, heads][:, :, rows] for heads in groups.values()]  # [B, members, S, T] each
            causal = torch.arange(t, device=x.device)[None, :] <= rows[:, None]  # [S, T]
            data.append((x[:, rows], pe, rows, k, targets, causal))
    w = p.q_weight[idx].detach().clone().float().requires_grad_(True)
    bias = None if p.q_bias is None else p.q_bias[idx].detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([t for t in (w, bias) if t is not None], lr=lr)
    lowest = torch.finfo(torch.float32).min
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.zeros((), device=w.device)
        for xs, pe, rows, k, targets, causal in data:
            b, s, _ = xs.shape
            q = nn.functional.linear(xs.float(), w, bias).view(b, s, len(reps), d).transpose(1, 2) * m.q_scale
            q = m.rotate(q, pe, rows)
            logp = (torch.matmul(q, k.transpose(-1, -2)) * m.scale).masked_fill(~causal, lowest).log_softmax(-1)
            for j, target in enumerate(targets):
                kl = target * (target.clamp_min(1e-30).log() - logp[:, j : j + 1])
                loss = loss + kl.sum() / (b * s)
        (loss / len(data)).backward()
        opt.step()
    q_w = p.q_weight.detach().clone()
    q_b = None if p.q_bias is None else p.q_bias.detach().clone()
    with torch.no_grad():
        q_w[idx] = w.to(q_w.dtype)
        if q_b is not None:
            q_b[idx] = bias.to(q_b.dtype)
    m.q_weight, m.q_bias = q_w, q_b
    m.refit_heads = sorted(reps)
    return len(reps)


def refit_output(model: nn.Module, modules: Sequence[SharedScoresAttention], windows: torch.Tensor,
                 batch_size: int, ridge: float = 1e-3, progress: bool = True) -> int:
    """Closed-form W_o per clustered layer, in layer order; returns how many layers were refit."""
    todo = [m for m in modules if m.source != list(range(m.num_heads))]
    for m in tqdm(todo, desc="refit W_o", unit="layer", disable=not progress):
        n = m.num_heads * m.head_dim
        gram = torch.zeros(n, n, dtype=torch.float64)
        cross = torch.zeros(n, m.p.o_weight.shape[0], dtype=torch.float64)

        def capture(x, pe, probs, v, heads, y, m=m, n=n, gram=gram, cross=cross):
            target = m.original_output(x, pe)
            if m.p.o_bias is not None:
                target = target - m.p.o_bias
            o = heads.reshape(-1, n).double().cpu()
            gram.add_(o.t() @ o)
            cross.add_(o.t() @ target.reshape(-1, target.shape[-1]).double().cpu())

        _run_until(model, m, windows, batch_size, capture)
        lam = ridge * gram.diagonal().mean()
        with m.live():
            w0 = m.p.o_weight.detach().double().cpu().t()  # [n, hidden]
            solved = torch.linalg.solve(gram + lam * torch.eye(n, dtype=torch.float64), cross + lam * w0)
            m.o_weight = solved.t().to(m.p.o_weight.dtype).to(m.p.o_weight.device).contiguous()
    return len(todo)
