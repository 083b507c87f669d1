"""The shape of the code: the library knows nothing of the experiments, and no module imports
itself through others (an import cycle makes the order of imports matter, and a change in one
module break another)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    modules = {}
    for package in ("gradtools", "experiments"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules) -> set[str]:
    """The project's modules ``path`` imports when it runs (imports inside functions count;
    those under ``if TYPE_CHECKING:`` do not)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found |= submodules or ({node.module} & set(modules))
    return found


def test_the_library_never_imports_the_experiments():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("gradtools"):
            assert not {m for m in _imports(path, modules) if m.startswith("experiments")}, name


def test_no_module_imports_itself_through_others():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    for start in graph:
        seen, frontier = set(), list(graph[start])
        while frontier:
            name = frontier.pop()
            if name == start:
                raise AssertionError(f"{start} imports itself through {sorted(seen)}")
            if name not in seen:
                seen.add(name)
                frontier += graph.get(name, ())


#: The modules that start a process (commands and worker processes): the only ones that may
#: change settings of the whole process (gradtools.tf_startup).
ENTRY_POINTS = {"gradtools.__main__", "experiments.__main__", "experiments.cli", "experiments.worker",
                "experiments.bench"}


def test_only_entry_points_change_settings_of_the_whole_process():
    modules = _modules()
    users = {name for name, path in modules.items() if "gradtools.tf_startup" in _imports(path, modules)}
    assert users <= ENTRY_POINTS, users - ENTRY_POINTS


#: The longest a library function may be, in lines of code (its docstring not counted): one
#: that does not fit on a screen is read in pieces, and changed in one of them.
LONGEST_FUNCTION = 60


def _code_lines(function: ast.FunctionDef) -> int:
    lines = function.end_lineno - function.lineno + 1
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > LONGEST_FUNCTION:
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, long
