"""What `chai-compile plan` is asked for: the budget and the planner's settings (no heavy imports)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from chai_compile.choices import BUILTIN_CALIBRATION, Rank, Transform
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
    transforms: tuple[Transform, ...] = (Transform.CHAI,)
    # Context the KV saving is stated at (span heads save 1 - (s + w) / context); None: the model's positions.
    context: int | None = None
    span_mass: float = 0.9  # a span is offered only where every query head of a KV head keeps this much mass
    min_layer_similarity: float = 0.5  # a shared-layer source is offered only at this head-mean 1 - TV or more
    # Scoring windows whose second half repeats the first (combined planner): they make far-reaching heads
    # costly to bound. None: 2 when spans are planned, else 0.
    recall_samples: int | None = None
    rank: Rank = Rank.MEASURED  # PROFILE: spans ordered by the mass they leave out, no forward pass per candidate

    @property
    def combined(self) -> bool:
        """Spans or shared layers asked for: the combined planner (no reconstruction) runs."""
        return set(self.transforms) != {Transform.CHAI}

    @property
    def recall_windows(self) -> int:
        if self.recall_samples is not None:
            return self.recall_samples
        return 2 if Transform.SPAN in self.transforms else 0

    def check(self, num_layers: int | None = None) -> None:
        """Budget and sizes (before loading anything); layer indices too once the model's depth is known."""
        if self.kv_target is None and self.max_ppl_increase is None:
            raise ClusteringError("a plan needs a budget", fix="pass --kv-target F or --max-ppl-increase P")
        if not self.transforms or len(set(self.transforms)) != len(self.transforms):
            raise ClusteringError("--transforms must name each transform once", value=",".join(self.transforms),
                                  fix=f"pass a comma list of {', '.join(Transform.values())}")
        # Only spans free V too; K-only transforms stop short of half the cache.
        upper = 1.0 if Transform.SPAN in self.transforms else 0.5
        if self.kv_target is not None and not 0.0 < self.kv_target < upper:
            why = "" if upper == 1.0 else " (V is never dropped without span heads)"
            raise ClusteringError(f"--kv-target must be between 0 and {upper}{why}", value=self.kv_target,
                                  fix="pass a fraction such as 0.2 for 20% of the KV cache")
        if self.combined and self.refit != Refit.NONE:
            raise ClusteringError("--refit is for CHAI-only plans; span and shared plans are not reconstructed yet",
                                  value=str(self.refit), fix="pass --refit none, or --transforms chai")
        if self.rank == Rank.PROFILE and set(self.transforms) != {Transform.SPAN}:
            raise ClusteringError("--rank profile orders span candidates only (CHAI and shared-layer candidates "
                                  "need measured loss)", value=",".join(self.transforms),
                                  fix="pass --transforms span, or --rank measured")
        if self.rank == Rank.PROFILE and (self.kv_target is None or self.max_ppl_increase is not None):
            raise ClusteringError("--rank profile plans to a --kv-target only (a perplexity bound needs measured "
                                  "candidates)", value=self.max_ppl_increase,
                                  fix="pass --kv-target F without --max-ppl-increase, or --rank measured")
        if self.recall_samples is not None and self.recall_samples < 0:
            raise ClusteringError("--recall-samples must be 0 or more", value=self.recall_samples,
                                  fix="pass e.g. --recall-samples 2")
        if self.recall_samples and not self.combined:
            raise ClusteringError("--recall-samples is for plans with spans or shared layers",
                                  value=self.recall_samples,
                                  fix="add --transforms chai,span,shared, or drop --recall-samples")
        if self.context is not None and self.context < 1:
            raise ClusteringError("--context must be at least 1 token", value=self.context,
                                  fix="pass e.g. --context 4096")
        for name, v in (("span_mass", self.span_mass), ("min_layer_similarity", self.min_layer_similarity)):
            if not 0.0 < v <= 1.0:
                raise ClusteringError(f"--{name.replace('_', '-')} must be in (0, 1]", value=v,
                                      fix=f"pass e.g. --{name.replace('_', '-')} 0.9")
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

    def context_for(self, max_positions: int | None) -> int:
        """The context the saving is stated at; refused above the model's positions."""
        if self.context is None:
            if max_positions is None:
                raise ClusteringError("the model's config does not state its positions", fix="pass --context N")
            return max_positions
        if max_positions is not None and self.context > max_positions:
            raise ClusteringError(f"--context is above the {max_positions} positions the model was trained for",
                                  value=self.context, fix=f"pass --context {max_positions} or less")
        return self.context

    def window(self, max_positions: int | None, cap: int | None = None, default: int = 1024) -> int:
        """The calibration window length for a model trained on `max_positions` positions (None: unknown);
        by default `default`, or less where the positions or `cap` (the stated context) are fewer."""
        if self.seq_len is None:
            return min(default, max_positions or default, cap or default)
        if max_positions is not None and self.seq_len > max_positions:
            raise ClusteringError(f"--seq-len is above the {max_positions} positions the model was trained for",
                                  value=self.seq_len, fix=f"pass --seq-len {max_positions} or less")
        return self.seq_len

    def reachable_k_heads(self, num_layers: int, num_kv_heads: int) -> int:
        """Most K heads a plan can drop: every layer not kept dense keeps at least one."""
        return (num_layers - len(set(self.dense_layers))) * (num_kv_heads - 1)


