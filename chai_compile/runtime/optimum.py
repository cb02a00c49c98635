"""CHAI artifacts in Optimum: ORTModelForCausalLM with the cache sized per layer and per K/V from the graph.

Optimum sizes the first step's empty pasts and the IO-binding buffers of the presents with one
`num_key_value_heads` for every layer and for K and V alike. A CHAI graph keeps fewer K heads than V heads in
clustered layers, so those shapes are wrong there. This subclass reads every layer's K and V head counts from the
graph's inputs and supplies both; everything else (generate, pipelines, left-padded batches) is Optimum's.

    from chai_compile.runtime import CHAIModelForCausalLM
    model = CHAIModelForCausalLM.from_pretrained("EXPORT_DIR")
"""

from __future__ import annotations

from typing import Any

import torch

from chai_compile.errors import DependencyError
from chai_compile.runtime.heads import CacheHeads, cache_heads

try:
    from optimum.onnxruntime import ORTModelForCausalLM
except ImportError as e:  # chai-compile does not depend on Optimum; its serving environment does
    raise DependencyError(f"CHAIModelForCausalLM needs optimum-onnx ({e.name or 'optimum'} is not installed)",
                          fix="pip install 'optimum-onnx[onnxruntime]' in the serving environment "
                              "(see docs/runtimes.md)") from None


class CHAIModelForCausalLM(ORTModelForCausalLM):
    """An exported decoder whose layers may keep different numbers of K and V heads (or any per-layer count)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_heads: CacheHeads = cache_heads(self.input_shapes, self.path.parent)

    def empty_past(self, batch: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Zero-length pasts of the first step, one (K, V) pair per layer, each with its own head count."""
        def zeros(name: str) -> torch.Tensor:
            return torch.zeros(self.cache_heads.shape(name, batch, 0), dtype=self.dtype, device=self.device)

        names = self.key_value_input_names
        return tuple((zeros(names[i]), zeros(names[i + 1])) for i in range(0, len(names), 2))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None = None,
                past_key_values: Any = None, position_ids: torch.LongTensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> Any:
        if past_key_values is None and self.key_value_input_names:
            past_key_values = self.empty_past(input_ids.shape[0])
        return super().forward(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               position_ids=position_ids, use_cache=use_cache, **kwargs)

    def _prepare_io_binding(self, model_inputs: dict[str, torch.Tensor], outputs_to_not_bind: set[str] | None = None,
                            known_output_buffers: dict[str, Any] | None = None,
                            known_output_shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
        # Optimum passes one [batch, num_key_value_heads, total, head_dim] for every present: keep its batch and
        # total length, take the heads (and head size) of that very output.
        shapes = dict(known_output_shapes or {})
        for name, shape in shapes.items():
            if name in self.key_value_output_names:
                shapes[name] = self.cache_heads.shape(name, shape[0], shape[2])
        return super()._prepare_io_binding(model_inputs, outputs_to_not_bind=outputs_to_not_bind,
                                           known_output_buffers=known_output_buffers, known_output_shapes=shapes)
