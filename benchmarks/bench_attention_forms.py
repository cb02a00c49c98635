"""Portable (standard ops + probability Gather) vs ONNX opset-23 `Attention` with V packed per cluster.

    python benchmarks/bench_attention_forms.py [--threads 2] [--iters 50] [--past 512,2048] [--batch 1,4] \
        [--modes decode,core] [--mapping docs/results/smollm2/kv20.json] [--smollm2-layers 26,29] \
        [--out docs/results/onnx/attention_forms.json]

One clustered attention layer, one decode step (S=1), fp32, ONNX Runtime CPU. Every graph takes the same
new-token tensors (Q of the C representatives [B,C,S,d], K_new of the kept K heads [B,kept,S,d], V_new
[B,KV,S,d], attention_mask [B,P+S]) plus a past cache in the layout its form needs, and returns the output
[B,S,H*d] in original head order and the present cache. Forms:

  dense_std      H-head attention from standard ops (MatMul/Softmax/MatMul, GQA by reshaping Q per KV group)
  dense_a23      one opset-23 Attention node, q_num_heads=H, kv_num_heads=KV
  chai_portable  the exporter's portable form (rewrite/clustered_attention.py `_static_torch`): C score
                 heads in K-head slots, Softmax, Gather probabilities to H heads, MatMul with V per GQA group
  chai_a23_*     opset-23 Attention, one score head per cluster, V packed per cluster along head size:
                 cluster c's V operand is the concat of the distinct V heads its members read, so its output
                 splits back into member heads (`_nodedupe`: one V slot per member, duplicates included).
                 `cluster` layout: kv_num_heads=C (a K head read by several representatives is stored once
                 per cluster). `gqa` layout (only when every kept K head is read by the same number of
                 representatives): kv_num_heads=kept, V packed per kept K head (union over its clusters).
                 Unequal widths: `pad` zero-pads every V pack to the widest, `split` emits one Attention node
                 per width.

Modes: `decode` feeds past K/V and returns present K/V (the cache concat runs inside the graph, as in the
exported decoder); `core` feeds the whole cache as K/V and returns the output only (attention alone).
Each graph is checked against a float64 numpy reference (output and present cache) before it is timed;
a max abs diff >= 1e-4 aborts the run. Timed steps rotate through the sessions of one configuration every
iteration, so machine noise hits all forms alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
OPSET = 23
ATOL = 1e-4
FLOAT_BYTES = 4
DEFAULT_MAPPING = REPO / "docs" / "results" / "smollm2" / "kv20.json"
DEFAULT_OUT = REPO / "docs" / "results" / "onnx" / "attention_forms.json"
# kv20 layers: 26 has 3 clusters of 3 heads (3, 2, 2 distinct V heads) whose representatives all read K head 0
# (padding, K duplication per cluster, and the gqa layout); 29 has 6 clusters (2, 2, 2, 1, 1, 1) over 2 kept
# K heads, the other common shape of this mapping.
DEFAULT_SMOLLM2_LAYERS = (26, 29)


# ---- layer description ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One attention layer: clusters as (representative, members), in the order Q's cluster axis uses."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    clusters: tuple[tuple[int, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        heads = sorted(h for _, members in self.clusters for h in members)
        if heads != list(range(self.num_heads)) or any(r not in m for r, m in self.clusters):
            raise ValueError(f"{self.name}: clusters must partition 0..{self.num_heads - 1} and contain their reps")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    @property
    def kept(self) -> list[int]:
        """KV heads whose K some representative reads: the K cache holds only these."""
        return sorted({rep // self.group for rep, _ in self.clusters})

    @property
    def k_of_cluster(self) -> list[int]:
        kept = self.kept
        return [kept.index(rep // self.group) for rep, _ in self.clusters]

    @property
    def cluster_of_head(self) -> list[int]:
        out = [0] * self.num_heads
        for c, (_, members) in enumerate(self.clusters):
            for h in members:
                out[h] = c
        return out

    def v_heads_of_cluster(self, c: int) -> list[int]:
        """Distinct V heads read by cluster c's members (rep's first): members sharing one have equal outputs."""
        rep, members = self.clusters[c]
        out: list[int] = []
        for h in [rep, *sorted(members)]:
            if h // self.group not in out:
                out.append(h // self.group)
        return out

    def sizes(self) -> list[int]:
        return [len(m) for _, m in self.clusters]

    @classmethod
    def dense(cls, name: str, num_heads: int, num_kv_heads: int, head_dim: int) -> LayerSpec:
        return cls(name, num_heads, num_kv_heads, head_dim, tuple((h, (h,)) for h in range(num_heads)))

    @classmethod
    def from_sizes(cls, name: str, num_heads: int, num_kv_heads: int, head_dim: int, sizes: Sequence[int]
                   ) -> LayerSpec:
        """Contiguous clusters of the given sizes, first member representative (for synthetic shapes)."""
        clusters, start = [], 0
        for n in sizes:
            clusters.append((start, tuple(range(start, start + n))))
            start += n
        return cls(name, num_heads, num_kv_heads, head_dim, tuple(clusters))

    @classmethod
    def from_mapping(cls, path: str | Path, layer: int) -> LayerSpec:
        """A clustered layer of a mapping JSON, through the mapping's own fused layout (cluster order kept)."""
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))  # run as a script from a checkout without `pip install -e .`
        from chai_compile.layout import cluster_layout
        from chai_compile.mapping import ClusterMapping

        mapping = ClusterMapping.read(path)
        if mapping.layer(layer).kind != "clustered":
            raise SystemExit(f"layer {layer} of {path} is dense; pick a clustered layer")
        m = mapping.model
        lay = cluster_layout(mapping, layer)
        clusters = []
        for c in range(len(lay.cluster_offsets) - 1):
            heads = lay.permutation[lay.cluster_offsets[c]:lay.cluster_offsets[c + 1]]
            clusters.append((heads[0], tuple(sorted(heads))))  # fused layout puts the representative first
        spec = cls(f"{Path(path).stem}-L{layer}", m.num_heads, m.num_kv_heads, m.head_dim, tuple(clusters))
        # The mapping's K-head indices and ours must agree, or the K cache layouts differ.
        if list(lay.k_head_index) != spec.k_of_cluster or mapping.kept_k_heads(layer) != spec.kept:
            raise SystemExit(f"layer {layer}: mapping layout disagrees with the benchmark's K-head derivation")
        return spec


# ---- graph construction ---------------------------------------------------------------------------------
class _Graph:
    """Collects nodes and constant initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value: Any, base: str = "c", dtype: Any = np.int64) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, inputs: Sequence[str], base: str | None = None, n_out: int = 1,
           outputs: Sequence[str] | None = None, **attrs: Any) -> Any:
        outs = list(outputs) if outputs else [self.name(base or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def gather(self, x: str, idx: Sequence[int], axis: int, size: int) -> str:
        if list(idx) == list(range(size)):
            return x  # identity: emit nothing, as the exporter does for slots_are_heads
        return self.op("Gather", [x, self.const(list(idx), "idx")], axis=axis)


def _allowed_mask(g: _Graph) -> str:
    """bool [B,1,S,T]: padding (attention_mask != 0) and causal, query s at absolute position P+s."""
    t = g.op("Squeeze", [g.op("Shape", ["attention_mask"], start=1, end=2)])
    s = g.op("Squeeze", [g.op("Shape", ["query"], start=2, end=3)])
    zero, one = g.const(0), g.const(1)
    cols = g.op("Range", [zero, t, one])  # [T]
    rows = g.op("Unsqueeze", [g.op("Range", [g.op("Sub", [t, s]), t, one]), g.const([1])])  # [S,1]
    causal = g.op("LessOrEqual", [cols, rows])  # [S,T]
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2])])
    return g.op("And", [pad, causal])


def _model(g: _Graph, inputs: list[onnx.ValueInfoProto], outputs: dict[str, list[Any]], name: str
           ) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs.items()]
    graph = helper.make_graph(g.nodes, name, inputs, outs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bench_attention_forms")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(spec: LayerSpec, key_value: bool, kv_len: str = "S") -> list[onnx.ValueInfoProto]:
    """query [B,C,S,d], attention_mask [B,T], and (key_value) key [B,kept,kv_len,d], value [B,KV,kv_len,d]."""
    d, f = spec.head_dim, TensorProto.FLOAT
    out = [helper.make_tensor_value_info("query", f, ["B", spec.num_clusters, "S", d]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])]
    if key_value:
        out += [helper.make_tensor_value_info("key", f, ["B", len(spec.kept), kv_len, d]),
                helper.make_tensor_value_info("value", f, ["B", spec.num_kv_heads, kv_len, d])]
    return out


@dataclass(frozen=True)
class SlotLayout:
    """The portable form's score layout (mirrors rewrite.clustered_attention.StaticLayout)."""

    slots_per_k: int
    slot_source: list[int]  # per slot: input cluster index, or C for a zero query
    slot_of_head: list[int]


def slot_layout(spec: LayerSpec) -> SlotLayout:
    kept, k_of = spec.kept, spec.k_of_cluster
    order = sorted(range(spec.num_clusters), key=lambda c: (k_of[c], spec.clusters[c][0]))
    n = max(k_of.count(j) for j in range(len(kept)))
    source = [spec.num_clusters] * (len(kept) * n)
    slot_of_cluster = [0] * spec.num_clusters
    seen = [0] * len(kept)
    for c in order:
        slot_of_cluster[c] = k_of[c] * n + seen[k_of[c]]
        source[slot_of_cluster[c]] = c
        seen[k_of[c]] += 1
    return SlotLayout(n, source, [slot_of_cluster[c] for c in spec.cluster_of_head])


def build_portable(spec: LayerSpec, dense: bool = False, with_past: bool = True) -> onnx.ModelProto:
    """Standard-op graph. dense=True: plain H-head attention (every head its own score head, all K heads).

    with_past=False: key/value are the whole cache [.., T, d] and no present is returned (attention core only).
    """
    if dense:
        spec = LayerSpec.dense(spec.name, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    h, kv, d, c = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_clusters
    k_heads = len(spec.kept)
    lay = slot_layout(spec)
    n = lay.slots_per_k
    g = _Graph()
    inputs = _inputs(spec, True, "S" if with_past else "T")
    if with_past:
        inputs += [helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["B", k_heads, "P", d]),
                   helper.make_tensor_value_info("past_value", TensorProto.FLOAT, ["B", kv, "P", d])]
    allowed = _allowed_mask(g)
    # Additive mask with the fp32 minimum (not -inf), as masked_softmax does.
    bias = g.op("Where", [allowed, g.const(0.0, dtype=np.float32), g.const(np.finfo(np.float32).min, dtype=np.float32)])
    pk, pv = "key", "value"
    if with_past:
        pk = g.op("Concat", ["past_key", "key"], outputs=["present_key"], axis=2)
        pv = g.op("Concat", ["past_value", "value"], outputs=["present_value"], axis=2)
    q = "query"
    if lay.slot_source != list(range(c)):
        # Clusters into K-head slots; missing slots are zero queries (a Pad'ed zero cluster).
        q = g.op("Pad", [q, g.const([0, 0, 0, 0, 0, 1, 0, 0])]) if c in lay.slot_source else q
        q = g.gather(q, lay.slot_source, axis=1, size=c)
    if n > 1:
        q = g.op("Reshape", [q, g.const([0, k_heads, -1, d])])  # [B, kept, n*S, d]: no K copy
    scores = g.op("MatMul", [q, g.op("Transpose", [pk], perm=[0, 1, 3, 2])])
    if n > 1:
        scores = g.op("Reshape", [scores, g.const([0, k_heads * n, -1, 0])])  # [B, slots, S, T]
    scores = g.op("Mul", [scores, g.const(1.0 / math.sqrt(d), dtype=np.float32)])
    probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
    probs = g.gather(probs, lay.slot_of_head, axis=1, size=h)  # [B, H, S, T]
    # Heads of one GQA group share V: [B, KV, g*S, T] @ [B, KV, T, d] (V never copied per head).
    out = g.op("MatMul", [g.op("Reshape", [probs, g.const([0, kv, -1, 0])]), pv])
    out = g.op("Reshape", [out, g.const([0, h, -1, d])])
    out = g.op("Transpose", [out], perm=[0, 2, 1, 3])
    g.op("Reshape", [out, g.const([0, 0, h * d])], outputs=["output"])
    outs: dict[str, list[Any]] = {"output": ["B", "S", h * d]}
    if with_past:
        outs.update(present_key=["B", k_heads, "T", d], present_value=["B", kv, "T", d])
    return _model(g, inputs, outs, f"{spec.name}-portable")


@dataclass(frozen=True)
class A23Node:
    """One Attention node: per kv head, its K head (index into the graph's key input), its q clusters, V pack."""

    k_index: tuple[int, ...]
    q_clusters: tuple[tuple[int, ...], ...]
    v_pack: tuple[tuple[int, ...], ...]  # per kv head: V heads, padded with num_kv_heads (a zero head)

    @property
    def width(self) -> int:
        return len(self.v_pack[0])

    @property
    def q_heads(self) -> int:
        return sum(len(q) for q in self.q_clusters)


@dataclass(frozen=True)
class A23Layout:
    nodes: tuple[A23Node, ...]
    out_index: tuple[int, ...]  # per head h: row of the concatenated [B, S, sum(q_heads*width), d] output
    padded: bool


def a23_layout(spec: LayerSpec, layout: str = "cluster", unequal: str = "pad", dedupe: bool = True,
               dense: bool = False) -> A23Layout | None:
    """Group clusters into Attention kv heads and nodes; None when the gqa layout does not apply."""
    if dense:
        spec = LayerSpec.dense(spec.name, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        layout = "gqa"
    c_count, kv, grp = spec.num_clusters, spec.num_kv_heads, spec.group
    # dedupe=False: one V slot per member, as "concat the members' V heads" reads literally (same under MHA).
    packs = [spec.v_heads_of_cluster(c) if dedupe else
             [h // grp for h in [rep, *sorted(set(members) - {rep})]] for c, (rep, members) in enumerate(spec.clusters)]
    k_of = spec.k_of_cluster
    heads: list[tuple[int, tuple[int, ...], list[int]]] = []  # (k index, q clusters, V pack)
    if layout == "cluster":
        heads = [(k_of[c], (c,), packs[c]) for c in range(c_count)]
    elif layout == "gqa":
        for j in range(len(spec.kept)):
            cl = tuple(c for c in range(c_count) if k_of[c] == j)
            union: list[int] = []
            for c in cl:
                union += [v for v in packs[c] if v not in union]
            heads.append((j, cl, union))
        if len({len(q) for _, q, _ in heads}) != 1:
            return None  # Attention's GQA needs the same number of q heads per kv head
    else:
        raise ValueError(f"layout must be cluster or gqa, got {layout}")
    widths = sorted({len(p) for _, _, p in heads})
    if unequal == "pad" or len(widths) == 1:
        groups = [heads]
    elif unequal == "split":
        groups = [[x for x in heads if len(x[2]) == w] for w in widths]
    else:
        raise ValueError(f"unequal must be pad or split, got {unequal}")
    nodes, padded = [], False
    for grp_heads in groups:
        w = max(len(p) for _, _, p in grp_heads)
        padded |= any(len(p) < w for _, _, p in grp_heads)
        nodes.append(A23Node(tuple(k for k, _, _ in grp_heads), tuple(q for _, q, _ in grp_heads),
                             tuple(tuple(p) + (kv,) * (w - len(p)) for _, _, p in grp_heads)))
    # Output rows: node blocks in order; inside a node, q heads in kv-head order, each q head `width` rows.
    out_index = [-1] * spec.num_heads
    base = 0
    for node in nodes:
        qi = 0
        for kvh, qs in enumerate(node.q_clusters):
            for c in qs:
                for h in spec.clusters[c][1]:
                    out_index[h] = base + qi * node.width + node.v_pack[kvh].index(h // grp)
                qi += 1
        base += node.q_heads * node.width
    return A23Layout(tuple(nodes), tuple(out_index), padded)


def build_attention23(spec: LayerSpec, layout: str = "cluster", unequal: str = "pad", dedupe: bool = True,
                      dense: bool = False, with_past: bool = True) -> onnx.ModelProto | None:
    """Opset-23 Attention graph(s); dense=True is the H-head GQA Attention baseline. None if not applicable.

    with_past=False: inputs key.i/value.i are node i's whole cache in its packed layout; no present returned.
    """
    lay = a23_layout(spec, layout, unequal, dedupe, dense)
    if lay is None:
        return None
    if dense:
        spec = LayerSpec.dense(spec.name, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_total, k_total = spec.num_clusters, len(spec.kept)
    g = _Graph()
    inputs = _inputs(spec, with_past)
    allowed = _allowed_mask(g)
    value = "value"
    if lay.padded and with_past:
        value = g.op("Pad", [value, g.const([0, 0, 0, 0, 0, 1, 0, 0])])  # head KV is zeros: the padding
    outputs: dict[str, list[Any]] = {"output": ["B", "S", h * d]}
    blocks = []
    for i, node in enumerate(lay.nodes):
        nk, w = len(node.k_index), node.width
        prefix, length = ("past_", "P") if with_past else ("", "T")
        inputs += [helper.make_tensor_value_info(f"{prefix}key.{i}", TensorProto.FLOAT, ["B", nk, length, d]),
                   helper.make_tensor_value_info(f"{prefix}value.{i}", TensorProto.FLOAT, ["B", nk, length, w * d])]
        q = g.gather("query", [c for qs in node.q_clusters for c in qs], axis=1, size=q_total)
        if with_past:
            k = g.gather("key", node.k_index, axis=1, size=k_total)
            # New token's V packed per kv head: [B, KV(+1), S, d] -> [B, nk, S, w*d] (a real model would fold
            # this Gather into W_v's rows; here it is a few KB per token).
            v = g.gather(value, [x for p in node.v_pack for x in p], axis=1, size=kv)
            if w > 1:
                v = g.op("Reshape", [v, g.const([0, nk, w, -1, d])])
                v = g.op("Transpose", [v], perm=[0, 1, 3, 2, 4])
                v = g.op("Reshape", [v, g.const([0, 0, 0, w * d])])
            y, _, _ = g.op("Attention", [q, k, v, allowed, f"past_key.{i}", f"past_value.{i}"],
                           outputs=[g.name("y"), f"present_key.{i}", f"present_value.{i}"],
                           scale=1.0 / math.sqrt(d), is_causal=0)
            outputs[f"present_key.{i}"] = ["B", nk, "T", d]
            outputs[f"present_value.{i}"] = ["B", nk, "T", w * d]
        else:
            y = g.op("Attention", [q, f"key.{i}", f"value.{i}", allowed], scale=1.0 / math.sqrt(d), is_causal=0)
        y = g.op("Transpose", [y], perm=[0, 2, 1, 3])  # [B, S, q_heads, w*d]
        blocks.append(g.op("Reshape", [y, g.const([0, 0, node.q_heads * w, d])]))
    y = blocks[0] if len(blocks) == 1 else g.op("Concat", blocks, axis=2)
    rows = sum(n.q_heads * n.width for n in lay.nodes)
    y = g.gather(y, lay.out_index, axis=2, size=rows)  # [B, S, H, d] in original head order
    g.op("Reshape", [y, g.const([0, 0, h * d])], outputs=["output"])
    tag = "dense" if dense else f"{layout}-{unequal}" + ("" if dedupe else "-nodedupe")
    return _model(g, inputs, outputs, f"{spec.name}-a23-{tag}")


# ---- caches, reference, feeds --------------------------------------------------------------------------
def reference(spec: LayerSpec, query: np.ndarray, key: np.ndarray, value: np.ndarray, attention_mask: np.ndarray,
              past_key: np.ndarray, past_value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 CHAI attention in the logical layout: (output [B,S,H*d], present_key, present_value).

    P_c = softmax(q_c K_kept[k_of_cluster[c]]^T / sqrt(d) + mask); out_h = P_cluster(h) V_{h // group}.
    Pass LayerSpec.dense(...) with query [B,H,S,d] and key of all KV heads for the dense reference.
    """
    pk = np.concatenate([past_key, key], axis=2).astype(np.float64)
    pv = np.concatenate([past_value, value], axis=2).astype(np.float64)
    b, _, s, d = query.shape
    t = pk.shape[2]
    scores = np.einsum("bcsd,bctd->bcst", query.astype(np.float64), pk[:, spec.k_of_cluster]) / math.sqrt(d)
    allowed = (attention_mask != 0)[:, None, None, :] & (np.arange(t)[None, :] <= np.arange(t - s, t)[:, None])
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True))  # rows with no key: zeros
    v_heads = [h // spec.group for h in range(spec.num_heads)]
    out = np.einsum("bhst,bhtd->bshd", probs[:, spec.cluster_of_head], pv[:, v_heads])
    return out.reshape(b, s, -1), pk, pv


def pack_cache(spec: LayerSpec, k: np.ndarray, v: np.ndarray, **a23: Any) -> list[np.ndarray]:
    """A logical cache (K of spec.kept heads [B,kept,T,d], V [B,KV,T,d]) in an Attention form's layout.

    Returns [key.0, value.0, key.1, ...]: per node, K per kv head [B,nk,T,d] and V packed [B,nk,T,w*d].
    """
    lay = a23_layout(spec, **a23)
    b, _, t, d = v.shape
    v_ext = np.concatenate([v, np.zeros((b, 1, t, d), v.dtype)], axis=1)  # head KV: zeros (padding)
    out = []
    for node in lay.nodes:
        nk = len(node.k_index)
        out.append(np.ascontiguousarray(k[:, list(node.k_index)]))
        packed = v_ext[:, [x for pk in node.v_pack for x in pk]].reshape(b, nk, node.width, t, d)
        out.append(np.ascontiguousarray(packed.transpose(0, 1, 3, 2, 4).reshape(b, nk, t, node.width * d)))
    return out


@dataclass(frozen=True)
class Form:
    """One graph family member: the decode graph (past -> present) and the core graph (whole cache in)."""

    name: str
    family: str  # "std" or "a23": the operator family, for the dense-vs-CHAI comparison
    dense: bool
    a23: dict[str, Any]  # a23_layout kwargs; empty for the standard-op forms
    decode: onnx.ModelProto
    core: onnx.ModelProto

    def model(self, with_past: bool) -> onnx.ModelProto:
        return self.decode if with_past else self.core

    def spec(self, spec: LayerSpec) -> LayerSpec:
        """The layer this form computes: the dense forms treat every head as its own cluster."""
        return LayerSpec.dense(spec.name, spec.num_heads, spec.num_kv_heads, spec.head_dim) if self.dense else spec


def forms_for(spec: LayerSpec) -> list[Form]:
    """Every form that applies to spec; variants that would build the same graph as another are dropped."""
    def std(name: str, dense: bool) -> Form:
        return Form(name, "std", dense, {}, build_portable(spec, dense), build_portable(spec, dense, with_past=False))

    def a23(name: str, **kw: Any) -> Form:
        return Form(name, "a23", bool(kw.get("dense")), kw, build_attention23(spec, **kw),
                    build_attention23(spec, **kw, with_past=False))

    out = [std("dense_std", True), a23("dense_a23", dense=True), std("chai_portable", False)]
    seen: set[tuple] = set()
    for dedupe in (True, False):
        for layout in ("cluster", "gqa"):
            for unequal in ("pad", "split"):
                lay = a23_layout(spec, layout, unequal, dedupe)
                key = None if lay is None else tuple((n.k_index, n.q_clusters, n.v_pack) for n in lay.nodes)
                if key is None or key in seen:
                    continue
                seen.add(key)
                name = f"chai_a23_{layout}_{unequal}" + ("" if dedupe else "_nodedupe")
                out.append(a23(name, layout=layout, unequal=unequal, dedupe=dedupe))
    return out


@dataclass
class Case:
    """Random new-token tensors and a cache of every KV head; each form takes the heads it keeps."""

    spec: LayerSpec
    query_all: np.ndarray  # [B,H,S,d]: a form takes the rows of its representatives
    key_all: np.ndarray  # [B,KV,S,d]
    value: np.ndarray  # [B,KV,S,d]
    mask: np.ndarray  # [B,P+S] int64
    past_key_all: np.ndarray  # [B,KV,P,d]
    past_value: np.ndarray

    @classmethod
    def random(cls, spec: LayerSpec, batch: int, past: int, seq: int = 1, pad: int = 0, seed: int = 0) -> Case:
        """pad > 0 left-pads batch row 1 (when present) by that many positions."""
        rng = np.random.default_rng(seed)
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim

        def r(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32)

        mask = np.ones((batch, past + seq), np.int64)
        if batch > 1 and pad:
            mask[1, :pad] = 0
        return cls(spec, r(batch, h, seq, d), r(batch, kv, seq, d), r(batch, kv, seq, d), mask,
                   r(batch, kv, past, d), r(batch, kv, past, d))

    def _tensors(self, form: Form) -> tuple[LayerSpec, np.ndarray, np.ndarray, np.ndarray]:
        spec = form.spec(self.spec)
        q = np.ascontiguousarray(self.query_all[:, [rep for rep, _ in spec.clusters]])
        return spec, q, np.ascontiguousarray(self.key_all[:, spec.kept]), self.past_key_all[:, spec.kept]

    def feeds(self, form: Form, with_past: bool) -> dict[str, np.ndarray]:
        spec, q, k_new, past_k = self._tensors(form)
        feeds = {"query": q, "attention_mask": self.mask}
        if with_past:
            feeds.update(key=k_new, value=self.value)
            k, v, prefix = np.ascontiguousarray(past_k), self.past_value, "past_"
        else:
            k, v, prefix = np.concatenate([past_k, k_new], 2), np.concatenate([self.past_value, self.value], 2), ""
        if form.family == "std":
            feeds.update({f"{prefix}key": k, f"{prefix}value": v})
        else:
            caches = pack_cache(spec, k, v, **form.a23)
            for i in range(len(caches) // 2):
                feeds[f"{prefix}key.{i}"], feeds[f"{prefix}value.{i}"] = caches[2 * i], caches[2 * i + 1]
        return feeds

    def expected(self, form: Form) -> tuple[np.ndarray, list[np.ndarray]]:
        """float64 reference output and the exact present cache in the form's layout."""
        spec, q, k_new, past_k = self._tensors(form)
        out, _, _ = reference(spec, q, k_new, self.value, self.mask, past_k, self.past_value)
        pk, pv = np.concatenate([past_k, k_new], 2), np.concatenate([self.past_value, self.value], 2)
        return out, [pk, pv] if form.family == "std" else pack_cache(spec, pk, pv, **form.a23)


def session(model: onnx.ModelProto, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Sessions take turns: a finished session's spinning pool threads would steal the cores of the next one.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_form(form: Form, case: Case, with_past: bool = True, sess: Any = None, atol: float = ATOL) -> float:
    """Max abs diff of the output vs the float64 reference; presents must equal the exact concat. Raises."""
    sess = sess or session(form.model(with_past), 1)
    got = sess.run(None, case.feeds(form, with_past))
    ref_out, presents = case.expected(form)
    diff = float(np.abs(got[0].astype(np.float64) - ref_out).max()) if got[0].shape == ref_out.shape else math.inf
    cache_diff = max((float(np.abs(a - b).max()) for a, b in zip(got[1:], presents, strict=True)), default=0.0) \
        if with_past else 0.0
    if not diff < atol or cache_diff != 0.0:
        raise AssertionError(f"{case.spec.name} {form.name} (with_past={with_past}): max abs diff {diff:.3g} "
                             f"(atol {atol}), present cache diff {cache_diff:.3g}")
    return diff


def cost(spec: LayerSpec, form: Form, past: int) -> dict[str, Any]:
    """Cache bytes (batch 1, one layer, past+1 tokens) and attention MACs of one decode step (batch 1)."""
    lay_spec = form.spec(spec)
    h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    t = past + 1
    info: dict[str, Any] = {}
    if form.family == "std":
        k_heads = len(lay_spec.kept)
        cache_heads = (k_heads + kv) * d
        qk_rows = k_heads * slot_layout(lay_spec).slots_per_k  # zero slots are computed too
        pv_cols = h * d
    else:
        lay = a23_layout(spec, **form.a23)
        cache_heads = sum(len(n.k_index) * (1 + n.width) * d for n in lay.nodes)
        qk_rows = sum(n.q_heads for n in lay.nodes)
        pv_cols = sum(n.q_heads * n.width * d for n in lay.nodes)
        info = {"nodes": [{"kv_heads": len(n.k_index), "q_heads": n.q_heads, "v_head_size": n.width * d}
                          for n in lay.nodes], "zero_padded": lay.padded}
    return {"cache_bytes": cache_heads * t * FLOAT_BYTES, "cache_bytes_per_token": cache_heads * FLOAT_BYTES,
            "qk_macs": qk_rows * t * d, "pv_macs": pv_cols * t, **info}


# ---- timing --------------------------------------------------------------------------------------------
def time_config(spec: LayerSpec, forms: list[Form], batch: int, past: int, with_past: bool, iters: int,
                warmup: int, threads: int) -> dict[str, Any]:
    case = Case.random(spec, batch, past, seed=batch * 7919 + past)
    sessions = [session(f.model(with_past), threads) for f in forms]
    feeds = [case.feeds(f, with_past) for f in forms]
    checks = {f.name: check_form(f, case, with_past, s) for f, s in zip(forms, sessions, strict=True)}
    for s, fd in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, fd)
    times: list[list[float]] = [[] for _ in forms]
    for it in range(iters):
        for j in range(len(forms)):
            i = (it + j) % len(forms)  # rotate the start: no form always runs right after the same neighbour
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append(time.perf_counter() - t0)
    res: dict[str, Any] = {"mode": "decode" if with_past else "core", "batch": batch, "past": past, "iters": iters,
                           "forms": {}}
    for f, t in zip(forms, times, strict=True):
        q1, _, q3 = statistics.quantiles(t, n=4)
        res["forms"][f.name] = {"median_ms": round(statistics.median(t) * 1e3, 4), "q1_ms": round(q1 * 1e3, 4),
                                "q3_ms": round(q3 * 1e3, 4), "check_max_abs_diff": checks[f.name],
                                **cost(spec, f, past)}
    ms = {k: v["median_ms"] for k, v in res["forms"].items()}
    chai_a23 = {k: v for k, v in ms.items() if k.startswith("chai_a23")}
    best = min(chai_a23, key=chai_a23.__getitem__)
    res["best_chai_a23"] = best
    res["ratio_portable_over_a23"] = round(ms["chai_portable"] / ms[best], 3)
    res["ratio_portable_over_dense_std"] = round(ms["chai_portable"] / ms["dense_std"], 3)
    res["ratio_a23_over_dense_a23"] = round(ms[best] / ms["dense_a23"], 3)
    res["ratio_dense_std_over_dense_a23"] = round(ms["dense_std"] / ms["dense_a23"], 3)
    return res


def default_specs(mapping: Path, smol_layers: Sequence[int] = DEFAULT_SMOLLM2_LAYERS) -> list[LayerSpec]:
    return [
        *(LayerSpec.from_mapping(mapping, i) for i in smol_layers),
        LayerSpec.from_sizes("llama7b-8x4", 32, 32, 128, [4] * 8),
        LayerSpec.from_sizes("llama7b-unequal", 32, 32, 128, [1, 2, 3, 4, 4, 5, 6, 7]),
    ]


def correctness(specs: list[LayerSpec]) -> dict[str, dict[str, float]]:
    """Small-shape checks with left padding, S=1 and S=3, decode and core graphs, per spec and form."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        out[spec.name] = {}
        for f in forms_for(spec):
            for seq in (1, 3):
                case = Case.random(spec, batch=2, past=37, seq=seq, pad=5, seed=seq)
                for with_past in (True, False):
                    key = f"{f.name}/S={seq}/{'decode' if with_past else 'core'}"
                    out[spec.name][key] = check_form(f, case, with_past)
    return out


def _table(results: list[dict[str, Any]]) -> str:
    lines = ["| layer | mode | B | P | dense std | CHAI portable | dense A23 | CHAI A23 (best variant) "
             "| portable / A23 | portable / dense std | CHAI A23 / dense A23 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["configs"]:
            f, best = c["forms"], c["best_chai_a23"]
            lines.append(
                f"| {r['spec']['name']} | {c['mode']} | {c['batch']} | {c['past']} | "
                f"{f['dense_std']['median_ms']:.3f} | {f['chai_portable']['median_ms']:.3f} | "
                f"{f['dense_a23']['median_ms']:.3f} | "
                f"{f[best]['median_ms']:.3f} ({best.removeprefix('chai_a23_')}) | "
                f"{c['ratio_portable_over_a23']:.2f} | {c['ratio_portable_over_dense_std']:.2f} | "
                f"{c['ratio_a23_over_dense_a23']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per form and configuration (>= 30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--past", default="512,2048")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--modes", default="decode,core", help="decode: past->present concat in the graph; "
                    "core: the whole cache is an input, no present (attention alone)")
    ap.add_argument("--mapping", type=Path, default=DEFAULT_MAPPING)
    ap.add_argument("--smollm2-layers", default=",".join(map(str, DEFAULT_SMOLLM2_LAYERS)),
                    help="clustered layers of --mapping to benchmark")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.iters < 30:
        raise SystemExit("--iters must be >= 30")
    import onnxruntime as ort

    t_start = time.perf_counter()
    specs = default_specs(args.mapping, [int(x) for x in args.smollm2_layers.split(",")])
    checks = correctness(specs)
    print(f"correctness: {sum(len(v) for v in checks.values())} graph checks < {ATOL}", file=sys.stderr)
    results = []
    for spec in specs:
        forms = forms_for(spec)
        entry: dict[str, Any] = {
            "spec": {"name": spec.name, "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
                     "head_dim": spec.head_dim,
                     "clusters": [{"representative": r, "members": list(m)} for r, m in spec.clusters],
                     "cluster_sizes": spec.sizes(), "kept_k_heads": spec.kept,
                     "distinct_v_heads_per_cluster": [len(spec.v_heads_of_cluster(c))
                                                      for c in range(spec.num_clusters)]},
            "forms": {f.name: f.a23 for f in forms}, "configs": []}
        for mode in args.modes.split(","):
            for batch in [int(x) for x in args.batch.split(",")]:
                for past in [int(x) for x in args.past.split(",")]:
                    r = time_config(spec, forms, batch, past, mode == "decode", args.iters, args.warmup, args.threads)
                    entry["configs"].append(r)
                    print(f"{spec.name} {mode} B={batch} P={past}: " + ", ".join(
                        f"{k} {v['median_ms']:.3f}" for k, v in r["forms"].items()) + " ms", file=sys.stderr)
        results.append(entry)
    doc = {
        "benchmark": "benchmarks/bench_attention_forms.py",
        "command": " ".join(["python", "benchmarks/bench_attention_forms.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__, "opset": OPSET,
        "threads": args.threads, "inter_op_threads": 1, "intra_op_spinning": False,
        "graph_optimization": "ORT default (ORT_ENABLE_ALL)",
        "machine": {"processor": platform.processor(), "machine": platform.machine(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "dtype": "float32", "seq_len": 1, "atol": ATOL, "correctness_small_shapes": checks,
        "timing": "median over --iters steps per form; the forms of one configuration take turns within each "
                  "iteration. decode: output + present cache per step (cache concat inside the graph, as in the "
                  "exported decoder); core: the whole cache is an input, output only. Costs are batch 1.",
        "results": results, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(_table(results))


if __name__ == "__main__":
    main()
