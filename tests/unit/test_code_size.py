"""Small files and short functions (STYLE.md 5), counted at 100 characters a line: a longer line counts as the lines
it would take wrapped. A file or function over its limit carries a one-line reason at its top: a comment
`# long: <why>` on the file's first lines, or on the line after the function's signature."""

import ast
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("cascade", "lightning_modules", "datamodules", "callbacks")
FILE_LINES, FUNCTION_LINES, WIDTH = 300, 60, 100
REASON = "# long:"


def counted(lines: list[str]) -> int:
    return sum(max(1, math.ceil(len(line.rstrip()) / WIDTH)) for line in lines)


def product_files() -> list[Path]:
    return [p for package in PRODUCT for p in sorted((ROOT / package).rglob("*.py"))]


def long_files() -> list[str]:
    found = []
    for path in product_files():
        lines = path.read_text().splitlines()
        if counted(lines) > FILE_LINES and not any(line.startswith(REASON) for line in lines[:5]):
            found.append(f"{path.relative_to(ROOT)}: {counted(lines)} lines")
    return found


def long_functions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = lines[node.lineno - 1 : node.end_lineno]
            first = node.body[0].lineno - 1  # the line after the signature
            if counted(body) > FUNCTION_LINES and not lines[first].strip().startswith(REASON):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {counted(body)} lines")
    return found


def test_no_file_over_300_lines():
    assert long_files() == []


def test_no_function_over_60_lines():
    assert [f for path in product_files() for f in long_functions(path)] == []


def test_the_count_wraps_long_lines():
    assert counted(["x" * 100, "x" * 101, "", "y" * 250]) == 1 + 2 + 1 + 3
