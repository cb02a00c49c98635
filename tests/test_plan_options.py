"""Distillation settings of the planner: bad values are one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from chai_compile.cli import main
from tests.conftest import STORIES


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
@pytest.mark.parametrize("flag,value", [("--distill-steps", "-1"), ("--distill-batch", "0")])
def test_negative_objective_settings_are_one_line_errors(tmp_path, flag, value):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.2", flag, value, "--out", str(out)])
    assert res.exit_code != 0
    assert res.output.startswith("chai-compile: error:") and flag in res.output and "fix:" in res.output
    assert "Traceback" not in res.output and not out.exists()
