"""ONNX Runtime wrapper for an exported decoder: one step, greedy generation with the cache, and a
LogitsBackend for the verify harness. CUDA EP + IO binding when onnxruntime-gpu offers CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chai_compile import fused_op
from chai_compile.errors import ExportError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(path: Path, providers: list[str] | None, threads: int | None, config: dict[str, str] | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    model_arg: Any = str(path)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if any(n.domain == fused_op.DOMAIN for n in proto.graph.node):
        # The fused graph: its ClusteredAttention nodes run through the onnxruntime-extensions Python op.
        from chai_compile.export.fused import ort_ready_model

        opts.register_custom_ops_library(_extensions_library())
        model_arg = ort_ready_model(proto)
        # Loaded from bytes, the graph's external data is found relative to this folder.
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    if providers is None:
        avail = ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in avail \
            else ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in providers:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when the system has none on its path
        # fp32 graphs stay fp32 on the GPU: TF32 matmuls would move logits by ~1e-2, past any parity check.
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                     for p in providers]
    return ort.InferenceSession(model_arg, opts, providers=providers)


def _extensions_library() -> str:
    try:
        import onnxruntime_extensions
    except ImportError:
        raise ExportError("the fused graph needs onnxruntime-extensions to run in ONNX Runtime",
                          fix="pip install onnxruntime-extensions") from None
    from chai_compile.export import fused

    fused.register_ort_op()
    return onnxruntime_extensions.get_library_path()


class OrtDecoder:
    """An exported decoder directory (model.onnx [+ data], manifest.json) in ONNX Runtime."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 config: dict[str, str] | None = None) -> None:
        path = Path(path)
        self.path = path / "model.onnx" if path.is_dir() else path
        if not self.path.is_file():
            raise ExportError("no exported graph found", value=str(path), fix="pass an export directory")
        self.session = _session(self.path, providers, threads, config)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self.past_inputs) // 2
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        cache = json.loads(meta["chai.cache"]) if "chai.cache" in meta else None
        self.head_dim = cache["head_dim"] if cache else self.inputs[self.past_inputs[0]].shape[3]
        self.k_heads = cache["k_heads"] if cache else [self.inputs[f"past_key_values.{i}.key"].shape[1]
                                                      for i in range(self.num_layers)]
        self.v_heads = cache["v_heads"] if cache else [self.inputs[f"past_key_values.{i}.value"].shape[1]
                                                      for i in range(self.num_layers)]
        self.float_type = _NP[self.inputs[self.past_inputs[0]].type]
        self.use_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.name = "onnxruntime"
        self.max_length = 2048

    def empty_cache(self, batch: int) -> list[Any]:
        """Zero-length past tensors: numpy on CPU, OrtValues on the device under CUDA."""
        out = []
        for kh, vh in zip(self.k_heads, self.v_heads, strict=True):
            out += [np.zeros((batch, kh, 0, self.head_dim), self.float_type),
                    np.zeros((batch, vh, 0, self.head_dim), self.float_type)]
        return [self.to_device(a) for a in out] if self.use_cuda else out

    def to_device(self, array: np.ndarray) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One forward: logits [B, S, V] (numpy) and the present cache (numpy, or OrtValues on CUDA)."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        if self.use_cuda:
            return self._step_cuda(feeds, past)
        feeds.update(zip(self.past_inputs, past, strict=True))
        outs = self.session.run(self.output_names, feeds)
        return outs[0], outs[1:]

    def _step_cuda(self, feeds: dict[str, np.ndarray], past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        # IO binding: the cache stays on the device from step to step (present -> next past) and only the
        # logits come back to the host; small int inputs are copied in.
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for name, value in zip(self.past_inputs, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output_names[0], "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def greedy(self, input_ids: np.ndarray, steps: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Greedy decode `steps` new tokens with the cache; returns [B, steps] token ids."""
        ids = np.asarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        mask = np.ones((b, s), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = self.empty_cache(b)
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
        out, _ = self.step(ids, mask, pos, self.empty_cache(ids.shape[0]))
        return out[:, first:].astype(np.float32)
