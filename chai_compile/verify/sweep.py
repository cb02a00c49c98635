"""Trade-off sweep: several mappings of one model, each verified against the original on the same tasks.

The result's points give measured KV-cache saving (x) against average accuracy change (y): the
picture a user needs to choose a mapping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chai_compile.errors import MappingError
from chai_compile.mapping import FORMAT, ClusterMapping
from chai_compile.verify.compare import Log, compare_loaded
from chai_compile.verify.tasks import Task, resolve_tasks


def _label(path: Path) -> str:
    # profile writes DIR/mapping.json: the directory names the budget
    return path.parent.name if path.stem == "mapping" else path.stem


def _is_mapping_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def collect_mappings(paths: Sequence[str | Path]) -> list[tuple[str, ClusterMapping]]:
    """Mapping files, or directories holding them (*.json and */mapping.json; other JSON is skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in sorted({*p.glob("*.json"), *p.glob("*/mapping.json")}) if _is_mapping_file(f)]
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


def sweep(
    model_spec: str,
    mappings: Sequence[tuple[str, ClusterMapping]],
    tasks: Sequence[str | Task],
    limit: int | None = None,
    *,
    batch_size: int = 8,
    membership: str = "static",
    dtype: str = "float32",
    device: str = "cpu",
    window: int | None = None,
    stride: int | None = None,
    kv_tokens: int = 512,
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
                            batch_size=batch_size, window=window, stride=stride, kv_tokens=kv_tokens, log=log)
    result = {"model": model_spec, "membership": membership,
              "settings": {"limit": limit, "batch_size": batch_size, "dtype": dtype, "device": device,
                           "kv_tokens": kv_tokens},
              **result}
    # Sorted by measured saving: the order of the curve
    result["points"].sort(key=lambda p: p["kv_cache_saving_pct"])
    return result
