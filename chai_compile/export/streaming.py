"""Export of a model accelerate spread over devices or offloaded (`export --device-map`), without gathering
its weights on one device or in host memory.

The graph is traced from a stand-in of the same architecture whose parameters are stride-0 views of one
random row (real CPU tensors that take next to no memory), rewritten with the same mapping. Before the graph is
saved, each initializer's value is replaced by a lazy tensor that reads the matching parameter of the
real, dispatched model (loading an offloaded module for that one read): the external data file is
written one tensor at a time, layer after layer, with a progress bar per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from chai_compile.device_map import loaded
from chai_compile.errors import ExportError

_SEEDS = itertools.count()
_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.")


def _view(p: torch.Tensor) -> torch.Tensor:
    """p's shape and dtype from one random row repeated by stride 0 (memory of one row).

    Why random, not zeros: the exporter's optimizer simplifies Mul by zeros or ones, which would change the
    graph; values that vary along the row look like any weight to it."""
    g = torch.Generator().manual_seed(next(_SEEDS))  # distinct rows: the optimizer merges equal initializers
    row = (torch.rand(p.shape[-1] if p.dim() else (), generator=g) + 0.5).to(p.dtype)
    return row.expand(p.shape)


def _stand_in_params(model: nn.Module) -> None:
    """Every parameter becomes a stand-in view (its shape and dtype, next to no memory)."""
    made: dict[int, nn.Parameter] = {}  # tied weights (lm_head = embedding) stay one parameter
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(_view(p), requires_grad=False)
                mod._parameters[name] = made[id(p)]


def stand_in(source: nn.Module, mapping: Any, membership: str = "static") -> nn.Module:
    """The source's architecture with stand-in weights and real buffers, rewritten with `mapping` if any."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from chai_compile.adapters import adapter_for
    from chai_compile.fingerprint import model_info
    from chai_compile.rewrite import apply_mapping

    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) computed for real
        twin = AutoModelForCausalLM.from_config(source.config, dtype=source.dtype)
    twin.eval()
    _tie_like(twin, source)
    _stand_in_params(twin)
    if mapping is not None:
        # The mapping was checked against the real model; the stand-in's digest is of zeros.
        twin_mapping = dataclasses.replace(mapping, model=model_info(adapter_for(twin)))
        apply_mapping(twin, twin_mapping, membership=membership)
        _stand_in_params(twin)  # the rewrite copied rows of the zeros: views again
    return twin


def _tie_like(twin: nn.Module, source: nn.Module) -> None:
    """Share the parameters the source shares (lm_head = embedding): the exporter writes a tied weight once."""
    first: dict[int, str] = {}
    for name, p in source.named_parameters(remove_duplicate=False):
        if id(p) in first:
            owner, attr = _owner(twin, name)
            src_owner, src_attr = _owner(twin, first[id(p)])
            owner._parameters[attr] = src_owner._parameters[src_attr]
        else:
            first[id(p)] = name


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), name


class _Reader:
    """Reads parameters of `source`, keeping the decoder layer being written loaded until the next one starts
    (an offloaded layer is loaded once, not once per tensor)."""

    def __init__(self, source: nn.Module) -> None:
        self.source = source
        self.layer: str | None = None
        self.stack = contextlib.ExitStack()

    def read(self, fqn: str, transpose: bool) -> Any:
        from torch.onnx._internal.exporter._core import TorchTensor  # the exporter's own torch -> IR tensor

        m = _LAYER.search(fqn)
        scope = fqn[: m.end() - 1] if m else fqn.rpartition(".")[0]
        if scope != self.layer:
            self.stack.close()
            self.stack = contextlib.ExitStack()
            self.stack.enter_context(loaded(self.source.get_submodule(scope) if scope else self.source))
            self.layer = scope
        module, name = _owner(self.source, fqn)
        t = getattr(module, name).detach().to("cpu", copy=True)
        return TorchTensor(t.t().contiguous() if transpose else t.contiguous())

    def close(self) -> None:
        self.stack.close()


def lazy_initializers(source: nn.Module, num_layers: int, reader: _Reader, progress: bool = True) -> Any:
    """`before_save` for export_decoder: every parameter's initializer read from `source` when it is written."""
    import onnx_ir as ir

    def fill(ir_model: Any) -> None:
        bar = tqdm(total=num_layers, desc="write weights", unit="layer", disable=not progress)
        seen: set[int] = set()

        def lazy(fqn: str, transpose: bool, layer: int | None) -> Any:
            def read() -> Any:
                if layer is not None and layer not in seen:
                    seen.add(layer)
                    bar.update(1)
                return reader.read(fqn, transpose)
            return read

        params = dict(source.named_parameters(remove_duplicate=False))
        for name, value in ir_model.graph.initializers.items():
            fqn = name.removeprefix("model.")  # DecoderWrapper holds the model as `model`
            transpose = fqn.endswith(".weight_t")  # _TransposedLinear: W^T as a view of W
            if transpose:
                fqn = fqn[: -len("_t")]
            if fqn not in params:  # buffers (rotary frequencies, cluster indices) and small folded constants:
                continue  # the stand-in computed them for real; validation below judges the whole graph
            want = tuple(reversed(params[fqn].shape)) if transpose else tuple(params[fqn].shape)
            if tuple(value.shape.numpy()) != want:
                raise ExportError(f"initializer {name} has shape {tuple(value.shape.numpy())}, the model's {want}",
                                  fix="export without --device-map on a machine that holds the model")
            m = _LAYER.search(fqn)
            layer = int(m.group(1) or m.group(2)) if m else None
            value.const_value = ir.LazyTensor(lazy(fqn, transpose, layer), dtype=value.dtype, shape=value.shape,
                                              name=name)
        # The bar advances while the graph is saved (the reads happen then); tqdm closes it when it is freed.

    return fill


def export_streamed(source: nn.Module, mapping: Any, out_dir: Path, **kwargs: Any) -> Any:
    """export_decoder on a stand-in, weights streamed from the dispatched `source` (rewritten in place)."""
    from chai_compile.export import onnx_export

    twin = stand_in(source, mapping)  # the same modules and names as `source`, which carries the rewrite
    spec = onnx_export.cache_spec(source)
    reader = _Reader(source)
    try:
        return onnx_export.export_decoder(twin, out_dir, in_place=False, before_save=lazy_initializers(
            source, spec.num_layers, reader), **kwargs)
    finally:
        reader.close()
