"""The plan's JSON form: the one parser (every field's type and size checked before anything is built),
the one writer of the document, and the one semantic validator of a plan.

Why sizes first: a 4 KB file may claim 10^12 heads; nothing may be allocated from a claimed size until it
is bounded (LIMITS) and agrees with what the file actually lists.
"""

from __future__ import annotations

import math
import re
from typing import Any

from chai_compile.choices import LayerKind
from chai_compile.errors import MappingError
from chai_compile.mapping import (
    FORMAT,
    SCHEMA_VERSION_KINDS,
    SCHEMA_VERSION_WEIGHTS,
    SCHEMA_VERSIONS,
    SUPPORTED_KINDS,
    Cluster,
    ClusterMapping,
    LayerMapping,
    ModelInfo,
    Span,
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


def parse_layer(d: Any, i: int, model: ModelInfo, version: int) -> LayerMapping:
    where = f"layer {i}"
    d = _obj(d, where)
    kind = d.get("kind")
    if kind in LayerKind.values() and kind not in SUPPORTED_KINDS and version < SCHEMA_VERSION_KINDS:
        raise MappingError(f"{where}: layer kind {kind!r} is reserved in schema version {version}; it needs "
                           f"schema_version {SCHEMA_VERSION_KINDS}", value=kind)
    if kind not in LayerKind.values():
        raise MappingError(f"{where}: unknown layer kind; expected one of {', '.join(LayerKind.values())}",
                           value=_short(kind))
    index = _int(d, "index", where)
    for key, owner in (("clusters", LayerKind.CLUSTERED), ("source", LayerKind.SHARED), ("spans", LayerKind.SPAN)):
        if kind != owner and d.get(key) is not None and d.get(key) != []:
            raise MappingError(f"{where}: a {kind} layer must not list {key}")
    if kind == LayerKind.DENSE:
        return LayerMapping(index, LayerKind.DENSE)
    if kind == LayerKind.SHARED:
        return LayerMapping(index, LayerKind.SHARED, source=_int(d, "source", where, 0, model.num_layers - 1))
    if kind == LayerKind.SPAN:
        raw = _list(d, "spans", where)
        if len(raw) != model.num_heads:
            raise MappingError(f"{where}: a span layer lists one span per query head ({model.num_heads})",
                               value=len(raw))
        # null: a full-attention head (a retrieval head) inside a span layer
        spans = [None if sd is None else _obj(sd, f"{where} span {h}") for h, sd in enumerate(raw)]
        return LayerMapping(index, LayerKind.SPAN, spans=tuple(
            None if sd is None else
            Span(_int(sd, "sinks", f"{where} span {h}", 0), _int(sd, "window", f"{where} span {h}", 1))
            for h, sd in enumerate(spans)))
    return LayerMapping(index, LayerKind.CLUSTERED, _parse_clusters(d, where, model))


def _parse_clusters(d: dict[str, Any], where: str, model: ModelInfo) -> tuple[Cluster, ...]:
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
    return tuple(clusters)


def parse_weights(data: dict[str, Any], version: int) -> WeightsRef | None:
    """The refit-weights reference (schema version 2): a file name beside the plan and its sha256."""
    ref = data.get("weights")
    if ref is None:
        return None
    if version < SCHEMA_VERSION_WEIGHTS:
        raise MappingError(f"a weights reference needs schema_version {SCHEMA_VERSION_WEIGHTS} or later",
                           value=version)
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
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise MappingError(f"{source}: schema_version {version!r} is not supported; this chai-compile reads "
                           f"versions {', '.join(map(str, SCHEMA_VERSIONS))}",
                           fix="use the chai-compile version that wrote it, or re-run profile")
    try:
        model = parse_model(_get(data, "model", source))
        layers_raw = _list(data, "layers", source)
        if len(layers_raw) != model.num_layers:
            raise MappingError(f"mapping has {len(layers_raw)} layers but the model has {model.num_layers}",
                               value=len(layers_raw), fix="re-run `chai-compile profile` on this model")
        layers = [parse_layer(d, i, model, version) for i, d in enumerate(layers_raw)]
        provenance = data.get("provenance")
        if provenance is not None and not isinstance(provenance, dict):
            raise MappingError("field 'provenance' must be an object", value=_short(provenance))
        weights = parse_weights(data, version)
    except MappingError as e:
        if not e.reason.startswith(source):
            e = MappingError(f"{source}: {e.reason}", value=e.value, fix=e.fix)
        raise e from None
    return model, layers, dict(provenance or {}), weights


def to_document(plan: ClusterMapping) -> dict[str, Any]:
    """The JSON document of a plan (what `ClusterMapping.write` writes), at the plan's schema version."""
    m = plan.model
    weights = {"weights": {"file": plan.weights.file, "sha256": plan.weights.sha256}} if plan.weights else {}
    return {
        "format": FORMAT,
        "schema_version": plan.schema_version,
        "model": {
            "architecture": m.architecture,
            "model_type": m.model_type,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "hidden_size": m.hidden_size,
            "fingerprint": {
                "config_sha256": m.config_sha256,
                "qk_sha256": m.qk_sha256,
                "qk_head_norms": [list(r) for r in m.qk_head_norms],
            },
        },
        "layers": [_layer_document(lm, m) for lm in plan.layers],
        "provenance": plan.provenance,
        **weights,
    }


def _layer_document(lm: LayerMapping, m: ModelInfo) -> dict[str, Any]:
    head = {"index": lm.index, "kind": str(lm.kind)}
    if lm.kind == LayerKind.SHARED:
        return {**head, "source": lm.source}
    if lm.kind == LayerKind.SPAN:
        return {**head, "spans": [None if sp is None else {"sinks": sp.sinks, "window": sp.window}
                                  for sp in lm.spans]}
    if lm.kind == LayerKind.DENSE:
        return head
    return {
        **head,
        "clusters": [{"members": list(c.members), "representative": c.representative} for c in lm.clusters],
        "kept_k_heads": lm.kept_k_heads(m.num_heads, m.num_kv_heads),
    }


def validate_plan(plan: ClusterMapping) -> None:
    """Raise MappingError (carrying the offending value) unless every layer is consistent with the model."""
    m = plan.model
    for name, hi in LIMITS.items():
        if not 1 <= getattr(m, name) <= hi:
            raise MappingError(f"model.{name} must be in 1..{hi}", value=getattr(m, name))
    if m.num_heads <= 0 or m.num_kv_heads <= 0 or m.num_heads % m.num_kv_heads:
        raise MappingError("model.num_heads must be a positive multiple of model.num_kv_heads",
                           value=(m.num_heads, m.num_kv_heads))
    if len(plan.layers) != m.num_layers:
        raise MappingError(f"mapping has {len(plan.layers)} layers but the model has {m.num_layers}",
                           value=len(plan.layers), fix="re-run `chai-compile profile` on this model")
    for i, lm in enumerate(plan.layers):
        where = f"layer {i}"
        if lm.index != i:
            raise MappingError(f"{where}: index field is {lm.index}, expected {i}", value=lm.index)
        if lm.kind not in LayerKind.values():
            raise MappingError(f"{where}: unknown layer kind", value=lm.kind)
        for key, owner in (("clusters", LayerKind.CLUSTERED), ("source", LayerKind.SHARED), ("spans", LayerKind.SPAN)):
            if lm.kind != owner and getattr(lm, key) not in (None, ()):
                raise MappingError(f"{where}: a {lm.kind} layer must not list {key}")
        if lm.kind == LayerKind.SHARED:
            _check_source(plan, i, lm.source)
        elif lm.kind == LayerKind.SPAN:
            _check_spans(where, lm.spans, m.num_heads)
        elif lm.kind == LayerKind.CLUSTERED:
            _check_clusters(where, lm.clusters, m.num_heads)


def _check_source(plan: ClusterMapping, i: int, source: int | None) -> None:
    """A shared layer reuses the probabilities of an earlier layer that computes its own."""
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < i:
        raise MappingError(f"layer {i}: a shared layer's source must be an earlier layer (0..{i - 1})", value=source)
    if plan.layers[source].kind == LayerKind.SHARED:
        raise MappingError(f"layer {i}: source layer {source} is itself shared; name the layer that computes "
                           "the probabilities", value=source)


def _check_spans(where: str, spans: tuple[Span | None, ...], num_heads: int) -> None:
    if len(spans) != num_heads:
        raise MappingError(f"{where}: a span layer lists one span per query head ({num_heads})", value=len(spans))
    if all(sp is None for sp in spans):
        raise MappingError(f"{where}: a span layer needs at least one span head (all null: make it dense)")
    for h, sp in enumerate(spans):
        if sp is None:
            continue
        if isinstance(sp.sinks, bool) or not isinstance(sp.sinks, int) or sp.sinks < 0:
            raise MappingError(f"{where} head {h}: sinks must be an integer >= 0", value=sp.sinks)
        if isinstance(sp.window, bool) or not isinstance(sp.window, int) or sp.window < 1:
            raise MappingError(f"{where} head {h}: window must be an integer >= 1", value=sp.window)


def _check_clusters(where: str, clusters: tuple[Cluster, ...], num_heads: int) -> None:
    if not clusters:
        raise MappingError(f"{where}: a clustered layer needs at least one cluster")
    seen: dict[int, int] = {}
    for c, cl in enumerate(clusters):
        if not cl.members:
            raise MappingError(f"{where} cluster {c}: no members")
        for h in cl.members:
            if not isinstance(h, int) or not 0 <= h < num_heads:
                raise MappingError(f"{where} cluster {c}: head index out of range 0..{num_heads - 1}", value=h)
            if h in seen:
                raise MappingError(f"{where}: head {h} is in clusters {seen[h]} and {c}; each head belongs to "
                                   "exactly one cluster", value=h)
            seen[h] = c
        if cl.representative not in cl.members:
            raise MappingError(f"{where} cluster {c}: representative is not a member of its cluster",
                               value=cl.representative)
    if len(seen) != num_heads:
        missing = [h for h in range(num_heads) if h not in seen]
        raise MappingError(f"{where}: heads in no cluster", value=missing[:16])
