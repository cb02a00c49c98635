"""Per-layer K and V head counts of an exported decoder, read from its graph inputs (the authority) and checked
against the manifest when one is beside the graph."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chai_compile.errors import ExportError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_BOUNDED = re.compile(r"past_key_values\.\d+\.(key|value)_span\.\d+$")  # span layers (export/cache_layout.py)


@dataclass(frozen=True)
class CacheHeads:
    k_heads: tuple[int, ...]
    v_heads: tuple[int, ...]
    head_dim: int

    def shape(self, name: str, batch: int, length: int) -> tuple[int, int, int, int]:
        """[batch, heads, length, head_dim] of the past or present tensor called `name`."""
        m = re.search(r"\.(\d+)\.(key|value)$", name)
        if m is None:
            raise ExportError("not a cache tensor name", value=name, fix="use past_key_values.N.key / present.N.value")
        heads = self.k_heads if m.group(2) == "key" else self.v_heads
        return (batch, heads[int(m.group(1))], length, self.head_dim)


def cache_heads(input_shapes: dict[str, list[Any]], artifact_dir: str | Path | None = None) -> CacheHeads:
    """From `{input name: shape}` (ONNX Runtime's session inputs); dims 1 and 3 of every past are fixed numbers."""
    bounded = sorted(n for n in input_shapes if _BOUNDED.match(n))
    if bounded:  # Optimum and onnxruntime-genai feed one K and one V per layer: the bounded pairs would be missing
        raise ExportError("the graph keeps bounded span caches as their own inputs, which this runtime does not feed",
                          value=bounded[0], fix="run it with chai_compile.export.OrtDecoder (as `chai-compile "
                          "verify-artifact` does), or export a plan without span layers")
    layers: dict[int, dict[str, Any]] = {}
    for name, shape in input_shapes.items():
        m = _PAST.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    if not layers or sorted(layers) != list(range(len(layers))) or any(len(v) != 2 for v in layers.values()):
        raise ExportError("the graph has no complete past_key_values.N.key/value inputs",
                          fix="load a decoder exported with its KV cache (chai-compile export)")
    k, v, dims = [], [], set()
    for i in range(len(layers)):
        ks, vs = layers[i]["key"], layers[i]["value"]
        if not all(isinstance(d, int) for d in (ks[1], ks[3], vs[1], vs[3])):
            raise ExportError(f"past_key_values.{i} has a symbolic head count or head size", value=[ks, vs],
                              fix="re-export with chai-compile export, which fixes both in the graph")
        k.append(ks[1])
        v.append(vs[1])
        dims |= {ks[3], vs[3]}
    if len(dims) != 1:
        raise ExportError("K and V head sizes differ across the cache", value=sorted(dims))
    heads = CacheHeads(tuple(k), tuple(v), dims.pop())
    _check_manifest(heads, artifact_dir)
    return heads


def _check_manifest(heads: CacheHeads, artifact_dir: str | Path | None) -> None:
    manifest = Path(artifact_dir) / "manifest.json" if artifact_dir else None
    if manifest is None or not manifest.is_file():
        return
    cache = json.loads(manifest.read_text()).get("cache")
    if cache and (tuple(cache["k_heads"]), tuple(cache["v_heads"])) != (heads.k_heads, heads.v_heads):
        raise ExportError("manifest.json's cache head counts disagree with the graph's inputs",
                          value={"manifest": cache, "graph": [heads.k_heads, heads.v_heads]},
                          fix="re-export the directory; a file in it was replaced")
