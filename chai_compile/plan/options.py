"""What `chai-compile plan` is asked for: the budget and the planner's settings (no heavy imports)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from chai_compile.choices import BUILTIN_CALIBRATION
from chai_compile.errors import ClusteringError


class Refit(enum.StrEnum):
    NONE = "none"
    OUTPUT = "output"  # W_o, closed form
    QUERIES = "queries"  # shared Q rows, KL fit
    ALL = "all"  # queries, then W_o, then end-to-end distillation (--distill-steps)


@dataclasses.dataclass
class PlanOptions:
    calib: Any = BUILTIN_CALIBRATION  # path, "builtin", or a list of strings; never an evaluation set
    kv_target: float | None = None  # fraction of the native KV cache to free (0..0.5)
    max_ppl_increase: float | None = None  # stop before calibration perplexity rises by more (0.05 = 5%)
    samples: int = 4  # scoring windows (every candidate is measured on these)
    refit_samples: int = 32  # reconstruction windows (the scoring windows are among them)
    # Tokens per window; None: 1024, or the model's positions if fewer. Long windows keep long-range heads:
    # on SmolLM2 at 20% KV, 4 x 1024 instead of 8 x 256 gave +25.6% instead of +33.0% test perplexity.
    seq_len: int | None = None
    batch_size: int = 8
    per_round: int = 4  # K heads accepted per round (at most one per layer)
    refit: Refit = Refit.ALL
    query_steps: int = 150
    # End-to-end distillation of the refit tensors after the layer-local refits (0: off). Trained on the
    # reconstruction windows that are not scoring windows; the scoring windows pick the step kept.
    distill_steps: int = 200
    distill_batch: int = 4
    distill_lr: float = 5e-5
    dense_layers: tuple[int, ...] = ()
    seed: int = 0

    def check(self, num_layers: int | None = None) -> None:
        """Budget and sizes (before loading anything); layer indices too once the model's depth is known."""
        if self.kv_target is None and self.max_ppl_increase is None:
            raise ClusteringError("a plan needs a budget", fix="pass --kv-target F or --max-ppl-increase P")
        if self.kv_target is not None and not 0.0 < self.kv_target < 0.5:
            raise ClusteringError("--kv-target must be between 0 and 0.5 (V is never dropped)", value=self.kv_target,
                                  fix="pass a fraction such as 0.2 for 20% of the KV cache")
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise ClusteringError("--max-ppl-increase must be above 0", value=self.max_ppl_increase,
                                  fix="pass a fraction such as 0.05 for at most 5% more perplexity")
        for name in ("samples", "refit_samples", "seq_len", "batch_size", "per_round", "distill_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ClusteringError(f"--{name.replace('_', '-')} must be at least 1", value=getattr(self, name),
                                      fix=f"pass --{name.replace('_', '-')} 1 or more")
        if self.distill_steps < 0:
            raise ClusteringError("--distill-steps must be 0 (off) or more", value=self.distill_steps,
                                  fix="pass --distill-steps 0 to skip distillation, or a step count such as 200")
        bad = [d for d in self.dense_layers if num_layers is not None and not 0 <= d < num_layers]
        if bad:
            raise ClusteringError(f"--dense-layers index out of range 0..{num_layers - 1}", value=bad[0],
                                  fix=f"list layers between 0 and {num_layers - 1}")

    def window(self, max_positions: int | None) -> int:
        """The calibration window length for a model trained on `max_positions` positions (None: unknown)."""
        if self.seq_len is None:
            return min(1024, max_positions or 1024)
        if max_positions is not None and self.seq_len > max_positions:
            raise ClusteringError(f"--seq-len is above the {max_positions} positions the model was trained for",
                                  value=self.seq_len, fix=f"pass --seq-len {max_positions} or less")
        return self.seq_len

    def reachable_k_heads(self, num_layers: int, num_kv_heads: int) -> int:
        """Most K heads a plan can drop: every layer not kept dense keeps at least one."""
        return (num_layers - len(set(self.dense_layers))) * (num_kv_heads - 1)


