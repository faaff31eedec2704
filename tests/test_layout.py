"""The package's layering: no import cycle among napo_kernels modules and no private name
(``_x``) imported from another module.

Every module is parsed with ``ast`` (nothing is imported), so the check sees the imports inside
functions too: a late import that only hides a cycle from the interpreter still counts. Imports
under ``if TYPE_CHECKING:`` never run, so they are left out of the cycle graph (the usual way to
annotate with a type from a module above), but the private-name rule still applies to them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napo_kernels"


@dataclass
class Module:
    name: str
    path: Path
    where: str  # the path from the package's parent directory, for messages
    is_package: bool
    edges: dict[str, int] = field(default_factory=dict)  # imported module -> line of its first import
    private: list[str] = field(default_factory=list)  # "file:line: from x import _y"


def discover(root: Path) -> dict[str, Module]:
    """Every ``.py`` file under the package directory ``root``, by dotted module name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        where = str(path.relative_to(root.parent))
        modules[".".join(parts)] = Module(".".join(parts), path, where, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, at any depth, with whether it runs (False under TYPE_CHECKING)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, runs: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, runs))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runs)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, runs)

    visit(tree, True)
    return found


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The dotted name a (possibly relative) ``from ... import`` refers to."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def build_graph(root: Path) -> dict[str, Module]:
    """The modules under ``root`` with their import edges among themselves and their private imports."""
    modules = discover(root)
    top = root.name
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))

        def edge(target: str, line: int, runs: bool, module: Module = module) -> None:
            if runs and target in modules and target != module.name:
                module.edges.setdefault(target, line)

        for node, runs in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edge(alias.name, node.lineno, runs)
                continue
            base = _absolute(module, node)
            if base != top and not base.startswith(top + "."):
                continue  # another distribution's module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:  # `from pkg import submodule`: a module, not a name of pkg's
                    edge(submodule, node.lineno, runs)
                    continue
                edge(base, node.lineno, runs)  # a name (or *) read from base's namespace
                if _is_private(alias.name) and base != module.name:
                    module.private.append(f"{module.where}:{node.lineno}: from {base} import {alias.name}")
    return modules


def find_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in modules[name].edges:
            if target not in index:
                connect(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(modules):
        if name not in index:
            connect(name)
    return [_cycle_through(modules, group) for group in groups]


def _cycle_through(modules: dict[str, Module], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for name in frontier:
            for target in sorted(modules[name].edges):
                if target == start:
                    return paths[name] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[name] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is not a cycle")  # unreachable for a strongly connected group


def describe(modules: dict[str, Module], cycle: list[str]) -> str:
    steps = [f"  {a} -> {b}  ({modules[a].where}:{modules[a].edges[b]})" for a, b in zip(cycle, cycle[1:])]
    return "\n".join(steps)


def test_no_import_cycle_among_package_modules():
    modules = build_graph(PACKAGE)
    cycles = find_cycles(modules)
    assert not cycles, "import cycles (module-level and function-level imports):\n" + "\n\n".join(
        describe(modules, cycle) for cycle in cycles
    )


def test_no_private_name_imported_from_another_module():
    private = [line for module in build_graph(PACKAGE).values() for line in module.private]
    assert not private, (
        "private names imported across modules (make them public or move them):\n" + "\n".join(private)
    )


# -- the checker itself, on small packages written here ---------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import f\n",
            "a.py": "from .b import g\n\ndef f():\n    return g()\n",
            "b.py": "def g():\n    from .a import f\n    return f\n",
            "c.py": "from . import a, b\n",  # imports both, in no cycle
        },
    )
    modules = build_graph(root)
    assert find_cycles(modules) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe(modules, ["pkg.a", "pkg.b", "pkg.a"]).splitlines()[1].endswith("(pkg/b.py:2)")


def test_checker_resolves_relative_and_absolute_imports_in_subpackages(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "core.py": "import pkg.sub.leaf\n",
            "sub/__init__.py": "from . import leaf\nfrom .leaf import VALUE\n",
            "sub/leaf.py": "from ..core import thing\n",
        },
    )
    modules = build_graph(root)
    assert modules["pkg.sub"].edges.keys() == {"pkg.sub.leaf"}
    assert modules["pkg.sub.leaf"].edges.keys() == {"pkg.core"}
    assert find_cycles(modules) == [["pkg.core", "pkg.sub.leaf", "pkg.core"]]


def test_checker_skips_type_checking_imports_for_cycles_only(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import B\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import _A\nB = 1\n",
        },
    )
    modules = build_graph(root)
    assert find_cycles(modules) == []
    assert modules["pkg.b"].private == ["pkg/b.py:3: from pkg.a import _A"]


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("from .a import _helper", True),
        ("from pkg.a import _helper as helper", True),
        ("from . import _private_module_name", True),
        ("from .a import public, __version__", False),
        ("from torch.nn.functional import _canonical_mask", False),  # another distribution's business
    ],
)
def test_checker_flags_private_names_from_other_modules(tmp_path, line, flagged):
    root = _package(
        tmp_path,
        {"__init__.py": "", "a.py": "__version__ = '0'\npublic = _helper = 1\n", "b.py": line + "\n"},
    )
    assert bool(build_graph(root)["pkg.b"].private) == flagged
