"""Shared fixtures: paths to ../shared data (beside the checkout in CI) and cached model loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
STORIES_MHA = SHARED / "models" / "stories260K-mha"
EVAL = SHARED / "eval"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models: on a shared 2-core runner OpenMP spin-waiting
    made such files up to 10x slower (180 s vs 15 s). Restored for the other test files."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stories():
    from chai_compile.loading import load_model

    return load_model(str(STORIES))


@pytest.fixture(scope="session")
def smollm2():
    from chai_compile.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def ort_ops_library():
    """The compiled ClusteredAttention op library for ONNX Runtime: found, or built (CPU only) with CMake."""
    from chai_compile.export import ort_ops

    lib = ort_ops.find_library()
    if lib is None:
        if shutil.which("cmake") is None:
            pytest.skip("cmake missing: cannot build the ONNX Runtime op library")
        lib = ort_ops.build(cuda=False, log=lambda m: None)
    return lib


def pytest_collection_modifyitems(config, items):
    # Anything that loads SmolLM2-135M is slow (a 98 MB GGUF dequantized, 30 layers): mark it in one place.
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
