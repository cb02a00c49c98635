"""Where the Triton kernel tests run: CUDA with triton, else the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (slow, tiny shapes only), else nowhere (the tests skip)."""

from __future__ import annotations

import os

import pytest
import torch

from chai_compile.kernels import HAS_TRITON

if torch.cuda.is_available() and HAS_TRITON:
    DEV: str | None = "cuda"
elif HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    DEV = "cpu"
else:
    DEV = None
needs_kernel = pytest.mark.skipif(DEV is None, reason="needs CUDA and triton (or TRITON_INTERPRET=1)")
