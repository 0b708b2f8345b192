"""The shape of capcli/ itself (issue 23): no function over 80 lines, no module over 500 lines, no import circle.

Each test lists every offender, not only the first, so one run says all that is left to do.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "capcli"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _longest_functions():  # noqa: ANN202
    """scripts/longest_functions.py, the one way of measuring a function (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("longest_functions", ROOT / "scripts" / "longest_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_function_longer_than_80_lines():
    lengths = _longest_functions().function_lengths(PACKAGE)
    assert lengths, "no function found under capcli/: the measure is broken"
    too_long = [f"{n:5d}  {where}" for n, where in lengths if n > MAX_FUNCTION_LINES]
    assert not too_long, (f"{len(too_long)} function(s) in capcli/ longer than {MAX_FUNCTION_LINES} lines:\n"
                          + "\n".join(too_long))


def test_no_module_longer_than_500_lines():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
             for path in sorted(PACKAGE.rglob("*.py"))}
    assert len(sizes) > 10, f"only {len(sizes)} modules found under {PACKAGE}"
    too_long = [f"{n:5d}  {rel}" for rel, n in sorted(sizes.items(), key=lambda t: -t[1]) if n > MAX_FILE_LINES]
    assert not too_long, (f"{len(too_long)} file(s) in capcli/ longer than {MAX_FILE_LINES} lines:\n"
                          + "\n".join(too_long))


# ---- import circles ------------------------------------------------------------------------------------


def _module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module and package under ``package`` (``capcli.train`` is its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> set[str]:
    """The capcli modules that ``module`` imports anywhere (top level, in functions, relative or absolute).

    ``import a.b.c`` and ``from a.b import c`` run the packages on the way too, so each of those counts; ``from
    PKG import NAME`` counts NAME when it is a module. A module's own enclosing packages are left out: Python has
    run them before the module (``from . import __version__``, a registry in ``models/__init__.py``), so
    depending on them closes no circle that could fail.
    """
    here = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bases, names = [alias.name for alias in node.names], []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases, names = [base], [alias.name for alias in node.names]
        else:
            continue
        for base in bases:
            parts = base.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            targets.update(f"{base}.{name}" for name in names)
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return (targets & known) - ancestors - {module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (see :func:`_imported`)."""
    files = _module_names(package)
    known = set(files)
    return {name: _imported(name, path.name == "__init__.py", ast.parse(path.read_text(), filename=str(path)), known)
            for name, path in files.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, round a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth <= the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def _one_round(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group: a circle to read."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    return group  # not reached: a strongly connected group always leads back


def test_import_circle_finder_on_a_made_up_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert import_circles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert _one_round(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_import_graph_reads_relative_absolute_and_local_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from .a import A\n    return A\n")
    (pkg / "a.py").write_text("from . import __version__\nfrom .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub", "pkg.sub.b"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.c"}, "pkg.c": {"pkg.sub", "pkg.sub.b"}}
    assert import_circles(graph) == [["pkg.c", "pkg.sub.b"]]


def test_no_import_circle():
    graph = import_graph()
    assert "capcli.layout" in graph["capcli.prepare"], "the import graph misses a plain relative import"
    circles = import_circles(graph)
    described = [f"{', '.join(group)}  (e.g. {' -> '.join(_one_round(graph, group))})" for group in circles]
    assert not circles, f"{len(circles)} import circle(s) among capcli's modules:\n" + "\n".join(described)
