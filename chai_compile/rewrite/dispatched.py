"""Apply a mapping to a model accelerate spread over devices or offloaded: in place, without a second copy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import nn

from chai_compile.device_map import execution_device, loaded, on_meta


def rewrite_in_place(model: nn.Module, mapping: Any, membership: str = "static") -> Callable[[], None]:
    """Apply `mapping` to a dispatched model in place (no second copy of a model spread over devices);
    returns the function that puts the original attention modules back.

    Offloaded layers are loaded to the CPU for the rewrite, one copy of their attention weights, and each
    new module is offloaded again from that copy: it loads to its layer's execution device per forward."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from chai_compile.adapters import adapter_for
    from chai_compile.rewrite import apply_mapping

    adapter = adapter_for(model)
    layers = adapter.decoder_layers()
    originals = []
    for i in range(adapter.spec.num_layers):
        old = adapter.attention(i)
        name = next(n for n, m in layers[i].named_children() if m is old)
        was_offloaded = any(on_meta(m, recurse=False) for m in old.modules())
        originals.append((layers[i], name, old, was_offloaded, execution_device(old)))
    with contextlib.ExitStack() as stack:
        for _, _, old, was_offloaded, _ in originals:
            if was_offloaded:
                stack.enter_context(loaded(old, device="cpu"))
        apply_mapping(model, mapping, membership=membership)
    for parent, name, old, was_offloaded, device in originals:
        new = getattr(parent, name)
        if new is old or not was_offloaded:
            continue
        for mod in new.modules():  # the small index buffers live on the device, the weights offloaded
            for b, t in mod._buffers.items():
                if t is not None:
                    mod._buffers[b] = t.to(device)
        weights = {k: v.detach() for k, v in new.state_dict().items()}
        add_hook_to_module(new, AlignDevicesHook(execution_device=device, offload=True, weights_map=weights,
                                                 place_submodules=True))

    def undo() -> None:
        for parent, name, old, _, _ in originals:
            setattr(parent, name, old)

    return undo
