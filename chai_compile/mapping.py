"""The cluster mapping: a typed, versioned, validated record of which heads share attention.

One writer (`ClusterMapping.write`) and one reader (`ClusterMapping.read`). The JSON form is
documented in docs/mapping-format.md. Everything the reader accepts has been validated: head
indices in range, every head in exactly one cluster, representatives inside their clusters, the
derived K-cache heads consistent, and (via `check_model`) the model fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chai_compile.errors import FingerprintMismatchError, MappingError
from chai_compile.fileio import atomic_write_text

FORMAT = "chai-compile/cluster-mapping"
SCHEMA_VERSION = 1
# Version 2 adds a reference to refit weights; a plan without weights is still written as version 1,
# and a reader that only knows version 1 refuses a plan whose weights it would silently ignore.
SCHEMA_VERSION_WEIGHTS = 2
# Layer kinds this schema version can carry. "shared" (cross-layer reuse of attention
# probabilities) is reserved for a later version; readers of v1 reject it by name.
LAYER_KINDS = ("dense", "clustered")
RESERVED_LAYER_KINDS = ("shared",)


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
class LayerMapping:
    index: int
    kind: Literal["dense", "clustered"]
    clusters: tuple[Cluster, ...] = ()

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    def representatives(self, num_heads: int) -> list[int]:
        if self.kind == "dense":
            return list(range(num_heads))
        return [cl.representative for cl in self.clusters]

    def kept_k_heads(self, num_heads: int, num_kv_heads: int) -> list[int]:
        """KV heads whose keys some representative reads (all of them for a dense layer)."""
        if self.kind == "dense":
            return list(range(num_kv_heads))
        group = num_heads // num_kv_heads
        return sorted({cl.representative // group for cl in self.clusters})


@dataclass(frozen=True)
class FusedLayout:
    """Contiguous-cluster layout for fused kernels and the fused ONNX node.

    Query heads are permuted so each cluster is one range `[offsets[c], offsets[c+1])`; the
    output projection's input columns are permuted the same way, which is exact.
    """

    permutation: tuple[int, ...]  # permuted position -> original query head
    cluster_offsets: tuple[int, ...]  # C + 1 entries
    k_head_index: tuple[int, ...]  # per cluster: index into the layer's kept K heads
    v_head_index: tuple[int, ...]  # per permuted query head: index into the V heads


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

    def cache_bytes(self, tokens: int, elem_bytes: int, membership: str = "static") -> list[tuple[int, int]]:
        """Predicted (K bytes, V bytes) per layer for `tokens` cached tokens (batch x length).

        K holds the kept KV heads under static membership (every KV head under dynamic, whose
        representatives are chosen per request); V always holds every KV head.
        """
        m = self.model
        per_head = tokens * m.head_dim * elem_bytes
        k_heads = [m.num_kv_heads if membership == "dynamic" else len(self.kept_k_heads(i))
                   for i in range(m.num_layers)]
        return [(k * per_head, m.num_kv_heads * per_head) for k in k_heads]

    def fused_layout(self, index: int) -> FusedLayout:
        m = self.model
        lm = self.layers[index]
        group = m.group_size
        clusters = lm.clusters if lm.kind == "clustered" else tuple(
            Cluster((h,), h) for h in range(m.num_heads)
        )
        kept = lm.kept_k_heads(m.num_heads, m.num_kv_heads)
        perm: list[int] = []
        offsets = [0]
        for cl in clusters:
            # representative first: kernels that want one head's q per cluster find it at offset
            perm.extend([cl.representative] + [h for h in cl.members if h != cl.representative])
            offsets.append(len(perm))
        return FusedLayout(
            permutation=tuple(perm),
            cluster_offsets=tuple(offsets),
            k_head_index=tuple(kept.index(cl.representative // group) for cl in clusters),
            v_head_index=tuple(h // group for h in perm),
        )

    @property
    def origin(self) -> str:
        """How the plan was made: "profile" (attention similarity), "planned" (measured loss) or
        "planned+refit" (measured loss, with reconstruction weights)."""
        if self.weights is not None:
            return "planned+refit"
        return "planned" if self.provenance.get("planner") else "profile"

    def summary(self) -> dict[str, Any]:
        """Head and cache counts: what the mapping removes from the model."""
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
            "clustered_layers": sum(lm.kind == "clustered" for lm in self.layers),
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
            if lm.kind == "clustered":
                cls_sorted = sorted(
                    (Cluster(tuple(sorted(c.members)), c.representative) for c in lm.clusters),
                    key=lambda c: c.members[0] if c.members else -1,
                )
                lm = LayerMapping(lm.index, "clustered", tuple(cls_sorted))
            canon.append(lm)
        mapping = cls(model, tuple(canon), dict(provenance or {}))
        mapping.validate()
        return mapping

    @classmethod
    def identity(cls, model: ModelInfo, provenance: dict[str, Any] | None = None) -> ClusterMapping:
        """Every head its own cluster in every layer: must reproduce the original model."""
        layers = [
            LayerMapping(i, "clustered", tuple(Cluster((h,), h) for h in range(model.num_heads)))
            for i in range(model.num_layers)
        ]
        return cls.build(model, layers, provenance or {"kind": "identity"})

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        from chai_compile.mapping_schema import LIMITS

        m = self.model
        for name, hi in LIMITS.items():
            if not 1 <= getattr(m, name) <= hi:
                raise MappingError(f"model.{name} must be in 1..{hi}", value=getattr(m, name))
        if m.num_heads <= 0 or m.num_kv_heads <= 0 or m.num_heads % m.num_kv_heads:
            raise MappingError(
                "model.num_heads must be a positive multiple of model.num_kv_heads",
                value=(m.num_heads, m.num_kv_heads),
            )
        if len(self.layers) != m.num_layers:
            raise MappingError(
                f"mapping has {len(self.layers)} layers but the model has {m.num_layers}",
                value=len(self.layers),
                fix="re-run `chai-compile profile` on this model",
            )
        for i, lm in enumerate(self.layers):
            where = f"layer {i}"
            if lm.index != i:
                raise MappingError(f"{where}: index field is {lm.index}, expected {i}", value=lm.index)
            if lm.kind == "dense":
                if lm.clusters:
                    raise MappingError(f"{where}: a dense layer must not list clusters")
                continue
            if lm.kind != "clustered":
                raise MappingError(f"{where}: unknown layer kind", value=lm.kind)
            if not lm.clusters:
                raise MappingError(f"{where}: a clustered layer needs at least one cluster")
            seen: dict[int, int] = {}
            for c, cl in enumerate(lm.clusters):
                if not cl.members:
                    raise MappingError(f"{where} cluster {c}: no members")
                for h in cl.members:
                    if not isinstance(h, int) or not 0 <= h < m.num_heads:
                        raise MappingError(
                            f"{where} cluster {c}: head index out of range 0..{m.num_heads - 1}", value=h
                        )
                    if h in seen:
                        raise MappingError(
                            f"{where}: head {h} is in clusters {seen[h]} and {c}; each head belongs to "
                            "exactly one cluster",
                            value=h,
                        )
                    seen[h] = c
                if cl.representative not in cl.members:
                    raise MappingError(
                        f"{where} cluster {c}: representative is not a member of its cluster",
                        value=cl.representative,
                    )
            if len(seen) != m.num_heads:
                missing = [h for h in range(m.num_heads) if h not in seen]
                raise MappingError(f"{where}: heads in no cluster", value=missing[:16])

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

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        m = self.model
        weights = {"weights": {"file": self.weights.file, "sha256": self.weights.sha256}} if self.weights else {}
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION_WEIGHTS if self.weights else SCHEMA_VERSION,
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
            "layers": [_layer_to_dict(lm, m) for lm in self.layers],
            "provenance": self.provenance,
            **weights,
        }

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


def _layer_to_dict(lm: LayerMapping, m: ModelInfo) -> dict[str, Any]:
    if lm.kind == "dense":
        return {"index": lm.index, "kind": "dense"}
    return {
        "index": lm.index,
        "kind": "clustered",
        "clusters": [{"members": list(c.members), "representative": c.representative} for c in lm.clusters],
        "kept_k_heads": lm.kept_k_heads(m.num_heads, m.num_kv_heads),
    }


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
