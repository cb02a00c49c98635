"""The plan (the cluster mapping grown up): a typed, versioned, validated record of what each layer does.

One writer (`ClusterMapping.write`) and one reader (`ClusterMapping.read`); the JSON form, its versions
and its checks live in `mapping_schema` and are documented in docs/mapping-format.md. Everything the
reader accepts has been validated: head indices in range, every head in exactly one cluster,
representatives inside their clusters, the derived K-cache heads consistent, a shared layer's source
earlier and computing its own probabilities, spans well formed, and (via `check_model`) the model
fingerprint. `plan_sha256` fingerprints the plan itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chai_compile.choices import LayerKind, Membership
from chai_compile.errors import FingerprintMismatchError, MappingError
from chai_compile.fileio import atomic_write_text

FORMAT = "chai-compile/cluster-mapping"
# A plan is written with the lowest version that carries everything in it, so a reader that knows only an
# older version still reads what it fully understands and refuses (by number) what it would silently drop:
# 1: dense and clustered layers; 2: + refit weights; 3: + shared and span layers.
SCHEMA_VERSION = 1
SCHEMA_VERSION_WEIGHTS = 2
SCHEMA_VERSION_KINDS = 3
SCHEMA_VERSIONS = (SCHEMA_VERSION, SCHEMA_VERSION_WEIGHTS, SCHEMA_VERSION_KINDS)
# Kinds of schema versions 1 and 2, and the kinds the fused export carries out. The rewrite and the portable
# export carry out every kind.
SUPPORTED_KINDS = (LayerKind.DENSE, LayerKind.CLUSTERED)


class UnsupportedLayerKindError(MappingError):
    """A valid plan asks for a layer transform this version cannot carry out."""

    default_fix = "use a plan with only dense and clustered layers here, or run the plan through the PyTorch rewrite"


@dataclass(frozen=True)
class Cluster:
    members: tuple[int, ...]
    representative: int


@dataclass(frozen=True)
class WeightsRef:
    """Refit weights a plan carries: a safetensors file beside the plan, and its sha256."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model a mapping was profiled on."""

    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    config_sha256: str
    qk_sha256: str
    # Per layer: L2 norm of each query head's projection rows, then of each key head's. Lets a
    # checkpoint loaded at another precision be recognised when the exact hash differs.
    qk_head_norms: tuple[tuple[float, ...], ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Span:
    """One head's attention span: the first `sinks` tokens plus the last `window` tokens."""

    sinks: int
    window: int


@dataclass(frozen=True)
class LayerMapping:
    """One layer of the plan. `clusters` for CLUSTERED; `source` (an earlier layer whose probabilities it
    reuses) for SHARED; `spans` (one per query head, None for a full-attention head) for SPAN; nothing
    for DENSE. A KV head's cache is bounded only when every query head that reads it has a span."""

    index: int
    kind: LayerKind
    clusters: tuple[Cluster, ...] = ()
    source: int | None = None
    spans: tuple[Span | None, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LayerKind) and self.kind in LayerKind.values():
            object.__setattr__(self, "kind", LayerKind(self.kind))  # a plain string from older callers

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    def representatives(self, num_heads: int) -> list[int]:
        """Query heads that compute scores: none for a shared layer (it reuses its source's)."""
        if self.kind == LayerKind.CLUSTERED:
            return [cl.representative for cl in self.clusters]
        return [] if self.kind == LayerKind.SHARED else list(range(num_heads))

    def kept_k_heads(self, num_heads: int, num_kv_heads: int) -> list[int]:
        """KV heads whose keys some representative reads (all of them for a dense or span layer)."""
        if self.kind == LayerKind.CLUSTERED:
            group = num_heads // num_kv_heads
            return sorted({cl.representative // group for cl in self.clusters})
        return [] if self.kind == LayerKind.SHARED else list(range(num_kv_heads))

    def head_tokens(self, num_heads: int, num_kv_heads: int, length: int,
                    membership: str = Membership.STATIC) -> tuple[int, int]:
        """(K, V) tokens this layer caches for one sequence of `length` tokens, summed over its KV heads.

        The one place the cache arithmetic lives (the plan's bytes, the planner's budget and verify's
        check all derive from it). K holds the kept KV heads under static membership (every KV head of a
        clustered layer under dynamic, whose representatives are chosen per request), none in a shared
        layer; V holds every KV head. In a span layer a KV head read only by span heads holds
        min(length, largest sinks + largest window) of K and V (the union of its query heads' spans).
        """
        if self.kind == LayerKind.SPAN:
            group = num_heads // num_kv_heads
            held = sum(_span_tokens(self.spans[g * group : (g + 1) * group], length) for g in range(num_kv_heads))
            return held, held
        dynamic = membership == Membership.DYNAMIC and self.kind == LayerKind.CLUSTERED
        k = num_kv_heads if dynamic else len(self.kept_k_heads(num_heads, num_kv_heads))
        return k * length, num_kv_heads * length


@dataclass(frozen=True)
class ClusterMapping:
    model: ModelInfo
    layers: tuple[LayerMapping, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    weights: WeightsRef | None = None
    source_dir: str | None = field(default=None, compare=False)  # where it was read from (weights live there)

    # ---- derived quantities -------------------------------------------------------------
    def layer(self, index: int) -> LayerMapping:
        return self.layers[index]

    def kept_k_heads(self, index: int) -> list[int]:
        return self.layers[index].kept_k_heads(self.model.num_heads, self.model.num_kv_heads)

    def cache_bytes(self, tokens: int, elem_bytes: int, membership: str = Membership.STATIC, batch: int = 1
                    ) -> list[tuple[int, int]]:
        """Predicted (K bytes, V bytes) per layer for `tokens` cached tokens (batch x length); see
        `LayerMapping.head_tokens`."""
        m = self.model
        per_token = m.head_dim * elem_bytes * batch
        return [tuple(t * per_token for t in lm.head_tokens(m.num_heads, m.num_kv_heads, tokens // batch,
                                                              membership))  # type: ignore[misc]
                for lm in self.layers]

    @property
    def origin(self) -> str:
        """How the plan was made: "profile" (attention similarity), "planned" (measured loss) or
        "planned+refit" (measured loss, with reconstruction weights)."""
        if self.weights is not None:
            return "planned+refit"
        return "planned" if self.provenance.get("planner") else "profile"

    @property
    def schema_version(self) -> int:
        """The lowest schema version that carries this plan (see SCHEMA_VERSIONS)."""
        if any(lm.kind not in SUPPORTED_KINDS for lm in self.layers):
            return SCHEMA_VERSION_KINDS
        return SCHEMA_VERSION_WEIGHTS if self.weights else SCHEMA_VERSION

    def plan_sha256(self) -> str:
        """Fingerprint of what the plan does (model identity, layers, weights reference), provenance aside."""
        doc = self.to_dict()
        doc.pop("provenance")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def require_supported(self, what: str, kinds: Sequence[LayerKind] = SUPPORTED_KINDS, fix: str | None = None
                          ) -> None:
        """Raise UnsupportedLayerKindError naming the first layer whose kind `what` (which carries out
        `kinds`) cannot carry out; `fix`: what to do instead, when the error's default does not say it."""
        for lm in self.layers:
            if lm.kind not in kinds:
                raise UnsupportedLayerKindError(
                    f"layer {lm.index}: {what} of a {lm.kind} layer is not supported by this version; it reads "
                    f"and validates such plans, and carries out {', '.join(kinds)} layers",
                    value=str(lm.kind), fix=fix)

    def summary(self) -> dict[str, Any]:
        """Head and cache counts: what the mapping removes from the model.

        `kv_cache_saving` counts what holds at every context length (K heads dropped by clusters and
        shared layers); a span layer's saving depends on the context, so it is left out here and flagged
        by `span_layers` (`plan.budget.kv_saving` and `verify --kv-context` give it at a stated length).
        """
        m = self.model
        q_heads = k_heads = 0
        for lm in self.layers:
            q_heads += len(lm.representatives(m.num_heads))
            k_heads += len(lm.kept_k_heads(m.num_heads, m.num_kv_heads))
        total_q = m.num_layers * m.num_heads
        total_kv = m.num_layers * m.num_kv_heads
        # Native cache holds K and V for every KV head; CHAI keeps V whole and K for kept heads.
        native = 2 * total_kv
        chai = total_kv + k_heads
        return {
            "layers": m.num_layers,
            "clustered_layers": sum(lm.kind == LayerKind.CLUSTERED for lm in self.layers),
            "shared_layers": sum(lm.kind == LayerKind.SHARED for lm in self.layers),
            "span_layers": sum(lm.kind == LayerKind.SPAN for lm in self.layers),
            "query_heads_total": total_q,
            "score_heads_kept": q_heads,
            "k_heads_total": total_kv,
            "k_heads_kept": k_heads,
            "k_cache_saving": 1.0 - k_heads / total_kv,
            "kv_cache_saving": 1.0 - chai / native,
            "clusters_per_layer": [len(lm.representatives(m.num_heads)) for lm in self.layers],
        }

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: ModelInfo,
        layers: Sequence[LayerMapping],
        provenance: dict[str, Any] | None = None,
    ) -> ClusterMapping:
        """Canonicalise (sorted members, clusters by first member) and validate."""
        canon = []
        for lm in layers:
            if lm.kind == LayerKind.CLUSTERED:
                cls_sorted = sorted(
                    (Cluster(tuple(sorted(c.members)), c.representative) for c in lm.clusters),
                    key=lambda c: c.members[0] if c.members else -1,
                )
                lm = dataclasses.replace(lm, clusters=tuple(cls_sorted))
            canon.append(lm)
        mapping = cls(model, tuple(canon), dict(provenance or {}))
        mapping.validate()
        return mapping

    @classmethod
    def identity(cls, model: ModelInfo, provenance: dict[str, Any] | None = None) -> ClusterMapping:
        """Every head its own cluster in every layer: must reproduce the original model."""
        layers = [
            LayerMapping(i, LayerKind.CLUSTERED, tuple(Cluster((h,), h) for h in range(model.num_heads)))
            for i in range(model.num_layers)
        ]
        return cls.build(model, layers, provenance or {"kind": "identity"})

    def validate(self) -> None:
        """Raise MappingError (with the offending value) unless the plan is consistent with its model."""
        from chai_compile.mapping_schema import validate_plan

        validate_plan(self)

    def check_model(self, other: ModelInfo) -> None:
        """Refuse to apply this mapping to a model it was not profiled on."""
        mine = self.model
        for name in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            a, b = getattr(mine, name), getattr(other, name)
            if a != b:
                raise FingerprintMismatchError(
                    f"mapping is for another model: {name} is {a} in the mapping but {b} in the model",
                    value=b,
                    fix="profile this model with `chai-compile profile` and use that mapping",
                )
        if mine.config_sha256 != other.config_sha256:
            raise FingerprintMismatchError(
                "mapping is for another model configuration: the config fingerprint differs "
                f"({mine.config_sha256[:12]} in the mapping, {other.config_sha256[:12]} in the model), e.g. a "
                "changed rope_theta or vocabulary size",
                fix="profile this model with `chai-compile profile` and use that mapping",
            )
        if mine.qk_sha256 == other.qk_sha256:
            return
        if mine.qk_head_norms and _norms_close(mine.qk_head_norms, other.qk_head_norms):
            return  # same weights at another precision
        raise FingerprintMismatchError(
            "mapping is for another checkpoint: the Q/K weight fingerprint differs "
            f"({mine.qk_sha256[:12]} in the mapping, {other.qk_sha256[:12]} in the model)",
            fix="profile this checkpoint with `chai-compile profile` and use that mapping",
        )

    # ---- JSON: the one writer and the one reader -----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from chai_compile.mapping_schema import to_document

        return to_document(self)

    def to_json(self) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        # Keep number lists on one line: a mapping stays readable and diffable.
        return re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> ClusterMapping:
        from chai_compile.fileio import read_json_strict

        path = Path(path)
        if not path.is_file():
            raise MappingError("mapping file not found", value=str(path), fix="pass the mapping.json that "
                               "`chai-compile profile` wrote")
        data = read_json_strict(path, MappingError, "mapping file", "regenerate it with `chai-compile profile`")
        return dataclasses.replace(cls.from_dict(data, source=str(path)), source_dir=str(path.parent))

    @classmethod
    def from_dict(cls, data: Any, source: str = "mapping") -> ClusterMapping:
        from chai_compile.mapping_schema import parse_document

        model, layers, provenance, weights = parse_document(data, source)
        mapping = cls(model, tuple(layers), provenance, weights)
        mapping.validate()
        for i, d in enumerate(data["layers"]):
            if "kept_k_heads" in d and list(d["kept_k_heads"]) != mapping.kept_k_heads(i):
                raise MappingError(
                    f"{source} layer {i}: kept_k_heads {d['kept_k_heads']} does not match the KV heads "
                    f"its representatives read {mapping.kept_k_heads(i)}",
                    value=d["kept_k_heads"],
                )
        return mapping


def _span_tokens(spans: Sequence[Span | None], length: int) -> int:
    """Tokens one KV head holds for one sequence: all of them unless every query head reading it has a span."""
    if any(sp is None for sp in spans):
        return length
    return min(length, max(sp.sinks for sp in spans) + max(sp.window for sp in spans))  # type: ignore[union-attr]


def _norms_close(a: Iterable[Iterable[float]], b: Iterable[Iterable[float]], rtol: float = 2e-3) -> bool:
    ra, rb = [list(x) for x in a], [list(x) for x in b]
    if len(ra) != len(rb):
        return False
    for xa, xb in zip(ra, rb, strict=True):
        if len(xa) != len(xb):
            return False
        for u, v in zip(xa, xb, strict=True):
            if not abs(u - v) <= rtol * max(abs(u), abs(v), 1e-12):  # `not <=`: NaN never agrees
                return False
    return True
