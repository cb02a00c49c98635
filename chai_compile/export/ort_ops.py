"""The compiled ClusteredAttention op library for ONNX Runtime (plugins/onnxruntime): find, build, load.

Order of preference where a fused graph runs in ONNX Runtime: $CHAI_ORT_OPS (must exist), else the in-tree
CMake build, else the onnxruntime-extensions Python op (the reference; slow). Every failure is an
OrtOpsError whose one line says what is wrong and the command that fixes it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path
from typing import Any

from chai_compile.errors import ExportError

ENV = "CHAI_ORT_OPS"
LIBRARY_NAME = "libchai_ort_ops.so"
PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "onnxruntime"
BUILD_DIR = PLUGIN_DIR / "build"


class OrtOpsError(ExportError):
    """The op library is missing, will not build, or ONNX Runtime refuses to load it."""


def _short(path: Path) -> str:
    """Relative to the working directory when inside it (the usual checkout root), else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def build_command(build_dir: Path = BUILD_DIR) -> str:
    rel = _short(PLUGIN_DIR)
    out = _short(build_dir)
    return (f"{rel}/fetch_ort_headers.sh && cmake -S {rel} -B {out} && cmake --build {out} -j "
            f"(or: chai-compile build-ort-ops)")


def default_library() -> Path:
    return BUILD_DIR / LIBRARY_NAME


def find_library() -> Path | None:
    """$CHAI_ORT_OPS (an OrtOpsError when it names no file), else the in-tree build if present, else None."""
    env = os.environ.get(ENV)
    if env:
        if not Path(env).is_file():
            raise OrtOpsError(f"${ENV} names no file", value=env,
                              fix=f"unset it, or build the library: {build_command()}")
        return Path(env)
    lib = default_library()
    return lib if lib.is_file() else None


def require_library() -> Path:
    lib = find_library()
    if lib is None:
        raise OrtOpsError("the ClusteredAttention op library for ONNX Runtime is not built",
                          value=str(default_library()), fix=build_command())
    return lib


def build(build_dir: Path = BUILD_DIR, cuda: bool | None = None, log: Any = print) -> Path:
    """Fetch headers if needed, configure and build with CMake; returns the library path."""
    if not (PLUGIN_DIR / "CMakeLists.txt").is_file():
        raise OrtOpsError("the op library sources are not here (an installed package, not a checkout)",
                          value=str(PLUGIN_DIR), fix="build from a chai-compile source checkout")
    configure = ["cmake", "-S", str(PLUGIN_DIR), "-B", str(build_dir)]
    if cuda is not None:
        configure.append(f"-DCHAI_ORT_CUDA={'ON' if cuda else 'OFF'}")
    steps = [["bash", str(PLUGIN_DIR / "fetch_ort_headers.sh")], configure,
             ["cmake", "--build", str(build_dir), "-j"]]
    for cmd in steps:
        log(" ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["(no output)"]
            raise OrtOpsError(f"building the op library failed at `{' '.join(cmd[:2])}`: {tail[0][:200]}",
                              fix=build_command(build_dir))
    return build_dir / LIBRARY_NAME


def api_version(path: Path) -> int:
    """The ONNX Runtime C API version the library asks for (its ChaiOrtApiVersion symbol)."""
    try:
        return int(ctypes.CDLL(str(path)).ChaiOrtApiVersion())
    except (OSError, AttributeError) as e:
        raise OrtOpsError(f"{path} is not a ClusteredAttention op library: {str(e).splitlines()[0][:200]}",
                          fix=build_command()) from None


def attributes(path: Path) -> tuple[str, ...]:
    """The node attributes the library reads (its ChaiOrtAttributes symbol); () for a build older than it."""
    try:
        fn = ctypes.CDLL(str(path)).ChaiOrtAttributes
    except AttributeError:
        return ()
    except OSError as e:
        raise OrtOpsError(f"{path} is not a ClusteredAttention op library: {str(e).splitlines()[0][:200]}",
                          fix=build_command()) from None
    fn.restype = ctypes.c_char_p
    return tuple(fn().decode().split(","))


def check_current(path: Path) -> None:
    """Refuse a library built from other sources than this package's op contract (it would ignore, or
    misread, attributes it does not know: an old build runs span nodes as full attention)."""
    from chai_compile.kernels.fused_op import ATTRIBUTE_NAMES

    have = attributes(path)
    if have != ATTRIBUTE_NAMES:
        missing = [a for a in ATTRIBUTE_NAMES if a not in have]
        what = ("has no attribute list (an older build)" if not have else
                f"does not read {','.join(missing)}" if missing else f"reads {','.join(have)}")
        raise OrtOpsError(f"the op library {path} was built from other chai-compile sources: it {what}",
                          fix=f"rebuild it: {build_command()}")


def register(options: Any, path: Path) -> None:
    """options.register_custom_ops_library(path), with ONNX Runtime's refusal as one OrtOpsError line."""
    api_version(path)  # a file that is no such library fails here, before ONNX Runtime dlopens it
    check_current(path)
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its pybind Fail/RuntimeException types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OrtOpsError(f"ONNX Runtime refused the op library {path}: {first[:300]}", fix=build_command()) from None


def run_error(exc: Exception) -> ExportError | None:
    """An ONNX Runtime run/session error raised by the op (its message names the node) as one line, else None."""
    text = str(exc)
    if "ClusteredAttention node" not in text and "ClusteredAttention op library" not in text:
        return None
    line = next((ln for ln in text.splitlines() if "ClusteredAttention" in ln), text)
    start = line.find("ClusteredAttention")
    return ExportError(line[start:].strip()[:400], fix="re-export the graph, or feed caches of the shapes it declares")
