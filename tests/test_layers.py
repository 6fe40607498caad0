"""The import graph of the ``ponder`` package: the engine layer imports nothing above it, and no modules import each
other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import ponder

ROOT = Path(ponder.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ponder modules ``node`` (in module ``name``) imports: ``from pkg import mod`` names the module ``pkg.mod``
    when there is one, else ``pkg``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "ponder"]
    if node.level:
        package = name if _is_package(name) else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base.split(".")[0] != "ponder":
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def _imports(name: str, *, top_level: bool) -> set[str]:
    """What module ``name`` imports from ponder: everywhere in it, or only when it is imported (its top-level
    statements, leaving out ``if TYPE_CHECKING:`` blocks, which never run)."""
    tree = ast.parse(MODULES[name].read_text())
    if not top_level:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        nodes, todo = [], list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo += node.body + node.orelse
            elif isinstance(node, ast.Try):
                todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return {module for node in nodes for module in _imported(name, node)}


def test_the_engine_layer_imports_nothing_of_ponder_above_it():
    engine = [name for name in MODULES if name == "ponder.engine" or name.startswith("ponder.engine.")]
    assert "ponder.engine.base" in engine  # the modules were found
    upward = {name: sorted(m for m in _imports(name, top_level=False)
                           if m != "ponder.engine" and not m.startswith("ponder.engine."))
              for name in engine}
    assert {name: found for name, found in upward.items() if found} == {}


def test_no_modules_import_each_other_in_a_circle():
    graph = {name: _imports(name, top_level=True) - {name} for name in MODULES}
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
