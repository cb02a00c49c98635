"""Trade-off sweep: several mappings of one model, each verified against the original on the same tasks.

The result's points give measured KV-cache saving (x) against average accuracy change (y): the
picture a user needs to choose a mapping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chai_compile.choices import DType, Membership
from chai_compile.errors import MappingError
from chai_compile.mapping import FORMAT, ClusterMapping
from chai_compile.verify.compare import Log, compare_loaded
from chai_compile.verify.tasks import Task, resolve_tasks


def _label(path: Path) -> str:
    # profile writes DIR/mapping.json and plan DIR/plan.json: the directory names the budget
    return path.parent.name if path.stem in ("mapping", "plan") else path.stem


def _is_mapping_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def collect_mappings(paths: Sequence[str | Path]) -> list[tuple[str, ClusterMapping]]:
    """Mapping files, or directories holding them (*.json, */mapping.json, */plan.json; other JSON is skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in sorted({*p.glob("*.json"), *p.glob("*/mapping.json"), *p.glob("*/plan.json")})
                     if _is_mapping_file(f)]
            if not found:
                raise MappingError(f"no chai-compile mapping files in directory {p}",
                                   fix="pass mapping.json files or a directory of profile outputs")
            files += found
        else:
            files.append(p)  # an explicit file must be a valid mapping; read() says why not
    out: list[tuple[str, ClusterMapping]] = []
    seen: dict[str, int] = {}
    for f in files:
        label = _label(f)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        out.append((label, ClusterMapping.read(f)))
    if not out:
        raise MappingError("no mappings given", fix="pass --mappings FILE_OR_DIR")
    return out


def mappings_from_profile(profile_dir: str | Path, clusters: Sequence[int], dense_prefixes: Sequence[int],
                          include_default: bool = True) -> list[tuple[str, ClusterMapping]]:
    """Mappings at every (clusters per layer, first N layers dense) from one `profile` output directory.

    The similarity in profile.json is reused (no model run); method, features and representative
    choice come from the directory's mapping.json so every point is clustered as `profile` would.
    With `include_default`, the directory's own mapping (the knee budget) is a point too.
    """
    from dataclasses import fields

    from chai_compile.profile.measure import ProfileOptions, budget_options, derive_mapping, load_profile_data

    d = Path(profile_dir)
    mapping_path, profile_path = d / "mapping.json", d / "profile.json"
    for f in (mapping_path, profile_path):
        if not f.is_file():
            raise MappingError(f"profile directory {d} has no {f.name}",
                               fix="pass the --out directory of `chai-compile profile`")
    base_mapping = ClusterMapping.read(mapping_path)
    try:
        data = load_profile_data(profile_path, base_mapping)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MappingError(f"{profile_path} is not a chai-compile profile ({type(e).__name__}: {e})",
                           fix="pass the --out directory of `chai-compile profile`") from None
    settings = base_mapping.provenance.get("settings") or {}
    known = {f.name for f in fields(ProfileOptions)} - {"calib", "clusters", "dense_layers"}
    base = ProfileOptions(**{k: v for k, v in settings.items() if k in known})
    out = [("profile-default", base_mapping)] if include_default else []
    out += [(label, derive_mapping(data, opts))
            for label, opts in budget_options(base, data.model.num_layers, clusters, dense_prefixes)]
    if not out:
        raise MappingError("no budgets to sweep", fix="pass --clusters and --dense-prefix")
    return out


def sweep(
    model_spec: str,
    mappings: Sequence[tuple[str, ClusterMapping]],
    tasks: Sequence[str | Task],
    limit: int | None = None,
    *,
    batch_size: int = 8,
    membership: Membership = Membership.STATIC,
    dtype: DType = DType.FLOAT32,
    device: str = "cpu",
    window: int | None = None,
    stride: int | None = None,
    kv_tokens: int = 512,
    kv_decode: int = 0,
    kv_context: Sequence[int] = (),
    data_dir: str | Path | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Load `model_spec` once, evaluate the original once, then every (label, mapping) on the same requests."""
    from chai_compile.loading import load_model

    task_objs = [t for t in tasks if isinstance(t, Task)]
    names = [t for t in tasks if isinstance(t, str)]
    task_objs += resolve_tasks(names, data_dir=data_dir) if names else []
    loaded = load_model(model_spec, dtype, device)
    result = compare_loaded(loaded, list(mappings), task_objs, membership=membership, limit=limit,
                            batch_size=batch_size, window=window, stride=stride, kv_tokens=kv_tokens,
                            kv_decode=kv_decode, kv_context=kv_context, log=log)
    result = {"model": model_spec, "membership": membership,
              "settings": {"limit": limit, "batch_size": batch_size, "dtype": dtype, "device": device,
                           "kv_tokens": kv_tokens, "kv_decode": kv_decode, "kv_context": list(kv_context)},
              **result}
    # Sorted by measured saving: the order of the curve
    result["points"].sort(key=lambda p: p["kv_cache_saving_pct"])
    return result
