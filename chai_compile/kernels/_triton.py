"""Triton, imported when installed: the kernel modules define their kernels either way, and the entry
points raise without it (CPU-only installs, `import chai_compile.kernels` in a fused ONNX runtime).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: kernels are defined but never launched.
    HAS_TRITON = False

    class _NoTriton:
        constexpr = int

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]


LOG2E = 1.4426950408889634


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("chai_compile.kernels needs triton (pip install triton) and a CUDA GPU")
