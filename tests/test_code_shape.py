"""The code stays readable: no function in the product packages over 80 lines, and the search's
entry point short (it only dispatches to search/cli.py)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("biometry", "trainables", "search")
MAX_FUNCTION_LINES = 80


def long_functions() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                                     f"({length} lines)")
    return found


def test_no_function_is_over_80_lines():
    assert long_functions() == []


def test_the_search_entry_point_is_short():
    assert len((REPO / "search" / "run.py").read_text().splitlines()) < 400
