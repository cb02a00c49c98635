"""Models spread over devices by accelerate (`--device-map`, `--max-memory`): option parsing, and the few
things the pipeline needs to work on such a model.

accelerate hooks every module it places: a hook moves the module's inputs to its execution device,
and for an offloaded module (weights on the CPU or on disk, not on the execution device) it loads the
weights just before the module's forward and puts them back on the `meta` device right after. Code
that reads weights outside a module's own forward (capture, the planner, the rewrite) must load them
itself: `loaded(module)` does, one module at a time, so memory stays one layer's working set.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from chai_compile.errors import UsageError
from chai_compile.placement_options import parse_device_map, parse_max_memory  # noqa: F401  (re-exported)


def check_cuda_map(device_map: str | dict[str, Any] | None, max_memory: dict[int | str, int] | None) -> None:
    """Refuse GPU placements when torch sees no GPU, before anything is loaded."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wants = [v for v in (device_map.values() if isinstance(device_map, dict) else [device_map])
             if v == "cuda" or isinstance(v, int) or (isinstance(v, str) and v.startswith("cuda"))]
    wants += [k for k in (max_memory or {}) if isinstance(k, int)]
    for w in wants:
        index = w if isinstance(w, int) else int(w.split(":")[1]) if ":" in w else 0
        if index >= count:
            raise UsageError(f"--device-map/--max-memory place weights on GPU {index}, but torch sees {count} GPU(s)",
                             value=w, fix="use --device-map cpu, or budget only the GPUs that exist")


def load_kwargs(device_map: str | dict[str, Any] | None, max_memory: dict[int | str, int] | None) -> dict[str, Any]:
    """from_pretrained arguments: the map, the budget and a scratch folder for layers offloaded to disk."""
    if device_map is None:
        if max_memory:
            raise UsageError("--max-memory needs --device-map", fix="add --device-map auto")
        return {}
    if device_map == "cuda":
        device_map = {"": 0}
    check_cuda_map(device_map, max_memory)
    kwargs: dict[str, Any] = {"device_map": device_map, "offload_folder": _scratch()}
    if max_memory:
        kwargs["max_memory"] = max_memory
    return kwargs


def _scratch() -> str:
    folder = tempfile.mkdtemp(prefix="chai-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def is_dispatched(model: nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None


def input_device(model: nn.Module) -> torch.device:
    """Where to put input ids: the dispatched model's main device (its hook moves them on), else the weights'."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _offload_hooks(module: nn.Module) -> Iterator[tuple[nn.Module, Any]]:
    """(module, hook) for every module under `module` whose weights accelerate keeps off its execution device."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "offload", False):
                yield m, h


def on_meta(m: nn.Module, recurse: bool = False) -> bool:
    return any(t.device.type == "meta" for t in [*m.parameters(recurse=recurse), *m.buffers(recurse=recurse)])


@contextlib.contextmanager
def loaded(module: nn.Module, device: str | torch.device | None = None) -> Iterator[None]:
    """Weights of `module` (and its children) real while inside, on their execution device (or `device`).

    Only modules whose weights are on `meta` now are loaded, so using it inside a forward that already
    loaded them is harmless; they go back to `meta` on exit."""
    from accelerate.utils import set_module_tensor_to_device

    done = []
    try:
        for m, h in _offload_hooks(module):
            if not on_meta(m, recurse=getattr(h, "place_submodules", False)):
                continue
            if device is None:
                h.pre_forward(m)
                done.append((m, h, None))
            else:  # set by hand: the hook's own post_forward expects its pre_forward to have run
                names = [n for n, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                         if n in h.weights_map]
                for n in names:
                    set_module_tensor_to_device(m, n, device, value=h.weights_map[n])
                done.append((m, h, names))
        yield
    finally:
        for m, h, names in done:
            if names is None:
                h.post_forward(m, None)
            else:
                for n in names:
                    set_module_tensor_to_device(m, n, "meta")


def offloaded(model: nn.Module) -> bool:
    """True when some weights live off their execution device (on `meta` between forwards)."""
    return any(p.device.type == "meta" for p in model.parameters())


def placement(model: nn.Module) -> dict[str, Any] | None:
    """Where accelerate put the model: modules per device, and whether any are offloaded."""
    dm = getattr(model, "hf_device_map", None)
    if dm is None:
        return None
    counts: dict[str, int] = {}
    for dev in dm.values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return {"modules_per_device": counts, "offloaded": offloaded(model)}


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)


def peak_memory_mb() -> dict[str, float]:
    """Peak allocated memory per GPU since the last reset_peaks, and the process's peak RSS."""
    import resource

    out = {"cpu_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        out[f"cuda:{i}"] = round(torch.cuda.max_memory_allocated(i) / 2**20, 1)
    return out


def execution_device(module: nn.Module) -> torch.device:
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    return next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))


def cast_in_place(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), also on a dispatched model (accelerate refuses .to there): every tensor cast where it
    is; offloaded weights (on `meta`) are cast by accelerate to the new dtype when loaded."""
    if not is_dispatched(model):
        model.to(dtype)
        return
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
