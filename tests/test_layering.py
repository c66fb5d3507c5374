"""
How ocppgw's modules may import each other: downward only, and only
public names.

Read from the source with L{ast} (nothing is imported), so an import
inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

import ocppgw

PACKAGE = Path(ocppgw.__file__).parent


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name, parsed."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return modules


def _imports(tree: ast.Module, modules) -> tuple[set[str], list[tuple[str, str]]]:
    """
    The ocppgw modules C{tree} imports, and the (module, name) pairs of
    the private names it takes from them (C{from m import _x}, or
    C{m._x} on a module it imported).
    """
    imported: set[str] = set()
    private: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module.split(".")[0] == "ocppgw"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    imported.add(full)
                    aliases[alias.asname or alias.name] = full
                else:
                    imported.add(node.module)
                    if alias.name.startswith("_"):
                        private.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ocppgw":
                    imported.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            private.append((aliases[node.value.id], node.attr))
    return imported, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class LayeringTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.modules = _modules()
        self.graph = {}
        self.private = {}
        for name, tree in self.modules.items():
            imported, private = _imports(tree, self.modules)
            self.graph[name] = {m for m in imported if m in self.modules and m != name}
            if private:
                self.private[name] = private

    def test_found_the_package(self):
        """The checks below read the whole package."""
        self.assertIn("ocppgw.gateway", self.modules)
        self.assertIn("ocppgw.amqp.bridge", self.modules)
        self.assertIn("ocppgw.amqp.bridge", self.graph["ocppgw.amqp"])

    def test_no_import_cycle(self):
        """No module imports, directly or not, a module that imports it."""
        self.assertEqual(_cycles(self.graph), [])

    def test_detects_a_cycle(self):
        self.assertEqual(
            _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]]
        )

    def test_no_private_imports(self):
        """No module takes another module's underscore names."""
        self.assertEqual(self.private, {})

    def test_detects_private_imports(self):
        tree = ast.parse(
            "from ocppgw.amqp.wire import _ACK\n"
            "from ocppgw import framing\n"
            "framing._valid_id\n"
        )
        _imported, private = _imports(tree, self.modules)
        self.assertEqual(
            private, [("ocppgw.amqp.wire", "_ACK"), ("ocppgw.framing", "_valid_id")]
        )

    def test_pure_layers(self):
        """
        The framing, the per-charger session and the names of the wire
        import nothing of the edge or the AMQP layer.
        """
        below = {"ocppgw.framing", "ocppgw.session", "ocppgw.topology", "ocppgw.outcome",
                 "ocppgw.closecodes"}
        for name in below:
            reached = self._reachable(name)
            self.assertFalse(
                {m for m in reached if m == "ocppgw.edge" or m.startswith("ocppgw.amqp")},
                name,
            )

    def _reachable(self, start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in self.graph[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen
