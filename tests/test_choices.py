"""Option enums (chai_compile/choices.py): one dtype spelling in files and reports, both accepted on input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chai_compile.choices import DTYPE_SPELLINGS, AttentionForm, DType, ExportFormat, KVCacheMode, Membership
from chai_compile.export.cli import export
from chai_compile.plan.cli import plan
from chai_compile.profile.cli import profile
from chai_compile.verify.cli import sweep, verify
from tests.conftest import REPO


@pytest.mark.parametrize(("spelling", "member"), [
    ("float32", DType.FLOAT32), ("fp32", DType.FLOAT32), ("float16", DType.FLOAT16), ("fp16", DType.FLOAT16),
    ("bfloat16", DType.BFLOAT16), ("bf16", DType.BFLOAT16),
])
def test_both_dtype_spellings_parse_to_the_long_one(spelling, member):
    assert DType.parse(spelling) is member and str(member) == member.value
    assert set(DTYPE_SPELLINGS) >= {spelling}


def test_unknown_values_name_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown dtype 'int3' \\(one of float32, float16, bfloat16\\)"):
        DType.parse("int3")
    with pytest.raises(ValueError, match="--attention"):
        AttentionForm.parse("flash", "--attention")


@pytest.mark.parametrize("command, args", [
    (profile, ["m", "--out", "o"]),
    (plan, ["m", "--out", "o", "--kv-target", "0.2"]),
    (verify, ["m"]),
    (sweep, ["m", "--out", "o"]),
    (export, ["m", "--out", "o"]),
])
@pytest.mark.parametrize("spelling", ["float16", "fp16"])
def test_every_command_accepts_both_dtype_spellings(command, args, spelling):
    ctx = command.make_context(command.name, [*args, "--dtype", spelling])
    assert ctx.params["dtype"] is DType.FLOAT16  # what the command and its reports see


def test_export_options_arrive_as_members():
    ctx = export.make_context("export", ["m", "--out", "o", "--format", "tensorrt", "--attention", "fused",
                                         "--kv-cache", "inplace"])
    assert ctx.params["fmt"] is ExportFormat.TENSORRT and ctx.params["attention"] is AttentionForm.FUSED
    assert ctx.params["kv_cache"] is KVCacheMode.INPLACE and ctx.params["dtype"] is DType.FLOAT32
    assert verify.make_context("verify", ["m", "--membership", "dynamic"]).params["membership"] is Membership.DYNAMIC


def test_choices_imports_no_heavy_library():
    code = "import sys, chai_compile.choices; print(sorted({'torch', 'numpy', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
