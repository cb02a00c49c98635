"""The refit weights a plan carries: one safetensors file, referenced from the plan by name and sha256.

Tensors, per refit layer l:
    layers.l.q.h.weight  [d, hidden]   representative h's refit Q projection rows (and .bias [d])
    layers.l.o_proj.weight [hidden, H*d]  the refit output projection, in the original head order
A plan without weights uses the checkpoint's own; one reader and one writer live here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch

from chai_compile.choices import LayerKind
from chai_compile.errors import MappingError
from chai_compile.mapping import ClusterMapping, WeightsRef

FORMAT = "chai-plan-weights"
VERSION = "1"
_NAME = re.compile(r"^layers\.(\d+)\.(?:q\.(\d+)\.(weight|bias)|o_proj\.weight)$")


@dataclasses.dataclass
class LayerWeights:
    q_rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    o_weight: torch.Tensor | None = None


PlanWeights = dict[int, LayerWeights]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_weights(weights: PlanWeights, path: Path) -> WeightsRef:
    """Write the tensors and return the reference the plan stores."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, lw in sorted(weights.items()):
        for head, (w, b) in sorted(lw.q_rows.items()):
            tensors[f"layers.{layer}.q.{head}.weight"] = w.detach().cpu().contiguous()
            if b is not None:
                tensors[f"layers.{layer}.q.{head}.bias"] = b.detach().cpu().contiguous()
        if lw.o_weight is not None:
            tensors[f"layers.{layer}.o_proj.weight"] = lw.o_weight.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": VERSION})
    return WeightsRef(file=Path(path).name, sha256=file_sha256(Path(path)))


def load_weights(mapping: ClusterMapping) -> PlanWeights | None:
    """The weights a plan references (checked against its sha256 and shapes), or None for a plan without."""
    ref = mapping.weights
    if ref is None:
        return None
    path = Path(mapping.source_dir or ".") / ref.file
    if not path.is_file():
        raise MappingError(f"the plan references refit weights {ref.file} but {path} does not exist",
                           fix="keep the weights file beside the plan file, or re-run `chai-compile plan`")
    digest = file_sha256(path)
    if digest != ref.sha256:
        raise MappingError(f"the weights file {path} does not match its plan's sha256", value=digest[:16],
                           fix="use the weights file written together with this plan")
    from safetensors import safe_open

    out: PlanWeights = {}
    m = mapping.model
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise MappingError(f"{path} is not a chai-compile plan weights file", fix="pass the plan's own weights")
        for name in f.keys():
            match = _NAME.match(name)
            if match is None:
                raise MappingError(f"unexpected tensor in {path}", value=name)
            layer, head, part = int(match[1]), match[2], match[3]
            t = f.get_tensor(name)
            lw = out.setdefault(layer, LayerWeights())
            if head is None:
                expected = (m.hidden_size, m.num_heads * m.head_dim)
                lw.o_weight = t
            else:
                expected = (m.head_dim, m.hidden_size) if part == "weight" else (m.head_dim,)
                w, b = lw.q_rows.get(int(head), (None, None))
                lw.q_rows[int(head)] = (t, b) if part == "weight" else (w, t)
            if layer >= m.num_layers or tuple(t.shape) != expected:
                raise MappingError(f"tensor {name} in {path} does not fit the plan's model", value=list(t.shape),
                                   fix=f"expected shape {list(expected)} for a layer below {m.num_layers}")
    for layer, lw in out.items():
        lm = mapping.layers[layer]
        if lm.kind != LayerKind.CLUSTERED:
            raise MappingError(f"{path} holds refit weights for layer {layer}, which the plan keeps dense",
                               fix="use the weights file written together with this plan")
        reps = set(lm.representatives(m.num_heads))
        for head, (w, _) in lw.q_rows.items():
            if w is None or head not in reps:
                raise MappingError(f"refit Q rows for head {head} of layer {layer}, which is no representative there",
                                   fix="use the weights file written together with this plan")
    return out
