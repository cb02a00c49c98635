"""Options of `profile` and their checks: free of torch and sklearn, so the command line checks them, and
locks its output, before importing or loading anything heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chai_compile.choices import BUILTIN_CALIBRATION, FEATURES, METHODS, REPRESENTATIVES
from chai_compile.errors import CalibrationError, ClusteringError, UsageError


@dataclass
class ProfileOptions:
    calib: Any = BUILTIN_CALIBRATION  # path, "builtin", or a list of strings
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    first_n: int = 5
    rows_per_sample: int = 16
    text_field: str = "text"
    features: str = "rows"
    method: str = "agglomerative"
    clusters: int | list[int] | None = None  # None: knee of the k-means error curve per layer
    dense_layers: list[int] = field(default_factory=list)
    representative: str = "auto"
    # Fraction of the whole KV cache to free (0..0.5). Overrides `clusters`: drops the K heads whose
    # query heads other heads cover best, layer by layer, cheapest first.
    kv_target: float | None = None


def check_static(opts: ProfileOptions) -> None:
    """Every check that needs no model: the CLI runs it before loading one."""
    if opts.method not in METHODS:
        raise ClusteringError(f"unknown --method; choose one of {', '.join(METHODS)}", value=opts.method)
    if opts.features not in FEATURES:
        raise ClusteringError(f"unknown --features; choose one of {', '.join(FEATURES)}", value=opts.features)
    if opts.representative not in REPRESENTATIVES:
        raise ClusteringError(f"unknown --representative; choose one of {', '.join(REPRESENTATIVES)}",
                              value=opts.representative)
    for option, v in (("--samples", opts.samples), ("--batch-size", opts.batch_size), ("--first-n", opts.first_n),
                      ("--rows", opts.rows_per_sample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{option} must be a whole number of at least 1", value=v, fix=f"pass {option} 1 or more")
    if opts.seq_len < opts.first_n:
        raise CalibrationError(f"--seq-len must be at least {opts.first_n} tokens (the first-N feature window)",
                               value=opts.seq_len, fix=f"use --seq-len {max(opts.first_n, 16)} or more")
    counts = opts.clusters if isinstance(opts.clusters, list) else [] if opts.clusters is None else [opts.clusters]
    for c in counts:
        if c < 1:  # 0 used to mean "auto" silently
            raise ClusteringError("--clusters must be at least 1", value=c,
                                  fix="pass --clusters auto for the knee of each layer, or a count of 1 or more")
    if opts.kv_target is not None and not 0.0 < opts.kv_target < 0.5:
        raise ClusteringError("--kv-target must be between 0 and 0.5 (V is never dropped)", value=opts.kv_target,
                              fix="pass a fraction such as --kv-target 0.25")


def check_options(opts: ProfileOptions, num_layers: int, num_heads: int, max_positions: int | None = None) -> None:
    """check_static, then the checks against the model's sizes."""
    check_static(opts)
    counts = opts.clusters if isinstance(opts.clusters, list) else [] if opts.clusters is None else [opts.clusters]
    if isinstance(opts.clusters, list) and len(opts.clusters) != num_layers:
        raise ClusteringError(f"--clusters list needs one count per layer ({num_layers})",
                              value=len(opts.clusters))
    for c in counts:
        if c > num_heads:
            raise ClusteringError(f"cannot make more clusters than heads: the model has {num_heads} heads per "
                                  "layer", value=c, fix=f"pass --clusters between 1 and {num_heads}")
    for d in opts.dense_layers:
        if not 0 <= d < num_layers:
            raise ClusteringError(f"--dense-layers index out of range 0..{num_layers - 1}", value=d)
    if max_positions and opts.seq_len > max_positions:
        raise CalibrationError(f"--seq-len {opts.seq_len} is above the model's {max_positions} positions",
                               value=opts.seq_len, fix=f"use --seq-len {max_positions} or less")


def max_positions(config: Any) -> int | None:
    """Positions the model was trained for (None when the config does not say)."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None
