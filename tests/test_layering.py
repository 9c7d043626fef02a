"""The import layering: spec on the ground floor; cost_models on spec; planner on both; the
runtime on spec only; calibrate (measures with the runtime, fits with the planner), report (draws
the planner's sweeps) and the CLI on top. Every import counts, function-local ones too, and only the CLI imports lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import moeplan

ROOT = Path(moeplan.__file__).parent

ALLOWED = {
    "spec": {"spec"},
    "cost_models": {"spec", "cost_models"},
    "planner": {"spec", "cost_models", "planner"},
    "runtime": {"spec", "runtime"},
    "calibrate": {"spec", "cost_models", "planner", "runtime", "calibrate"},
    "report": {"spec", "cost_models", "planner", "report"},
    "cli": {"spec", "cost_models", "planner", "runtime", "calibrate", "report", "cli"},
}
# Lazy on purpose: the CLI keeps torch out of `moeplan search`; Triton is optional.
LAZY_OK = {"cli", "runtime/kernels/__init__.py"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) > 1:
            yield rel, ast.parse(path.read_text())


def _imports(tree: ast.Module, package: str):
    """(imported moeplan module, is it at module level) for every import in the file."""
    top = set()
    for node in tree.body:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)) and not isinstance(
                    node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {package}"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("moeplan"):
                yield name, id(node) in top


def test_no_import_climbs_a_floor():
    climbs = []
    for rel, tree in _modules():
        floor = rel.parts[0]
        for name, _ in _imports(tree, floor):
            parts = name.split(".")
            if len(parts) == 1:
                continue  # the package itself: __version__
            if parts[1] not in ALLOWED[floor]:
                climbs.append(f"{rel}: {name}")
    assert not climbs, climbs


def test_only_the_cli_imports_lazily():
    lazy = []
    for rel, tree in _modules():
        if rel.parts[0] in LAZY_OK or str(rel) in LAZY_OK:
            continue
        lazy += [f"{rel}: {name}" for name, at_top in _imports(tree, rel.parts[0]) if not at_top]
    assert not lazy, lazy


def test_the_floors_are_the_packages():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


def test_the_rules_catch_a_climb(tmp_path):
    tree = ast.parse("from moeplan.planner.search import search\n")
    assert [n for n, _ in _imports(tree, "runtime")] == ["moeplan.planner.search"]
    tree = ast.parse("def f():\n    from moeplan.spec.plan import Plan\n")
    assert list(_imports(tree, "spec")) == [("moeplan.spec.plan", False)]
