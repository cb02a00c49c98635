"""Attention capture: per layer and head, the probabilities CHAI clusters on, streamed into Gram matrices.

Two feature kinds per head:
- "first_n": the causal N x N map of the first N tokens of each sequence (the paper's online
  membership features, N = 5);
- "rows": attention rows at sampled query positions over whole calibration sequences.

Features are never stored: for each batch and layer we add F F^T (heads x heads) to a running
Gram matrix. Cosine similarity of the concatenated features over all samples is read off the Gram
matrix, and k-means on the features can run in the exact Euclidean embedding it defines. Memory
is one batch's activations plus L x H x H numbers, whatever the calibration size or model depth.
The model runs its normal forward pass (SDPA or any kernel); forward pre-hooks recompute q and k
for the layer from the attention module's own inputs.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from chai_compile.adapters import ModelAdapter
from chai_compile.device_map import input_device, loaded, peak_memory_mb, reset_peaks


@dataclass
class AttentionStats:
    gram: dict[str, torch.Tensor]  # feature kind -> [layers, heads, heads] float64
    samples: int
    seq_len: int
    first_n: int
    rows_per_sample: int
    timings: dict[str, float] = field(default_factory=dict)

    def cosine(self, kind: str) -> torch.Tensor:
        g = self.gram[kind]
        d = g.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
        return (g / (d.unsqueeze(-1) * d.unsqueeze(-2))).clamp(-1.0, 1.0)


def _row_positions(seq_len: int, rows: int, first_n: int, generator: torch.Generator) -> torch.Tensor:
    """Sampled query positions past the first-N window, always including the last position."""
    lo = min(first_n, seq_len - 1)
    pool = torch.arange(lo, seq_len - 1)
    take = min(rows - 1, pool.numel())
    picked = pool[torch.randperm(pool.numel(), generator=generator)[:take]]
    return torch.cat([picked, torch.tensor([seq_len - 1])]).sort().values


@torch.no_grad()
def capture_attention(
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    first_n: int = 5,
    rows_per_sample: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> AttentionStats:
    model = adapter.model
    spec = adapter.spec
    samples, seq_len = input_ids.shape
    device = input_device(model)  # a dispatched model's hooks move activations to each layer's device
    group = spec.group_size
    scale = adapter.scaling()
    gram = {
        "first_n": torch.zeros(spec.num_layers, spec.num_heads, spec.num_heads, dtype=torch.float64),
        "rows": torch.zeros(spec.num_layers, spec.num_heads, spec.num_heads, dtype=torch.float64),
    }
    gen = torch.Generator().manual_seed(seed)
    positions: torch.Tensor | None = None  # set per batch, read by the hooks

    def add_gram(kind: str, layer: int, feats: torch.Tensor) -> None:
        # feats [B, H, D] -> sum over samples of per-sample Gram, accumulated in float64 on CPU
        f = feats.double()
        gram[kind][layer] += torch.einsum("bhd,bgd->hg", f, f).cpu()

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            call = adapter.call_inputs(args, kwargs)
            with loaded(module):  # offloaded weights are on `meta` until their own forward: load them here
                q, k = adapter.queries_keys(layer, call)
            q, k = q.float(), k.float()
            if group > 1:  # every query head reads its KV group's keys
                k = k.repeat_interleave(group, dim=1)
            n = min(first_n, q.shape[2])
            s = torch.matmul(q[:, :, :n], k[:, :, :n].transpose(-1, -2)) * scale
            causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            add_gram("first_n", layer, p[:, :, causal])
            pos = positions.to(q.device)
            s = torch.matmul(q[:, :, pos], k.transpose(-1, -2)) * scale  # [B, H, R, T]
            keys = torch.arange(k.shape[2], device=s.device)
            p = s.masked_fill(keys[None, :] > pos[:, None], float("-inf")).softmax(-1)
            add_gram("rows", layer, p.flatten(2))
        return hook

    handles = [
        adapter.attention(i).register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i in range(spec.num_layers)
    ]
    reset_peaks()
    t0 = time.perf_counter()
    try:
        batches = range(0, samples, batch_size)
        for start in tqdm(batches, desc="capture attention", unit="batch", disable=not progress):
            positions = _row_positions(seq_len, rows_per_sample, first_n, gen)
            ids = input_ids[start : start + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings = {"capture_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        timings["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    # One figure per GPU: on a model spread over GPUs each should stay near its share plus one layer's work.
    timings.update({f"peak_mb[{dev}]": mb for dev, mb in peak_memory_mb().items() if dev != "cpu_rss"})
    return AttentionStats(gram, samples, seq_len, first_n, rows_per_sample, timings)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
