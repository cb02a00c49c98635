"""The one validator of mapping JSON: every field's type and size is checked here, before anything is built.

Why sizes first: a 4 KB file may claim 10^12 heads; nothing may be allocated from a claimed size until it
is bounded (LIMITS) and agrees with what the file actually lists.
"""

from __future__ import annotations

import math
import re
from typing import Any

from chai_compile.errors import MappingError
from chai_compile.mapping import (
    FORMAT,
    LAYER_KINDS,
    RESERVED_LAYER_KINDS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_WEIGHTS,
    Cluster,
    LayerMapping,
    ModelInfo,
    WeightsRef,
)

# Far above any released model (the largest have ~128 layers, 128 heads, head_dim 256, hidden 16k).
LIMITS = {"num_layers": 4096, "num_heads": 4096, "num_kv_heads": 4096, "head_dim": 65536, "hidden_size": 1 << 20}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise MappingError(f"{where}: required field {key!r} is missing")
    return d[key]


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise MappingError(f"{where} must be an object", value=type(v).__name__)
    return v


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = _get(d, key, where)
    if not isinstance(v, str):
        raise MappingError(f"{where}: field {key!r} must be a string", value=_short(v))
    return v


def _int(d: dict[str, Any], key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    return _int_value(_get(d, key, where), f"{where}: field {key!r}", lo, hi)


def _int_value(v: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MappingError(f"{what} must be an integer", value=_short(v))
    if v < lo or (hi is not None and v > hi):
        raise MappingError(f"{what} must be in {lo}..{hi if hi is not None else 'inf'}", value=v)
    return v


def _list(d: dict[str, Any], key: str, where: str) -> list[Any]:
    v = _get(d, key, where)
    if not isinstance(v, list):
        raise MappingError(f"{where}: field {key!r} must be a list", value=_short(v))
    return v


def _short(v: Any) -> Any:
    """The offending value, cut so that an error stays one readable line."""
    text = repr(v)
    return v if len(text) <= 60 else text[:57] + "..."


def parse_model(md: Any) -> ModelInfo:
    md = _obj(md, "model")
    sizes = {k: _int(md, k, "model", 1, hi) for k, hi in LIMITS.items()}
    fp = _obj(_get(md, "fingerprint", "model"), "model.fingerprint")
    hashes = {}
    for key in ("config_sha256", "qk_sha256"):
        hashes[key] = _str(fp, key, "model.fingerprint")
        if not _SHA256.match(hashes[key]):
            raise MappingError(f"model.fingerprint: {key} must be 64 lowercase hex digits", value=_short(hashes[key]))
    norms = _norms(fp.get("qk_head_norms", []), sizes["num_layers"], sizes["num_heads"] + sizes["num_kv_heads"])
    return ModelInfo(architecture=_str(md, "architecture", "model"), model_type=_str(md, "model_type", "model"),
                     **sizes, **hashes, qk_head_norms=norms)


def _norms(rows: Any, layers: int, per_layer: int) -> tuple[tuple[float, ...], ...]:
    """Empty, or one row per layer of (query heads + key heads) finite non-negative norms."""
    where = "model.fingerprint.qk_head_norms"
    if not isinstance(rows, list):
        raise MappingError(f"{where} must be a list", value=_short(rows))
    if not rows:
        return ()
    if len(rows) != layers:
        raise MappingError(f"{where} has {len(rows)} rows for {layers} layers", value=len(rows))
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != per_layer:
            raise MappingError(f"{where}[{i}] must be a list of {per_layer} numbers (query + key heads)",
                               value=_short(row))
        for x in row:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
                raise MappingError(f"{where}[{i}] holds a value that is not a finite norm", value=_short(x))
        out.append(tuple(float(x) for x in row))
    return tuple(out)


def parse_layer(d: Any, i: int, model: ModelInfo) -> LayerMapping:
    where = f"layer {i}"
    d = _obj(d, where)
    kind = d.get("kind")
    if kind in RESERVED_LAYER_KINDS:
        raise MappingError(f"{where}: layer kind {kind!r} is reserved and not supported by schema "
                           f"version {SCHEMA_VERSION}", value=kind)
    if kind not in LAYER_KINDS:
        raise MappingError(f"{where}: unknown layer kind; expected one of {', '.join(LAYER_KINDS)}", value=_short(kind))
    index = _int(d, "index", where)
    if kind == "dense":
        if d.get("clusters"):
            raise MappingError(f"{where}: a dense layer must not list clusters")
        return LayerMapping(index, "dense")
    raw = _list(d, "clusters", where)
    if not 1 <= len(raw) <= model.num_heads:
        raise MappingError(f"{where}: a clustered layer needs 1..{model.num_heads} clusters", value=len(raw))
    clusters, listed = [], 0
    for c, cd in enumerate(raw):
        cw = f"{where} cluster {c}"
        cd = _obj(cd, cw)
        members = _list(cd, "members", cw)
        for h in members:
            if isinstance(h, bool) or not isinstance(h, int):
                raise MappingError(f"{cw}: head indices must be integers", value=_short(h))
            if not 0 <= h < model.num_heads:
                raise MappingError(f"{cw}: head index out of range 0..{model.num_heads - 1}", value=h)
        listed += len(members)
        if listed > model.num_heads:  # repeats; caught before any set is built from them
            raise MappingError(f"{where}: clusters list {listed} heads but the model has {model.num_heads}; each "
                               "head belongs to exactly one cluster", value=listed)
        clusters.append(Cluster(tuple(members), _int(cd, "representative", cw)))
    if "kept_k_heads" in d:
        kept = d["kept_k_heads"]
        if not isinstance(kept, list) or len(kept) > model.num_kv_heads:
            raise MappingError(f"{where}: kept_k_heads must be a list of at most {model.num_kv_heads} KV heads",
                               value=_short(kept))
        for k in kept:
            _int_value(k, f"{where}: kept_k_heads entry", 0, model.num_kv_heads - 1)
    return LayerMapping(index, "clustered", tuple(clusters))


def parse_weights(data: dict[str, Any], version: int) -> WeightsRef | None:
    """The refit-weights reference (schema version 2): a file name beside the plan and its sha256."""
    ref = data.get("weights")
    if ref is None:
        return None
    if version != SCHEMA_VERSION_WEIGHTS:
        raise MappingError(f"a weights reference needs schema_version {SCHEMA_VERSION_WEIGHTS}", value=version)
    ref = _obj(ref, "weights")
    file, digest = _str(ref, "file", "weights"), _str(ref, "sha256", "weights")
    if not _SHA256.match(digest) or "/" in file or "\\" in file or file in ("", ".", ".."):
        raise MappingError("weights must be {file: a file name beside the plan, sha256: 64 hex digits}",
                           value=_short(ref))
    return WeightsRef(file, digest)


def parse_document(data: Any, source: str) -> tuple[ModelInfo, list[LayerMapping], dict[str, Any], WeightsRef | None]:
    """(model, layers, provenance, weights) of a mapping document, every field type- and size-checked."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MappingError(f"{source} is not a chai-compile cluster mapping (format field missing)",
                           value=_short(data.get("format") if isinstance(data, dict) else type(data).__name__))
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in (SCHEMA_VERSION, SCHEMA_VERSION_WEIGHTS):
        raise MappingError(f"{source}: schema_version {version!r} is not supported; this chai-compile reads "
                           f"versions {SCHEMA_VERSION} and {SCHEMA_VERSION_WEIGHTS}",
                           fix="use the chai-compile version that wrote it, or re-run profile")
    try:
        model = parse_model(_get(data, "model", source))
        layers_raw = _list(data, "layers", source)
        if len(layers_raw) != model.num_layers:
            raise MappingError(f"mapping has {len(layers_raw)} layers but the model has {model.num_layers}",
                               value=len(layers_raw), fix="re-run `chai-compile profile` on this model")
        layers = [parse_layer(d, i, model) for i, d in enumerate(layers_raw)]
        provenance = data.get("provenance")
        if provenance is not None and not isinstance(provenance, dict):
            raise MappingError("field 'provenance' must be an object", value=_short(provenance))
        weights = parse_weights(data, version)
    except MappingError as e:
        if not e.reason.startswith(source):
            e = MappingError(f"{source}: {e.reason}", value=e.value, fix=e.fix)
        raise e from None
    return model, layers, dict(provenance or {}), weights
