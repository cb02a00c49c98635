"""`profile`: calibration text -> attention capture -> head similarity -> cluster counts -> mapping."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chai_compile import __version__
from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind
from chai_compile.fingerprint import model_info
from chai_compile.loading import LoadedModel
from chai_compile.mapping import Cluster, ClusterMapping, LayerMapping, ModelInfo
from chai_compile.profile.calibration import build_calibration
from chai_compile.profile.capture import capture_attention
from chai_compile.profile.clustering import (
    allocate_kv_budget,
    choose_representatives,
    cluster_heads,
    cosine_distance,
    knee,
    kv_drop_options,
    sse_curve,
)
from chai_compile.profile.options import (  # noqa: F401  (re-exported)
    FEATURES,
    ProfileOptions,
    check_options,
    check_static,
    max_positions,
)


@dataclass
class ProfileData:
    """What capture measured; enough to derive mappings at other budgets without re-running the model."""

    model: ModelInfo
    similarity: dict[str, np.ndarray]  # feature kind -> [L, H, H] cosine similarity
    sse: list[list[float]]  # per layer, k-means error for k = 1..H (on options.features)
    knee: list[int]
    calibration: dict[str, Any]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "similarity": {k: np.round(v, 6).tolist() for k, v in self.similarity.items()},
            "sse": [[round(x, 8) for x in row] for row in self.sse],
            "knee": self.knee,
            "calibration": self.calibration,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def derive_mapping(data: ProfileData, opts: ProfileOptions) -> ClusterMapping:
    """Counts, clusters and representatives from measured similarity (no model needed)."""
    m = data.model
    check_options(opts, m.num_layers, m.num_heads)
    sim = data.similarity[opts.features]
    if opts.kv_target is not None:
        return _kv_budget_mapping(data, opts, sim)
    layers = []
    for i in range(m.num_layers):
        if isinstance(opts.clusters, list):
            k = opts.clusters[i]
        else:
            k = opts.clusters or data.knee[i]
        if i in opts.dense_layers or k == m.num_heads:
            layers.append(LayerMapping(i, LayerKind.DENSE))
            continue
        members = cluster_heads(sim[i], k, opts.method, opts.seed)
        reps = choose_representatives(members, cosine_distance(sim[i]), opts.representative, m.group_size)
        clusters = tuple(Cluster(tuple(c), r) for c, r in zip(members, reps, strict=True))
        layers.append(LayerMapping(i, LayerKind.CLUSTERED, clusters))
    return ClusterMapping.build(m, layers, _provenance(data, opts))


def _provenance(data: ProfileData, opts: ProfileOptions) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(opts).items() if k != "calib"}
    return {"tool": "chai-compile", "tool_version": __version__, "calibration": data.calibration,
            "settings": settings}


def _kv_budget_mapping(data: ProfileData, opts: ProfileOptions, sim: np.ndarray) -> ClusterMapping:
    m = data.model
    total_kv = m.num_layers * m.num_kv_heads
    to_drop = int(np.ceil(opts.kv_target * 2 * total_kv - 1e-9))  # each K head is 1/(2*total_kv) of the cache
    options = [kv_drop_options(sim[i], m.group_size) for i in range(m.num_layers)]
    taken = allocate_kv_budget(options, to_drop, set(opts.dense_layers))
    layers = []
    for i, k in enumerate(taken):
        if k == 0:
            layers.append(LayerMapping(i, LayerKind.DENSE))
            continue
        o = options[i][k]
        layers.append(LayerMapping(i, LayerKind.CLUSTERED, tuple(Cluster(tuple(c), r)
                                                         for c, r in zip(o.clusters, o.representatives, strict=True))))
    return ClusterMapping.build(m, layers, _provenance(data, opts))


def measure(loaded: LoadedModel, opts: ProfileOptions, progress: bool = True) -> ProfileData:
    adapter = adapter_for(loaded.model)
    info = model_info(adapter)
    check_options(opts, info.num_layers, info.num_heads, max_positions(loaded.model.config))
    t0 = time.perf_counter()
    calib = build_calibration(loaded.tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed,
                              opts.first_n, opts.text_field)
    t_calib = time.perf_counter() - t0
    stats = capture_attention(adapter, calib.input_ids, batch_size=opts.batch_size, first_n=opts.first_n,
                              rows_per_sample=opts.rows_per_sample, seed=opts.seed, progress=progress)
    sim = {kind: stats.cosine(kind).numpy() for kind in stats.gram}
    t1 = time.perf_counter()
    sse = [sse_curve(sim[opts.features][i], opts.seed)
           for i in tqdm(range(info.num_layers), desc="k-means curves", unit="layer", disable=not progress)]
    timings = {"tokenize_s": t_calib, **stats.timings, "cluster_s": time.perf_counter() - t1}
    calibration = {"source": calib.source, "tokens_sha256": calib.sha256, "samples": int(calib.input_ids.shape[0]),
                   "seq_len": opts.seq_len, "seed": opts.seed, "first_n": opts.first_n,
                   "rows_per_sample": opts.rows_per_sample, "features": opts.features}
    return ProfileData(info, sim, sse, [knee(c) for c in sse], calibration, timings)


def profile_model(loaded: LoadedModel, opts: ProfileOptions, progress: bool = True) -> tuple[ProfileData,
                                                                                             ClusterMapping]:
    data = measure(loaded, opts, progress)
    return data, derive_mapping(data, opts)


def load_profile_data(path: str | Path, mapping: ClusterMapping) -> ProfileData:
    """Re-read a profile.json written by `chai-compile profile` (for sweeps over budgets)."""
    from chai_compile.errors import MappingError
    from chai_compile.fileio import read_json_strict

    fix = "re-run `chai-compile profile`"
    doc = read_json_strict(Path(path), MappingError, "profile file", fix)
    try:
        d = doc["profile"]
        return ProfileData(mapping.model, {k: np.asarray(v, dtype=float) for k, v in d["similarity"].items()},
                           d["sse"], d["knee"], d["calibration"], d["timings"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MappingError(f"profile file {path} is malformed: {type(e).__name__} {e}", fix=fix) from None


def budget_options(base: ProfileOptions, num_layers: int, counts: Sequence[int],
                   dense_prefixes: Sequence[int]) -> list[tuple[str, ProfileOptions]]:
    """A grid of mappings for a trade-off sweep: every (clusters per layer, first N layers dense)."""
    out = []
    for c in counts:
        for n in dense_prefixes:
            o = ProfileOptions(**{**asdict(base), "clusters": c, "dense_layers": list(range(min(n, num_layers)))})
            out.append((f"c{c}-dense{n}", o))
    return out
