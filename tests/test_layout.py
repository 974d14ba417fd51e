"""The library's shape, as the README's Layout section describes it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "hipseg_lib"


def _layout_order() -> list[str]:
    """Module names in the order of the README's Layout table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    order = []
    for row in re.findall(r"^\| (`hipseg_lib/.*?) \|", section, flags=re.M):
        order += [Path(m).stem for m in re.findall(r"`([^`]+\.py)`", row)]
    return order


def _imports(path: Path) -> set[str]:
    """hipseg_lib modules that ``path`` imports, at any level (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names if (LIB / f"{a.name}.py").exists())
    return found


def test_every_module_is_in_the_readme_layout():
    order = _layout_order()
    modules = {p.stem for p in LIB.glob("*.py")} - {"__main__"}
    assert modules <= set(order), f"missing from the README's Layout: {sorted(modules - set(order))}"


def test_modules_import_only_those_above_them_in_the_layout():
    order = _layout_order()
    rank = {m: i for i, m in enumerate(order)}
    wrong = []
    for path in sorted(LIB.glob("*.py")):
        if path.stem in ("__main__", "cli"):
            continue
        below = sorted(m for m in _imports(path) if m in rank and rank[m] > rank[path.stem])
        if below:
            wrong.append(f"{path.name} imports {below}")
    assert not wrong, f"modules importing those listed below them in the README's Layout: {wrong}"


def test_no_function_runs_over_80_lines():
    long = []
    for path in LIB.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long


def test_docstring_examples_run():
    import doctest
    import importlib
    import pkgutil

    import numpy as np
    import torch

    import hipseg_lib

    failed = []
    for info in pkgutil.iter_modules(hipseg_lib.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"hipseg_lib.{info.name}")
        result = doctest.testmod(module, extraglobs={"torch": torch, "np": np}, report=False)
        if result.failed:
            failed.append(info.name)
    assert not failed, f"docstring examples fail in {failed} (python -m doctest -v to see them)"
