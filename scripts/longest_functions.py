"""Report the longest functions in capcli/ (lines from ``def`` to the last line of the body, decorators excluded).

    python scripts/longest_functions.py [--top N] [--under PATH_PREFIX] [--max LINES]

With ``--max`` the exit status is 1 when a reported function is longer (a check for CI or a test).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def function_lengths(package: Path = ROOT / "capcli") -> list[tuple[int, str]]:
    """(lines, "path:line qualified.name") of every function and method under ``package``, longest first."""
    found: list[tuple[int, str]] = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(package.parent).as_posix()

        def visit(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}{child.name}"
                    found.append((child.end_lineno - child.lineno + 1, f"{rel}:{child.lineno} {name}"))
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

        visit(tree, "")
    return sorted(found, key=lambda t: -t[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=15, help="how many to list (default 15)")
    ap.add_argument("--under", default="capcli/", help="only files whose path starts with this (default capcli/)")
    ap.add_argument("--max", type=int, default=None, help="exit 1 when a listed function is longer than this")
    args = ap.parse_args(argv)
    rows = [(n, where) for n, where in function_lengths() if where.startswith(args.under)][: args.top]
    for n, where in rows:
        print(f"{n:5d}  {where}")
    return 1 if args.max is not None and rows and rows[0][0] > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
