"""The fault table: a test that injects a fault says so with `@injects(fault, does, lost)`, and the list of faults in
docs/studies.md is generated from those decorators (`python tests/faults.py` prints it; test_faults checks the page
holds it). The decorators are read from the test files' source, so the list needs no test to run."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def injects(fault: str, does: str, lost: str):
    """Marks a test as the one that injects `fault`: what pqsweep `does`, and what is `lost`. Changes nothing else."""

    def mark(test):
        return test

    return mark


def rows() -> list[tuple[str, str, str, str]]:
    """(fault, what pqsweep does, what is lost, the test), in file order, from every @injects in tests/."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "injects":
                    fault, does, lost = (ast.literal_eval(arg) for arg in decorator.args)
                    found.append((fault, does, lost, f"{path.name}::{node.name}"))
    return found


def table() -> str:
    """One Markdown item a fault, wrapped at 120 columns (the docs' width: a table's rows could not be)."""
    lines = []
    for fault, does, lost, test in rows():
        lines += textwrap.wrap(f"**{fault}**: {does}. Lost: {lost}. `{test}`", 120, initial_indent="- ",
                               subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
