"""Shared fixtures: paths to ../shared data (beside the checkout in CI) and cached model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
STORIES_MHA = SHARED / "models" / "stories260K-mha"
EVAL = SHARED / "eval"


@pytest.fixture(scope="session")
def stories():
    from chai_compile.loading import load_model

    return load_model(str(STORIES))


@pytest.fixture(scope="session")
def smollm2():
    from chai_compile.loading import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    # Anything that loads SmolLM2-135M is slow (a 98 MB GGUF dequantized, 30 layers): mark it in one place.
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
