"""Baseline plans to compare chai-compile's plans against at equal KV saving.

StreamingLLM (arXiv 2309.17453) keeps, in every head, the first `sinks` tokens and the last `window`
tokens and evicts the rest. It is the plan v3 where every layer is a span layer and every query head has
the same span, so it runs through the same rewrite, measurement and report as any other plan.
"""

from __future__ import annotations

from chai_compile.choices import LayerKind
from chai_compile.errors import MappingError
from chai_compile.mapping import ClusterMapping, LayerMapping, ModelInfo, Span


def streaming_plan(model: ModelInfo, sinks: int, window: int) -> ClusterMapping:
    """Every head of every layer: `sinks` sink tokens plus a recent `window` (validated like any plan)."""
    span = Span(sinks, window)
    layers = [LayerMapping(i, LayerKind.SPAN, spans=(span,) * model.num_heads) for i in range(model.num_layers)]
    return ClusterMapping.build(model, layers, {"baseline": "streaming", "sinks": sinks, "window": window})


def streaming_window(context: int, saving: float, sinks: int) -> int:
    """The window whose cache (sinks + window tokens per head) saves `saving` (a fraction) of the full cache
    at `context` tokens: the StreamingLLM point at a given KV saving."""
    if not 0.0 < saving < 1.0:
        raise MappingError("a KV saving is a fraction between 0 and 1", value=saving, fix="e.g. 0.4 for 40%")
    window = round(context * (1.0 - saving)) - sinks
    if window < 1:
        raise MappingError(f"saving {saving:.0%} at {context} tokens leaves no room beyond {sinks} sinks",
                           value=saving, fix="ask for a smaller saving, a longer context or fewer sinks")
    return window

