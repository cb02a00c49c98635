"""The pipeline's import directions: a stage may import earlier stages, never a later one.

    base -> model description -> profile -> plan -> kernels -> rewrite -> export/runtime -> verify -> cli

Every module of the package must be placed in a stage here; a new module without one fails the test.
"""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGE = REPO / "chai_compile"
# first component of the module path under chai_compile -> stage rank
STAGES = {
    **dict.fromkeys(["chai_compile", "errors", "choices", "compat", "fileio", "cli_parse", "loading",
                      "device_map", "placement_options"], 0),
    **dict.fromkeys(["adapters", "mapping", "mapping_schema", "fingerprint"], 1),
    "profile": 2,
    "plan": 3,
    **dict.fromkeys(["kernels", "fused_op"], 4),
    "rewrite": 5,
    **dict.fromkeys(["export", "export_tensorrt", "runtime"], 6),
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
