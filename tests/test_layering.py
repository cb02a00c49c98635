"""The pipeline's import directions: a stage may import earlier stages, never a later one.

    base -> model description, plan format, layout -> profile -> plan -> kernels (math, op contract)
         -> rewrite -> export/runtime -> verify -> cli

Every module of the package must be placed in a stage here; a new module without one fails the test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "chai_compile"
# first component of the module path under chai_compile -> stage rank
STAGES = {
    **dict.fromkeys(["chai_compile", "errors", "choices", "compat", "fileio", "cli_parse", "loading",
                      "device_map", "placement_options"], 0),
    **dict.fromkeys(["adapters", "mapping", "mapping_schema", "fingerprint", "layout"], 1),
    "profile": 2,
    "plan": 3,
    "kernels": 4,
    "rewrite": 5,
    **dict.fromkeys(["export", "runtime"], 6),
    "verify": 7,
    **dict.fromkeys(["cli", "__main__"], 8),
}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chai_compile"):
            if node.module == "chai_compile":
                found |= {f"chai_compile.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chai_compile")}
    return found


def test_every_import_points_to_the_same_or_an_earlier_stage():
    violations, unplaced = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = _component(module)
        if own not in STAGES:
            unplaced.append(module)
            continue
        for target in _imports(ast.parse(path.read_text())):
            other = _component(target)
            if other == "__version__":
                continue
            if other not in STAGES:
                unplaced.append(target)
            elif STAGES[other] > STAGES[own]:
                violations.append(f"{module} (stage {STAGES[own]}) imports {target} (stage {STAGES[other]})")
    assert not unplaced, f"modules without a stage in tests/test_layering.py: {sorted(set(unplaced))}"
    assert not violations, "\n".join(violations)


def test_the_check_sees_a_backward_import():
    tree = ast.parse("def f():\n    from chai_compile.verify.compare import evaluate\n")
    assert {_component(t) for t in _imports(tree)} == {"verify"}
    assert STAGES["verify"] > STAGES["export"]


def test_running_a_fused_graph_does_not_import_the_rewrite(tmp_path):
    """ONNX Runtime on a fused graph (its contract and the Python reference op) stays on the runtime side:
    neither the rewrite nor the exporter is imported, in a fresh interpreter."""
    pytest.importorskip("onnxruntime_extensions")
    code = """
import sys
import onnx
from onnx import helper as h, TensorProto as T
from chai_compile.kernels import fused_op
from chai_compile.export.ort_runner import _session
attrs = fused_op.node_attributes(num_heads=2, cluster_offsets=[0, 2], k_head_index=[0], v_head_index=[0, 0],
                                 num_k_heads=1, num_v_heads=1, head_dim=4, scale=0.5)
ins = [h.make_tensor_value_info(n, T.INT32 if n == "attention_mask" else T.FLOAT, None) for n in fused_op.INPUTS]
outs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in fused_op.OUTPUTS]
node = h.make_node(fused_op.OP_TYPE, list(fused_op.INPUTS), list(fused_op.OUTPUTS), domain=fused_op.DOMAIN, **attrs)
graph = h.make_graph([node], "g", ins, outs)
onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(fused_op.DOMAIN, 1)]), sys.argv[1])
session, runner = _session(__import__("pathlib").Path(sys.argv[1]), None, 1, None, "python")
assert runner == "python-reference", runner
import numpy as np
r = np.random.default_rng(0).standard_normal
feeds = {"query": r((1, 1, 3, 4)), "key": r((1, 1, 3, 4)), "value": r((1, 1, 3, 4)), "past_key": r((1, 1, 0, 4)),
         "past_value": r((1, 1, 0, 4))}
feeds = {k: v.astype(np.float32) for k, v in feeds.items()} | {"attention_mask": np.ones((1, 3), np.int32)}
assert session.run(None, feeds)[0].shape == (1, 3, 8)
print(sorted(m for m in sys.modules if m.startswith(("chai_compile.rewrite", "chai_compile.export.fused",
                                                      "chai_compile.export.onnx_export"))))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "node.onnx")], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
