"""No function of kiln's code over 60 lines without a reason stated in it.

A function's length is its own code lines: not its docstring, blank lines, comment-only lines,
nor the functions and classes defined inside it (each is measured on its own). A longer function
states why in a comment starting `# Over 60 lines:`. The generated sync SDK files are measured
through their async source. Tests are not measured.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kiln", "build", "backends", "clients", "models", "benchmarks", "loadtests", "scripts", "deploy")
LIMIT = 60
REASON = "# Over 60 lines:"


def own_code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """`function`'s code lines, as the module docstring counts them."""
    skip: set[int] = set()
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    for node in ast.walk(function):
        if node is not function and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            skip.update(range(first, (node.end_lineno or node.lineno) + 1))
    end = function.end_lineno or function.lineno
    return sum(
        1
        for number in range(function.lineno, end + 1)
        if number not in skip and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """`path:line name (N lines)` of each function over LIMIT lines that states no reason."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = own_code_lines(node, lines)
            body = lines[node.lineno - 1 : node.end_lineno]
            if count > LIMIT and not any(line.strip().startswith(REASON) for line in body):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({count} lines)")
    return found


def sources() -> list[Path]:
    paths = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.startswith("_sync_") or "__pycache__" in path.parts:
                continue
            paths.append(path)
    return paths


def test_the_measure_counts_code_not_docstrings_comments_or_nested_functions() -> None:
    source = '''
def outer():
    """Doc.

    More doc.
    """
    # a comment
    a = 1

    def inner():
        b = 2
        return b
    return a
'''
    (function,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert own_code_lines(function, source.splitlines()) == 3  # def, a = 1, return a


def test_a_long_function_is_found_unless_it_states_why(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))  # with the def line: LIMIT + 1
    path = tmp_path / "long.py"
    path.write_text(f"def long():\n{body}\n")
    assert long_functions(path, tmp_path) == [f"long.py:1 long ({LIMIT + 1} lines)"]
    path.write_text(f"def long():\n    {REASON} one table, a row a line.\n{body}\n")
    assert long_functions(path, tmp_path) == []
    path.write_text("def short():\n" + "\n".join(f"    x{i} = {i}" for i in range(LIMIT - 1)) + "\n")
    assert long_functions(path, tmp_path) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_60_lines_without_a_reason(package: str) -> None:
    found = [f for path in sources() if path.is_relative_to(ROOT / package) for f in long_functions(path)]
    assert not found, (
        f"functions over {LIMIT} code lines with no `{REASON} <why>` comment in them: split them "
        "into stages, or state the reason:\n  " + "\n  ".join(found)
    )
