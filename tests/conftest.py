"""Shared fixtures: paths to ../shared data (beside the checkout in CI) and cached model loads."""

from __future__ import annotations

import re
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
    from chai_compile.kernels.fused_op import ATTRIBUTE_NAMES

    lib = ort_ops.find_library()
    if lib is None or (lib == ort_ops.default_library() and ort_ops.attributes(lib) != ATTRIBUTE_NAMES):
        if shutil.which("cmake") is None:
            pytest.skip("cmake missing: cannot build the ONNX Runtime op library")
        lib = ort_ops.build(cuda=False, log=lambda m: None)  # missing, or an in-tree build from older sources
    return lib


# Tests whose own call takes more than 5 s on the 2-core runner (`pytest --durations=30`, seconds in the
# comments): `slow`, so that `pytest -m "not slow"` stays a two-minute loop. Module fixtures that export
# once for many tests are not here: each of those tests is fast once the fixture has run.
SLOW_TESTS = {
    "test_plan.py::test_a_plan_with_weights_exports_and_verifies",  # 12.6: plan, export and verify
    "test_profile.py::test_profile_stories_is_deterministic",  # 12.2: two profiles in subprocesses
    "test_verify.py::test_scores_on_stories_are_stable",  # 8.6: every task on stories260K
    "test_runtime_files.py::test_genai_pack_refuses_an_original_export",  # 7.1: a second export
    "test_profile.py::test_profile_overrides",  # 5.1: a profile in a subprocess
    "test_profile.py::test_bad_input_one_line_error_no_output",  # 3.4-5.0 each, 7 cases: one process each
    "test_verify.py::test_sweep_from_a_profile",  # 3.6-10: a profile, then a sweep of its budgets
    "test_rewrite_transforms.py::test_cli_export_of_a_shared_plan",  # ~25: a portable export, validated
    "test_export_spans.py::test_stories_planned_span_plan_exports_and_validates",  # a plan, export, verify
    "test_export_spans.py::test_stories_clustered_span_shared_plan_exports_and_validates",  # export, 300 steps
    "test_export_fused_spans.py::test_stories_clustered_span_shared_plan_exports_fused_and_validates",  # ~10
    "test_export_fused_spans.py::test_stories_planned_span_plan_exports_fused_and_validates",  # plan and export
    "test_export_fused_spans.py::test_stories_span_plan_exports_fused_inplace_and_validates",  # ~8
}
# Modules that need CUDA throughout (the other GPU tests say so in their skipif reason).
GPU_MODULES = {"test_rewrite_gpu.py"}
_NEEDS_CUDA = re.compile(r"\b(CUDA|GPU)\b")


def _needs_cuda(item: pytest.Item) -> bool:
    if item.path.name in GPU_MODULES:
        return True
    return any(_NEEDS_CUDA.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        # Anything that loads SmolLM2-135M is slow (a 98 MB GGUF dequantized, 30 layers): marked in one place.
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if _needs_cuda(item):  # `-m gpu` on the GPU machine runs exactly these; `-m "not gpu"` skips them
            item.add_marker(pytest.mark.gpu)
