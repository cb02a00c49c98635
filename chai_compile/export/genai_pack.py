"""A CHAI export rearranged so onnxruntime-genai runs it, keeping the smaller K cache.

onnxruntime-genai sizes each layer's cache from the graph's past *key* input and gives the value the same shape
(docs/runtimes.md). A clustered layer keeps kh < vh K heads, so its K and V pasts differ. Here every such layer's
cache is carried as two equal tensors of [batch, kh + vh, length, head_dim / 2]: `.key` holds the first half of
every K and V head's vector, `.value` the second half. Inside the graph the halves are joined and split back into
K [batch, kh, ., head_dim] and V [batch, vh, ., head_dim] before the original nodes, and the presents are packed the
same way after them. Bytes per token stay (kh + vh) * head_dim per layer, exactly the CHAI cache; dense layers
(kh == vh) are left as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from chai_compile.choices import DATA_NAME, GRAPH_NAME
from chai_compile.errors import ExportError
from chai_compile.runtime.heads import CacheHeads, cache_heads

LAYOUT = "chai-genai-halves"
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "mapping.json")


def _dims(value_info: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _set_cache_shape(value_info: Any, heads: int, head_dim: int) -> None:
    dims = value_info.type.tensor_type.shape.dim
    dims[1].dim_value = heads
    dims[3].dim_value = head_dim


def _rename_uses(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name == old:
                node.input[j] = new


def _rename_producer(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for j, name in enumerate(node.output):
            if name == old:
                node.output[j] = new
    _rename_uses(graph, old, new)  # an output may also feed later nodes


def pack_graph(model: Any, heads: CacheHeads) -> list[int]:
    """Rewrite `model` (an onnx ModelProto) in place; returns the packed layers."""
    from onnx import helper, numpy_helper

    half = heads.head_dim // 2
    g = model.graph
    inputs = {v.name: v for v in g.input}
    outputs = {v.name: v for v in g.output}
    front, back, packed = [], [], []
    for i, (kh, vh) in enumerate(zip(heads.k_heads, heads.v_heads, strict=True)):
        if kh == vh:
            continue
        packed.append(i)
        pk, pv, ok, ov = (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key",
                          f"present.{i}.value")
        split_heads = f"chai.pack.{i}.heads"
        split_halves = f"chai.pack.{i}.halves"
        g.initializer.extend([numpy_helper.from_array(_i64([kh, vh]), split_heads),
                              numpy_helper.from_array(_i64([half, half]), split_halves)])
        _rename_uses(g, pk, f"{pk}.unpacked")
        _rename_uses(g, pv, f"{pv}.unpacked")
        front += [helper.make_node("Concat", [pk, pv], [f"{pk}.joined"], axis=3, name=f"chai_unpack_join_{i}"),
                  helper.make_node("Split", [f"{pk}.joined", split_heads], [f"{pk}.unpacked", f"{pv}.unpacked"],
                                   axis=1, name=f"chai_unpack_split_{i}")]
        _rename_producer(g, ok, f"{ok}.unpacked")
        _rename_producer(g, ov, f"{ov}.unpacked")
        back += [helper.make_node("Concat", [f"{ok}.unpacked", f"{ov}.unpacked"], [f"{ok}.joined"], axis=1,
                                  name=f"chai_pack_join_{i}"),
                 helper.make_node("Split", [f"{ok}.joined", split_halves], [ok, ov], axis=3,
                                  name=f"chai_pack_split_{i}")]
        for vi in (inputs[pk], inputs[pv], outputs[ok], outputs[ov]):
            _set_cache_shape(vi, kh + vh, half)
    nodes = [*front, *g.node, *back]
    del g.node[:]
    g.node.extend(nodes)
    return packed


def _i64(values: list[int]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def pack_for_genai(artifact: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write `out`: the artifact's graph in the halves layout, its side files and a genai_config.json for it."""
    import onnx

    from chai_compile.fileio import staged_output_dir, write_json

    src = Path(artifact)
    if not (src / GRAPH_NAME).is_file() or not (src / "genai_config.json").is_file():
        raise ExportError("not an export directory with runtime files", value=str(src),
                          fix="pass a directory written by chai-compile export")
    model = onnx.load(str(src / GRAPH_NAME))
    heads = cache_heads({v.name: _dims(v) for v in model.graph.input}, src)
    if heads.head_dim % 2:
        raise ExportError("the halves layout needs an even head size", value=heads.head_dim)
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise ExportError("onnxruntime-genai cannot load the fused form's custom op", fix="export --attention portable")
    packed = pack_graph(model, heads)
    if not packed:
        raise ExportError("no layer keeps fewer K than V heads: the export runs in onnxruntime-genai as it is",
                          fix=f"use {src} directly")
    meta = {p.key: p for p in model.metadata_props}
    layout = {"layout": LAYOUT, "packed_layers": packed, "k_heads": list(heads.k_heads),
              "v_heads": list(heads.v_heads), "head_dim": heads.head_dim}
    if "chai.cache_layout" in meta:
        meta["chai.cache_layout"].value = json.dumps(layout)
    else:
        model.metadata_props.add(key="chai.cache_layout", value=json.dumps(layout))
    genai = json.loads((src / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    # The config's values are defaults; onnxruntime-genai takes every layer's heads and head size from the graph.
    dec["num_key_value_heads"] = max(k + v for k, v in zip(heads.k_heads, heads.v_heads, strict=True))
    with staged_output_dir(out, overwrite) as stage:
        onnx.save(model, str(stage / GRAPH_NAME), save_as_external_data=True, location=DATA_NAME)
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, stage / name)
        write_json(stage / "genai_config.json", genai)
        write_json(stage / "cache_layout.json", layout)
    return layout


@click.command("genai-pack")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
def genai_pack(artifact: str, out: str, overwrite: bool) -> None:
    """Rearrange a CHAI export's cache so onnxruntime-genai runs it without losing the K-cache saving."""
    layout = pack_for_genai(artifact, out, overwrite)
    click.echo(f"wrote {out}: layers {layout['packed_layers']} carry K+V as two halves of head_dim "
               f"{layout['head_dim']}")
