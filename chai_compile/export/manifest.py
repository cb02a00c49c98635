"""manifest.json of an export directory: versions, file hashes, graph inputs/outputs, stats, validation.

Integrity (`verify_files`, run before anything else reads the directory):
- every file the export wrote is listed with its size and sha256, and every listed file is checked;
- the manifest seals itself: `manifest_sha256` is the sha256 of the manifest's canonical JSON
  (sorted keys, no whitespace) without that field. The graph cannot carry the manifest's hash (the
  manifest already holds the graph's), so the self-hash is what detects an edited or truncated
  manifest. It detects accidents and careless edits, not a forger, who can recompute it: authenticity
  needs a signature over the manifest, outside this tool.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from chai_compile.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: sealed with manifest_sha256
SEAL = "manifest_sha256"
REQUIRED = ("format_version", "graph", "files", "source_model", "dtype", SEAL)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("chai-compile", "torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime",
                 "onnxruntime-gpu", "onnxruntime-extensions"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def io_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(vi: Any) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def build_manifest(out_dir: Path, graph: Path, **fields: Any) -> dict[str, Any]:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(Path(out_dir).iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format_version": FORMAT_VERSION, "graph": graph.name, "versions": versions(), "files": files,
            **io_signature(graph), **fields}


def _canonical_sha256(man: dict[str, Any]) -> str:
    body = {k: v for k, v in man.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(man: dict[str, Any]) -> dict[str, Any]:
    return {**man, SEAL: _canonical_sha256(man)}


def verify_files(artifact: str | Path) -> dict[str, Any]:
    """The sealed manifest of `artifact`, after checking it and every file it lists; ArtifactError names the
    first file that differs."""
    from chai_compile.fileio import read_json_strict

    root = Path(artifact)
    fix = "re-export with `chai-compile export` (the directory was changed after it was written)"
    man = read_json_strict(root / MANIFEST, ArtifactError, "manifest", fix)
    if not isinstance(man, dict):
        raise ArtifactError(f"{root / MANIFEST} is not a manifest object", fix=fix)
    missing = [k for k in REQUIRED if k not in man]
    if missing:
        if man.get("format_version") == 1:
            raise ArtifactError(f"{root} was exported by an older chai-compile (unsealed manifest)", fix=fix)
        raise ArtifactError(f"{root / MANIFEST} lacks required keys: {', '.join(missing)}", fix=fix)
    if man[SEAL] != _canonical_sha256(man):
        raise ArtifactError(f"{root / MANIFEST} was edited: its content no longer matches its {SEAL}", fix=fix)
    files = man["files"]
    if not isinstance(files, dict) or man["graph"] not in files:
        raise ArtifactError(f"{root / MANIFEST} does not list the graph file", value=man.get("graph"), fix=fix)
    for name, rec in files.items():
        path = root / name
        if Path(name).name != name or not isinstance(rec, dict):
            raise ArtifactError(f"{root / MANIFEST} has a malformed files entry", value=name, fix=fix)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing", fix=fix)
        size = path.stat().st_size
        if size != rec.get("bytes"):
            raise ArtifactError(f"{path} changed: {size} bytes, the manifest records {rec.get('bytes')}", fix=fix)
        if sha256(path) != rec.get("sha256"):
            raise ArtifactError(f"{path} changed: its sha256 differs from the manifest's", fix=fix)
    return man
