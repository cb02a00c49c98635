"""Long-context statistics in one pass per window: span mass per head and layer-to-layer similarity.

Each calibration window (>= 2k tokens by default) runs through the model once; forward pre-hooks keep
every layer's positioned q and k (L x H x T x d, small next to the maps). The probabilities are then
rebuilt row chunk by row chunk for all layers together: span mass per layer and TV between layers
come from the same chunk, so nothing of size T x T per layer outlives it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from chai_compile.adapters import ModelAdapter
from chai_compile.device_map import input_device, loaded
from chai_compile.profile.layer_similarity import LayerSimilarity, top_pairs
from chai_compile.profile.spans import SINKS, WINDOWS, SpanMass

LONG_SEQ_LEN = 2048  # default calibration window: long enough for 1024-token spans to leave keys out


@dataclass
class LongContextStats:
    seq_len: int
    windows_used: int
    sinks: tuple[int, ...]
    windows: tuple[int, ...]
    span_mass: torch.Tensor  # [L, H, S, W] mean kept mass (NaN where not measurable at seq_len)
    similarity: torch.Tensor  # [L, L, H] 1 - mean TV, source j <= layer l
    timings: dict[str, float] = field(default_factory=dict)
    # [L, H, S, W] kept mass on the repeated rows of passage-repeat windows (None: none measured)
    recall_mass: torch.Tensor | None = None

    def kept_mass(self) -> torch.Tensor:
        """What a span must keep: the lower of the running-text and the repeated-passage mass, so a head that
        reads far back when the text asks for it (a retrieval head) is not bounded for looking local on
        running text."""
        return self.span_mass if self.recall_mass is None else torch.minimum(self.span_mass, self.recall_mass)

    def heads_within(self, threshold: float, sinks: int, window: int) -> int:
        """Query heads keeping at least `threshold` of their mass within `sinks` + the last `window` tokens."""
        m = self.kept_mass()[:, :, self.sinks.index(sinks), self.windows.index(window)]
        return int((m >= threshold).sum())

    def summary(self, threshold: float = 0.9) -> dict[str, Any]:
        heads = self.span_mass.shape[0] * self.span_mass.shape[1]
        within = {f"s{s}+w{w}": self.heads_within(threshold, s, w) for s in self.sinks for w in self.windows
                  if not math.isnan(float(self.span_mass[0, 0, self.sinks.index(s), self.windows.index(w)]))}
        return {"query_heads": heads, "mass_threshold": threshold, "heads_within": within,
                "top_layer_pairs": top_pairs(self.similarity, 10)}

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "windows_used": self.windows_used, "sinks": list(self.sinks),
                "windows": list(self.windows), "summary": self.summary(),
                "span_mass": _rounded(self.span_mass), "layer_similarity": _rounded(self.similarity),
                "recall_mass": None if self.recall_mass is None else _rounded(self.recall_mass),
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def _rounded(t: torch.Tensor) -> Any:
    """Nested lists rounded to 6 digits, NaN as null (JSON has no NaN)."""
    a = np.round(t.numpy(), 6).astype(object)
    a[np.isnan(t.numpy())] = None
    return a.tolist()


@torch.no_grad()
def long_context_statistics(adapter: ModelAdapter, input_ids: torch.Tensor, *, sinks: tuple[int, ...] = SINKS,
                            windows: tuple[int, ...] = WINDOWS, chunk: int | None = None,
                            progress: bool = True, from_row: int = 0) -> LongContextStats:
    """Span mass and layer similarity over the windows input_ids [N, T], one window at a time, `chunk` query
    rows at a time (None: 512 on a GPU, where per-chunk launches dominate, 64 elsewhere to bound memory).
    Span mass counts rows from `from_row` on (and from the largest measured span on)."""
    spec = adapter.spec
    n, t = input_ids.shape
    mass = SpanMass(spec.num_layers, spec.num_heads, sinks, windows, t, from_row)
    sim = LayerSimilarity(spec.num_layers, spec.num_heads)
    scale = adapter.scaling()
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            with loaded(module):  # offloaded weights: load them for the recomputation
                q, k = adapter.queries_keys(layer, adapter.call_inputs(args, kwargs))
            # kept where the layer ran (the GPU for a GPU model): the T x T rows below are the profile's cost
            qk[layer] = (q[0].float(), k[0].float().repeat_interleave(spec.group_size, dim=0))
        return hook

    handles = [adapter.attention(i).register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i in range(spec.num_layers)]
    device = input_device(adapter.model)
    t0 = time.perf_counter()
    chunk = chunk or (512 if device.type == "cuda" else 64)
    chunks = range(0, t, chunk)
    bar = tqdm(total=n * len(chunks), desc="long-context statistics", unit="chunk", disable=not progress)
    try:
        for w in range(n):
            adapter.model(input_ids=input_ids[w : w + 1].to(device), use_cache=False)
            at = qk[0][0].device
            maps = None
            for r0 in chunks:
                rows = torch.arange(r0, min(r0 + chunk, t), device=at)
                causal = torch.arange(t, device=at)[None, :] <= rows[:, None]
                if maps is None or maps.shape[2] != len(rows):  # one buffer for the chunks of a window
                    maps = torch.empty(spec.num_layers, spec.num_heads, len(rows), t, device=at)
                for layer in range(spec.num_layers):
                    q, k = (x.to(at) for x in qk[layer])
                    p = torch.matmul(q[:, rows], k.transpose(-1, -2), out=maps[layer])  # [H, c, T]
                    _softmax_(p.mul_(scale).masked_fill_(~causal, float("-inf")))
                    mass.add(layer, p, r0)
                sim.add(maps)
                bar.update(1)
            qk.clear()
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return LongContextStats(t, n, tuple(sinks), tuple(windows), mass.mean(), sim.result(),
                            {"statistics_s": time.perf_counter() - t0})


def _softmax_(s: torch.Tensor) -> None:
    """Softmax over the last dimension in place (every causal row keeps its own key, so no row is all -inf):
    temporaries of a chunk's size page-fault on a CPU."""
    s.sub_(s.amax(-1, keepdim=True)).exp_()
    s.div_(s.sum(-1, keepdim=True))


def plots(stats: LongContextStats, out_dir: Path) -> list[str]:
    """layer_similarity.png (head-mean heatmap with a colour bar) and span_mass.png (per head, per span)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(stats.similarity.mean(-1).numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label="1 - mean total variation (head mean)")
    ax.set_xlabel("source layer j")
    ax.set_ylabel("layer l")
    ax.set_title(f"Layer-to-layer attention similarity ({stats.seq_len}-token windows)")
    fig.tight_layout()
    fig.savefig(out_dir / "layer_similarity.png", dpi=110)
    plt.close(fig)

    layers, heads = stats.span_mass.shape[:2]
    labels = [f"s{s}+w{w}" for s in stats.sinks for w in stats.windows]
    grid = stats.span_mass.reshape(layers * heads, -1).numpy().T  # spans x heads
    fig, ax = plt.subplots(figsize=(max(6, 0.05 * layers * heads), 0.3 * len(labels) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="attention mass kept")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel(f"query head (layer x {heads} + head)")
    ax.set_title("Attention mass within sinks + recent window, per head")
    fig.tight_layout()
    fig.savefig(out_dir / "span_mass.png", dpi=110)
    plt.close(fig)
    return ["layer_similarity.png", "span_mass.png"]
