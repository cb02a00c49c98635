"""The planner's objective: copy positions (n-gram repeats) and the distillation stage."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from chai_compile.cli import main
from chai_compile.plan.copy_weight import copy_positions, token_weights
from tests.conftest import STORIES


def test_copy_positions_mark_the_completion_of_a_repeated_4gram():
    ids = torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3, 4, 7], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    got = copy_positions(ids)
    assert got.shape == (2, 9)
    assert got[0].nonzero().flatten().tolist() == [7]  # predicting the second "4" after 1 2 3
    assert got[1].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]  # every 5555 after the first
    w = token_weights(ids, 3.0)
    assert w[0, 7].item() == 4.0 and w[0, 6].item() == 1.0


def test_bigram_repeats_are_not_copies():
    assert not copy_positions(torch.tensor([[1, 2, 8, 1, 2, 9]])).any()


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/data/models/stories260K missing")
@pytest.mark.parametrize("flag,value", [("--distill-steps", "-1"), ("--copy-weight", "-0.5")])
def test_negative_objective_settings_are_one_line_errors(tmp_path, flag, value):
    out = tmp_path / "p"
    res = CliRunner().invoke(main, ["plan", str(STORIES), "--kv-target", "0.2", flag, value, "--out", str(out)])
    assert res.exit_code != 0
    assert res.output.startswith("chai-compile: error:") and flag in res.output and "fix:" in res.output
    assert "Traceback" not in res.output and not out.exists()
