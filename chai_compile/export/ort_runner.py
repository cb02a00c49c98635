"""ONNX Runtime wrapper for an exported decoder: one step, greedy generation with the cache, and a
LogitsBackend for the verify harness. CUDA EP + IO binding when onnxruntime-gpu offers CUDA.

Fused graphs run their ClusteredAttention nodes through the compiled op library when one is found
(chai_compile.export.ort_ops), else through the onnxruntime-extensions Python reference op. Graphs exported
with the in-place cache (metadata chai.kv_cache = inplace) are driven with one preallocated buffer per
cache tensor, bound by IO binding as both the past input and the present output of every step. Graphs with span
layers take each bounded head group's cache as its own tensors (`cache_layout`); presents become the next step's
pasts by name whatever the layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chai_compile.choices import KVCacheMode
from chai_compile.errors import ExportError
from chai_compile.export.cache_layout import PAST, PRESENT, CacheSpec
from chai_compile.kernels import fused_op

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(path: Path, providers: list[str] | None, threads: int | None, config: dict[str, str] | None,
             op_library: str) -> tuple[Any, str]:
    """(session, what runs the fused nodes: the library path, "python-reference", or "" for no fused node).

    op_library: "auto" (compiled if found, else the Python op), "compiled" (OrtOpsError when missing) or
    "python" (the reference op)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    model_arg: Any = str(path)
    import onnx

    from chai_compile.export import ort_ops

    proto = onnx.load(str(path), load_external_data=False)
    runs_fused = ""
    if any(n.domain == fused_op.DOMAIN for n in proto.graph.node):
        lib = None if op_library == "python" else \
            (ort_ops.require_library() if op_library == "compiled" else ort_ops.find_library())
        if lib is not None:
            ort_ops.register(opts, lib)
            runs_fused = str(lib)
        else:  # the onnxruntime-extensions Python op (reads list attributes as JSON strings)
            from chai_compile.export.ort_python_op import ort_ready_model

            opts.register_custom_ops_library(_extensions_library())
            model_arg = ort_ready_model(proto)
            # Loaded from bytes, the graph's external data is found relative to this folder.
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            runs_fused = "python-reference"
    if providers is None:
        avail = ort.get_available_providers()
        # Span nodes have no CUDA kernel (fused_op, "Span layers"): such graphs run on the CPU unless asked.
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in avail and not _has_span_nodes(proto) else ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in providers:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when the system has none on its path
        # fp32 graphs stay fp32 on the GPU: TF32 matmuls would move logits by ~1e-2, past any parity check.
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                     for p in providers]
    try:
        return ort.InferenceSession(model_arg, opts, providers=providers), runs_fused
    except Exception as e:
        err = ort_ops.run_error(e)  # the op's one line (bad attributes), not ONNX Runtime's stack
        if err is None:
            raise
        raise err from None


def _has_span_nodes(proto: Any) -> bool:
    import onnx

    return any(fused_op.has_spans({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
               for n in proto.graph.node if n.domain == fused_op.DOMAIN and n.op_type == fused_op.OP_TYPE)


def _extensions_library() -> str:
    try:
        import onnxruntime_extensions
    except ImportError:
        from chai_compile.export.ort_ops import build_command

        raise ExportError("the fused graph needs the compiled op library or onnxruntime-extensions",
                          fix=f"{build_command()}; or pip install onnxruntime-extensions") from None
    from chai_compile.export.ort_python_op import register_ort_op

    register_ort_op()
    return onnxruntime_extensions.get_library_path()


class OrtDecoder:
    """An exported decoder directory (model.onnx [+ data], manifest.json) in ONNX Runtime."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 config: dict[str, str] | None = None, op_library: str = "auto") -> None:
        path = Path(path)
        self.path = path / "model.onnx" if path.is_dir() else path
        if not self.path.is_file():
            raise ExportError("no exported graph found", value=str(path), fix="pass an export directory")
        self.session, self.fused_op_runner = _session(self.path, providers, threads, config, op_library)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [n for n in self.inputs if n.startswith(f"{PAST}.")]
        # What each past becomes after a step: the present of the same name (graph outputs may be in any order).
        self.present_outputs = [PRESENT + n[len(PAST):] for n in self.past_inputs]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.cache = CacheSpec.from_dict(json.loads(meta["chai.cache"])) if "chai.cache" in meta else \
            self._plain_cache_spec()
        if sorted(self.cache.names(PAST)) != sorted(self.past_inputs):
            raise ExportError("the graph's cache inputs disagree with its chai.cache metadata",
                              value=sorted(set(self.cache.names(PAST)) ^ set(self.past_inputs)),
                              fix="re-export the directory with chai-compile export")
        self.num_layers, self.head_dim = self.cache.num_layers, self.cache.head_dim
        self.k_heads, self.v_heads = list(self.cache.k_heads), list(self.cache.v_heads)
        self.float_type = _NP[self.inputs[self.past_inputs[0]].type]
        self.use_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.kv_cache = KVCacheMode(meta.get("chai.kv_cache", KVCacheMode.CONCAT))
        self._bound: tuple[list[Any], Any] | None = None  # in place: the buffers last bound, and that binding
        self.name = "onnxruntime"
        self.max_length = 2048

    def _plain_cache_spec(self) -> CacheSpec:
        """Graphs exported before the chai.cache metadata: K and V head counts from the inputs' shapes."""
        n = len(self.past_inputs) // 2
        heads = [[self.inputs[f"{PAST}.{i}.{kind}"].shape[1] for i in range(n)] for kind in ("key", "value")]
        return CacheSpec(tuple(heads[0]), tuple(heads[1]), self.inputs[self.past_inputs[0]].shape[3])

    def empty_cache(self, batch: int, capacity: int = 512) -> list[Any]:
        """The cache before the first step, in `past_inputs` order. Concat: zero-length past tensors (numpy on
        CPU, OrtValues under CUDA). In place: zeroed buffers of `capacity` token rows (OrtValues), written by
        every step."""
        rows = capacity if self.kv_cache == KVCacheMode.INPLACE else 0
        shapes = {f"{PAST}.{name}": shape for name, shape in self.cache.entries(batch, rows)}
        return self.wrap_cache([np.zeros(shapes[name], self.float_type) for name in self.past_inputs])

    def wrap_cache(self, arrays: list[np.ndarray]) -> list[Any]:
        """Cache arrays in the form step() takes (in place: buffers whose row count is the capacity)."""
        if self.kv_cache == KVCacheMode.INPLACE or self.use_cuda:
            return [self.to_device(a) for a in arrays]
        return arrays

    def to_device(self, array: np.ndarray) -> Any:
        import onnxruntime as ort

        if self.use_cuda:
            return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One forward: logits [B, S, V] (numpy) and the present cache (numpy, or OrtValues on CUDA)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        try:
            if self.use_cuda or self.kv_cache == KVCacheMode.INPLACE:
                return self._step_bound(feeds, past)
            feeds.update(zip(self.past_inputs, past, strict=True))
            outs = self.session.run(["logits", *self.present_outputs], feeds)
            return outs[0], outs[1:]
        except Exception as e:
            from chai_compile.export.ort_ops import run_error

            err = run_error(e)  # a fused node's one-line complaint (cache shapes vs attributes)
            if err is None:
                raise
            raise err from None

    def _step_bound(self, feeds: dict[str, np.ndarray], past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        # IO binding: the cache stays where it is from step to step and only the logits come back to the
        # host; small int inputs are copied in. Concat (CUDA): present -> next past. In place: each buffer
        # is bound as its layer's past input and present output, so a step writes only the new rows.
        inplace = self.kv_cache == KVCacheMode.INPLACE
        if inplace and self._bound is not None and len(self._bound[0]) == len(past) and \
                all(a is b for a, b in zip(self._bound[0], past, strict=True)):
            binding = self._bound[1]  # same buffers as the last step: only the token inputs change
        else:
            binding = self.session.io_binding()
            for name, value in zip(self.past_inputs, past, strict=True):
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
            for name, value in zip(self.present_outputs, past, strict=True):
                if inplace:
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_output(name, "cuda")
            self._bound = (list(past), binding) if inplace else None
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        # Bound afresh every step (same slot, by name): a reused binding keeps the last logits, whose shape
        # changes with the prompt.
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(past) if inplace else list(outs[1:])

    def greedy(self, input_ids: np.ndarray, steps: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Greedy decode `steps` new tokens with the cache; returns [B, steps] token ids."""
        ids = np.asarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        mask = np.ones((b, s), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = self.empty_cache(b, capacity=s + steps)
        new = []
        logits, past = self.step(ids, mask, pos, past)
        for _ in range(steps):
            tok = logits[:, -1].argmax(-1)
            new.append(tok)
            if len(new) == steps:
                break
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits, past = self.step(tok[:, None], mask, pos, past)
        return np.stack(new, axis=1)

    # ---- LogitsBackend (chai_compile.verify.scoring) --------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int) -> np.ndarray:
        ids = input_ids.numpy()
        mask = attention_mask.numpy()
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        out, _ = self.step(ids, mask, pos, self.empty_cache(ids.shape[0], capacity=ids.shape[1]))
        return out[:, first:].astype(np.float32)
