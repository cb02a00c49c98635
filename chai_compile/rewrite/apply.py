"""Apply a ClusterMapping to a loaded model: swap the attention module of every clustered, shared and span layer."""

from __future__ import annotations

from torch import nn

from chai_compile.adapters import adapter_for
from chai_compile.choices import LayerKind, Membership
from chai_compile.fingerprint import model_info
from chai_compile.layout import cluster_layout
from chai_compile.mapping import ClusterMapping
from chai_compile.plan.weights import load_weights
from chai_compile.rewrite.base import ClusteredAttention, RewriteError
from chai_compile.rewrite.dynamic import DynamicClusteredAttention
from chai_compile.rewrite.shared import ProbabilityStore, SharedAttention
from chai_compile.rewrite.span import SpanAttention
from chai_compile.rewrite.static import StaticClusteredAttention


def apply_mapping(model: nn.Module, mapping: ClusterMapping, *, membership: str = Membership.STATIC) -> nn.Module:
    """Rewrite `model` in place so each clustered layer computes CHAI attention; returns the model.

    membership="static": the mapping's clusters, frozen (what export uses); Q/K projections hold
    only representative / kept rows and the K cache only the KV heads some representative reads.
    membership="dynamic": the paper's online mode: clusters chosen per request from the first 5
    tokens with the mapping's per-layer counts. The K cache then keeps every KV head (membership
    is unknown ahead of time), so it saves score compute and Q projection, not memory.
    Dense layers are left untouched, except those a shared layer reads: they become identity-clustered
    layers (the same function) that hand their probabilities over. A shared layer keeps V and O only
    (`shared.SharedAttention`); a span layer keeps every projection and a bounded cache for the KV heads
    only span heads read (`span.SpanAttention`). A plan that carries refit weights (`chai-compile plan`) has them
    loaded into its clustered layers, checked against the plan's sha256. Raises FingerprintMismatchError
    when the mapping was profiled on another model, RewriteError for a bad `membership` or an already
    rewritten model, MappingError for weights that are missing or do not match the plan,
    MappingError for a plan that fails validation (e.g. built in code with a shared layer reading a later
    layer), RewriteError for a shared layer whose source is a span layer.
    """
    if membership not in Membership.values():
        raise RewriteError(f"membership must be one of {', '.join(Membership.values())}", value=membership)
    mapping.validate()  # a plan built in code has not been through the reader's checks
    adapter = adapter_for(model)
    if any(isinstance(m, ClusteredAttention) for m in model.modules()):
        raise RewriteError("the model is already rewritten", fix="apply a mapping to an original model")
    mapping.check_model(model_info(adapter))
    refit = load_weights(mapping) or {}
    if refit and membership == Membership.DYNAMIC:
        raise RewriteError("refit weights are fitted to the plan's static clusters",
                           fix="use --membership static with a plan that carries weights")
    # Rewritten layers read the masks the decoder builds for eager or sdpa (4D additive or bool, or
    # None for plain causal); flash/flex attention build other forms, so switch those to sdpa.
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")

    # Build every new module before swapping any: adapters read the original modules (e.g. the
    # scaling of layer 0), and a failure half way must leave the model as it was.
    layers = adapter.decoder_layers()
    store = _probability_store(mapping)
    swaps = []
    for i, lm in enumerate(mapping.layers):
        if lm.kind == LayerKind.DENSE and i not in store.readers:
            continue
        old = adapter.attention(i)
        if lm.kind == LayerKind.SHARED:
            new: ClusteredAttention = SharedAttention(adapter, i, lm.source, store)
        elif lm.kind == LayerKind.SPAN:
            new = SpanAttention(adapter, lm)
        elif membership == Membership.DYNAMIC and lm.kind == LayerKind.CLUSTERED:
            new = DynamicClusteredAttention(adapter, i, lm.num_clusters)
        else:
            new = StaticClusteredAttention(adapter, i, cluster_layout(mapping, i))
        if isinstance(new, StaticClusteredAttention) and i in refit:
            new.load_refit(refit[i].q_rows, refit[i].o_weight)
        if i in store.readers:
            new.publish = store
        new.train(old.training)
        name = next(n for n, m in layers[i].named_children() if m is old)
        swaps.append((layers[i], name, new))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model


def _probability_store(mapping: ClusterMapping) -> ProbabilityStore:
    """The hand-over between source and shared layers; refuses sources whose probabilities it cannot carry."""
    readers: dict[int, int] = {}
    for lm in mapping.layers:
        if lm.kind != LayerKind.SHARED:
            continue
        if mapping.layers[lm.source].kind == LayerKind.SPAN:
            # A span source's bounded heads score only what they kept; the shared layer's V is full length.
            raise RewriteError(f"layer {lm.index}: shared layers read a dense or clustered source, not span layer "
                               f"{lm.source}", value=lm.source,
                               fix="point the shared layer at a dense or clustered layer")
        readers[lm.source] = readers.get(lm.source, 0) + 1
    return ProbabilityStore(readers)
