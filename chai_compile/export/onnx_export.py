"""Export a causal LM (original or CHAI-rewritten) to an ONNX decoder with past/present KV cache.

The model is wrapped in `DecoderWrapper` whose flat signature is what ONNX needs:
`(input_ids, attention_mask, position_ids, past_key_values.N.key, past_key_values.N.value, ...)` ->
`(logits, present.N.key, present.N.value, ...)`. Past tensors are fed into a transformers DynamicCache
layer by layer, so the rewritten layers see exactly what they see in PyTorch, and their K cache
carries only the kept heads (the shapes come from the module, not the config). Span layers add a pair of
tensors per bounded head group (`cache_layout`, `span_graph`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chai_compile.choices import DATA_NAME, DEFAULT_OPSET, GRAPH_NAME, AttentionForm, KVCacheMode
from chai_compile.compat import model_forward, output_cache
from chai_compile.errors import ExportError, Terminated, root_cause
from chai_compile.export.cache_layout import PAST, PRESENT, BoundedGroup, CacheSpec
from chai_compile.mapping import ClusterMapping

# Why 18: the dynamo exporter's translations and the optimizer target opset >= 18 (ReduceMean axes
# as inputs, Split num_outputs); older opsets need the down-conversion that loses dynamic shapes.
MIN_OPSET = {AttentionForm.PORTABLE: 18, AttentionForm.FUSED: 18}
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


def max_opset() -> int:
    """The newest opset both torch's exporter and the installed onnx know."""
    import onnx
    from torch.onnx import _constants  # no public name for it

    return min(onnx.defs.onnx_opset_version(), getattr(_constants, "ONNX_MAX_OPSET", DEFAULT_OPSET))


def check_opset(attention: str, opset: int) -> None:
    if attention not in MIN_OPSET:
        raise ExportError(f"--attention must be one of {', '.join(AttentionForm.values())}", value=attention)
    if opset < MIN_OPSET[attention]:
        raise ExportError(f"opset {opset} is too old for the {attention} form",
                          value=opset, fix=f"use --opset {MIN_OPSET[attention]} or newer (default {DEFAULT_OPSET})")
    if opset > (newest := max_opset()):
        raise ExportError(f"opset {opset} is newer than the exporter supports ({newest})", value=opset,
                          fix=f"use --opset {newest} or older (default {DEFAULT_OPSET})")


def refuse_unexportable(model: nn.Module, attention: str, kv_cache: str = KVCacheMode.CONCAT) -> None:
    """The in-place KV cache needs every layer to be a node: shared layers, which reuse probabilities that no
    node hands out, are refused whichever path built the model. The fused form with the concat cache carries
    them out (left portable inside it, export/fused.py); span layers are nodes in both (fused_span.py)."""
    from chai_compile.rewrite.shared import SharedAttention

    if attention == AttentionForm.PORTABLE or kv_cache != KVCacheMode.INPLACE:
        return
    for m in model.modules():
        if isinstance(m, SharedAttention):
            raise ExportError(f"layer {m.layer_idx}: the in-place KV cache has no shared layers (the fused form with "
                              "the concat cache and the portable form export them)", value="shared",
                              fix="export with --kv-cache concat, or a plan without shared layers")


def cache_spec(model: nn.Module) -> CacheSpec:
    """K heads per layer: the kept heads for clustered layers (what the rewrite caches), else all KV heads; a span
    layer's plain tensors hold its unbounded KV heads, each bounded group has its own (`cache_layout`)."""
    from chai_compile.adapters import adapter_for
    from chai_compile.rewrite import ClusteredAttention
    from chai_compile.rewrite.span import SpanAttention

    ad = adapter_for(model)
    spec = ad.spec
    k_heads, v_heads, bounded = [], [], []
    for i in range(spec.num_layers):
        attn = ad.attention(i)
        groups: tuple[BoundedGroup, ...] = ()
        if isinstance(attn, SpanAttention):
            full = sum(len(g.kv_heads) for g in attn.groups if g.window is None)
            groups = tuple(BoundedGroup(g.kv_heads, g.sinks, g.window) for g in attn.groups if g.window is not None)
            k_heads.append(full)
            v_heads.append(full)
        else:
            k_heads.append(attn.num_kept if isinstance(attn, ClusteredAttention) else spec.num_kv_heads)
            v_heads.append(spec.num_kv_heads)
        bounded.append(groups)
    return CacheSpec(tuple(k_heads), tuple(v_heads), spec.head_dim, tuple(bounded))


class DecoderWrapper(nn.Module):
    """Flat-tensor decoder: builds a DynamicCache from the past tensors, returns logits and presents."""

    def __init__(self, model: nn.Module, cache: CacheSpec) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.span_cache: Any = None  # span layers' bounded caches go through it (span_graph.graph_span_layers)
        self.before_call: Any = None  # fused export hands the 2D mask to its attention modules here
        # In-place cache (every layer fused): the past tensors are buffers longer than the mask, so the model
        # gets no mask to build a 4D one from; the fused nodes read the 2D mask from before_call.
        self.inplace_cache = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        layers = self.cache.split(past)
        for i, (key, value, _) in enumerate(layers):
            cache.update(key, value, i)
        if self.span_cache is not None:
            self.span_cache.begin(attention_mask, {i: bounded for i, (_, _, bounded) in enumerate(layers) if bounded})
        if self.before_call is not None:
            self.before_call(attention_mask)
        out = model_forward(self.model, cache, input_ids=input_ids,
                            attention_mask=None if self.inplace_cache else attention_mask, position_ids=position_ids)
        bounded = self.span_cache.presents if self.span_cache is not None else {}
        presents = [out.logits]
        for i, layer in enumerate(output_cache(out).layers):  # graph order: cache_layout.CacheSpec.entries
            presents += [layer.keys, layer.values]
            presents += [t for pair in bounded.get(i, []) for t in pair]
        return tuple(presents)


def _precise_silu(x: Any) -> Any:
    """SiLU as x / (1 + exp(-x)) rather than x * Sigmoid(x).

    Why: ONNX Runtime's CPU Sigmoid has an absolute error bound of ~5e-8, so for gate values below
    about -10 (sigmoid ~ 5e-5 and smaller) its relative error reaches 10-180%. Through 30 layers of a
    gated MLP that moved SmolLM2's logits 1.3e-4 from PyTorch (2.3x the float64 distance of PyTorch
    itself). Exp keeps ~1e-7 relative error everywhere; exp(-x) = inf for x < -88 gives the right -0.
    """
    from onnxscript import opset18 as op

    return op.Div(x, op.Add(op.Exp(op.Neg(x)), op.CastLike(1.0, x)))


def translation_table() -> dict[Any, Any]:
    """Exporter overrides that apply to every form (see each function's why)."""
    return {torch.ops.aten.silu.default: _precise_silu}


class _TransposedLinear(nn.Module):
    """nn.Linear computed as x @ W^T, with W^T held as a view of W (no copy).

    Why: the exporter writes nn.Linear as MatMul(x, Transpose(W)) and its optimizer folds each Transpose
    into a new initializer, so a whole second copy of the weights sits in memory until the graph is
    saved. With W^T as the parameter the graph is the same MatMul and nothing is folded.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def native_gqa() -> Iterator[None]:
    """Let grouped-query layers reach SDPA with their KV heads, not repeated to the query heads.

    Why: with a padding mask, transformers' SDPA path repeats K and V to all query heads before the call,
    and the exporter writes that as Expand + Reshape of the whole cache on every step (SmolLM2: 3 KV heads
    copied to 9 in 30 layers; 2.5x slower decode on ONNX Runtime CPU at batch 4, past 2048). With SDPA's
    enable_gqa the graph's Attention node does GQA itself. transformers decides this in one module-level
    function, looked up at call time, so it is swapped for the export only.
    """
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        sdpa_attention = None
    saved = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if saved is None:
        yield
        return
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = saved


@contextlib.contextmanager
def transposed_linears(model: nn.Module) -> Iterator[None]:
    """Swap every nn.Linear for a _TransposedLinear while exporting; the originals come back afterwards."""
    # A tied weight (lm_head = embedding) stays: its Transpose is not folded, and a W^T view would be
    # written as a second initializer.
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and uses[id(child.weight)] == 1]
    for parent, name, child in swapped:
        setattr(parent, name, _TransposedLinear(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


SAMPLE_BOUNDED_ROWS = 2


def sample_inputs(spec: CacheSpec, vocab: int, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4,
                  mask_len: int | None = None) -> tuple[torch.Tensor, ...]:
    """Batch >= 2 and seq, past > 1 so torch.export does not specialise any dynamic dimension to 0 or 1; bounded
    pasts get 2 rows whatever their capacity (a capacity of 1 would pin the dimension to 1).

    mask_len: the mask's length when it is not past + seq (in-place cache: past is the buffer length)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq if mask_len is None else mask_len, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for name, (b, heads, rows, d) in spec.entries(batch, past):
        rows = SAMPLE_BOUNDED_ROWS if "_span." in name else rows
        kv.append(torch.randn(b, heads, rows, d, generator=g).to(dtype))
    return (ids, mask, pos, *kv)


def dynamic_shapes(spec: CacheSpec) -> tuple[Any, ...]:
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch", max=1024), dim("seq", max=65536), dim("past", max=131072), \
        dim("total", max=196608)
    # One symbolic row count per bounded capacity: min(past, sinks + window), the same for equal capacities.
    rows = {g.capacity: dim(f"past_bounded_{g.capacity}", max=131072) for groups in spec.bounded for g in groups}
    past_ds = []
    for groups in spec.bounded:  # graph order: key, value, then K and V of each bounded group
        past_ds += [{0: batch, 2: past}, {0: batch, 2: past}]
        past_ds += [{0: batch, 2: rows[grp.capacity]} for grp in groups for _ in ("key", "value")]
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(past_ds))


@dataclasses.dataclass
class ExportResult:
    path: Path  # the .onnx file
    external_data: str  # its weights file, beside it
    cache: CacheSpec
    input_names: list[str]
    output_names: list[str]
    export_s: float


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def export_decoder(
    model: nn.Module,
    out_dir: Path,
    *,
    attention: str = AttentionForm.PORTABLE,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    in_place: bool = False,
    kv_cache: str = KVCacheMode.CONCAT,
    before_save: Any = None,
) -> ExportResult:
    """Export `model` (already rewritten, or original) into out_dir/model.onnx + model.onnx.data.

    attention="fused" replaces every clustered layer's attention core by one ClusteredAttention node
    (see chai_compile.export.fused) on a copy of the model, or on the model itself with in_place=True
    (saves one copy of the weights when the caller is done with the model; its parameters are emptied
    once written, so that nothing the exporter keeps alive holds them). kv_cache="inplace" (fused only): the
    past/present tensors are one preallocated buffer per layer (fused_op's past_present_share_buffer).

    Weights always go to the external data file, whatever the model's size: the writer streams one
    tensor at a time instead of building a second in-memory copy of the model as one protobuf, ONNX
    Runtime maps the file instead of parsing it, and protobuf's 2 GB limit never applies.
    """
    check_opset(attention, opset)
    refuse_unexportable(model, attention, kv_cache)
    from chai_compile.export.clean import finalize_ir
    from chai_compile.export.span_graph import graph_span_layers

    spec = cache_spec(model)
    wrapper = DecoderWrapper(model, spec).eval()
    table = translation_table()
    if attention == AttentionForm.FUSED:
        from chai_compile.export.fused import prepare_fused

        wrapper, fused_table = prepare_fused(wrapper, copy=not in_place, kv_cache=kv_cache)
        table.update(fused_table)
    elif kv_cache != KVCacheMode.CONCAT:
        raise ExportError("the in-place KV cache needs the fused form", value=kv_cache, fix="add --attention fused")
    # In place, the buffer (9 rows) outlives the mask (2 past + 3 new): distinct sizes keep the two dims apart.
    inputs = sample_inputs(spec, model.config.vocab_size, model_dtype(model),
                           **({"past": 9, "mask_len": 5} if kv_cache == KVCacheMode.INPLACE else {}))
    in_names = [*INPUT_NAMES, *spec.names(PAST)]
    out_names = ["logits", *spec.names(PRESENT)]
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), transposed_linears(wrapper), native_gqa(), graph_span_layers(wrapper), \
                warnings.catch_warnings():
            # Same-named dynamic axes across inputs are intended (one batch, one seq, one past): the
            # exporter warns once per axis that it merged them.
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            prog = torch.onnx.export(
                wrapper, inputs, dynamic_shapes=dynamic_shapes(spec), input_names=in_names,
                output_names=out_names, dynamo=True, opset_version=opset, custom_translation_table=table,
                optimize=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types, wrapped; the innermost one names the problem
        # SIGTERM raises Terminated inside the exporter, which wraps it: it is a signal, not an export failure.
        signal = next((x for x in _chain(e) if isinstance(x, Terminated)), None)
        if signal is not None:
            raise signal from None
        raise ExportError(f"torch.onnx.export failed ({attention} form): {root_cause(e)[:300]}",
                          fix="a model family or opset the exporter supports; CHAI_COMPILE_DEBUG=1 shows the "
                              "traceback") from e
    finalize_ir(prog.model, metadata or {})
    if before_save is not None:  # streamed export (export/streaming.py): fills the initializers lazily
        before_save(prog.model)
    path = Path(out_dir) / GRAPH_NAME
    prog.save(str(path), external_data=True)
    # The exporter's IR values hold the weights (W^T views included), and onnxscript's module-level rewrite
    # rules keep the last graph they matched alive: cut both links so the caller can free the weights
    # before ONNX Runtime maps its own copy.
    graph = prog.model.graph
    for value in [*graph.initializers.values(), *(v for node in graph.all_nodes() for v in node.inputs if v)]:
        value.const_value = None
    graph.initializers.clear()
    del prog, graph
    if in_place:
        for param in model.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
    return ExportResult(path, DATA_NAME, spec, in_names, out_names, time.perf_counter() - t0)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def provenance_metadata(mapping: ClusterMapping | None, *, source: str, attention: str, dtype: str, opset: int,
                        cache: CacheSpec | None = None, kv_cache: str = KVCacheMode.CONCAT) -> dict[str, str]:
    """metadata_props of the graph: the mapping (as its JSON) and where the graph came from."""
    from chai_compile import __version__

    meta = {
        "chai.version": __version__,
        "chai.source_model": source,
        "chai.attention": str(attention) if mapping is not None else "original",
        "chai.dtype": dtype,
        "chai.opset": str(opset),
        "chai.kv_cache": str(kv_cache),  # the runner reads it: "inplace" graphs are driven with shared buffers
        "torch.version": torch.__version__,
    }
    if mapping is not None:
        meta["chai.mapping"] = mapping.to_json()
    if cache is not None:
        meta["chai.cache"] = json.dumps(cache.to_dict())
    return meta
