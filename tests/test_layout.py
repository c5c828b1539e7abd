"""The module structure of the installed packages: no import cycles between modules (counting
imports made only for type checking and imports inside functions), and the client SDK never
depends on the server.

The graph is read from the source with ``ast``, so nothing is imported and a cycle hidden behind
``if TYPE_CHECKING:`` or a function-level import counts like any other.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The folders that install as the medverse namespace, with their import names.
PACKAGES = {
    "server": "medverse.server",
    "protocol": "medverse.protocol",
    "client_sdk": "medverse.client_sdk",
    "rtc": "medverse.rtc",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module's import name, its file and whether it is a package's ``__init__``."""
    mods: dict[str, tuple[Path, bool]] = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = (path, is_pkg)
    return mods


def _known(name: str, mods: dict[str, tuple[Path, bool]]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, is_pkg: bool) -> list[str]:
    """Every name ``module`` imports, absolute, wherever the import statement stands."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                if not is_pkg:
                    parts = parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            # (resolved to the longest known prefix by the caller).
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_pkg) in mods.items():
        for name in _imports(module, path, is_pkg):
            if not name.startswith("medverse."):
                continue
            target = _known(name, mods)
            if target is not None and target != module:
                edges[module].add(target)
    return edges


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the graph's depth would do recursively, but need not)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in edges:
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                found.append(comp)
    return found


def test_the_graph_is_read() -> None:
    """The reader finds the modules and the imports between them (guards the tests below
    against passing on an empty graph)."""
    edges = _graph()
    assert "medverse.server.app" in edges
    assert "medverse.server.admin" in edges["medverse.server.app"]
    assert "medverse.protocol.messages" in edges["medverse.client_sdk.session"]


def test_cycles_are_found() -> None:
    """The cycle finder reports a cycle through several modules, and only it."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert sorted(map(sorted, _strongly_connected(edges))) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or through others, even only for type
    checking: each module can be read (and replaced) without the ones that use it."""
    cycles = [sorted(c) for c in _strongly_connected(_graph()) if len(c) > 1]
    assert cycles == []


def test_client_sdk_does_not_import_the_server() -> None:
    """The client SDK installs and runs without the server: it speaks only the protocol."""
    edges = _graph()
    wrong = {
        (module, target)
        for module, targets in edges.items()
        if module.startswith("medverse.client_sdk")
        for target in targets
        if target.startswith("medverse.server")
    }
    assert wrong == set()


def test_protocol_imports_only_itself() -> None:
    """The protocol is the base everything else builds on: it imports none of the others."""
    edges = _graph()
    wrong = {
        (module, target)
        for module, targets in edges.items()
        if module.startswith("medverse.protocol")
        for target in targets
        if not target.startswith("medverse.protocol")
    }
    assert wrong == set()


def test_sdk_events_that_are_protocol_messages_are_those_classes() -> None:
    """An SDK event carrying exactly a protocol message's fields is that message, under its SDK
    name, and tells its kind by ``type`` as every SDK event does."""
    from medverse import client_sdk
    from medverse.protocol import clinic, messages
    from medverse.protocol.catalog import SERVER_MESSAGES

    assert client_sdk.Joined is messages.Joined and client_sdk.Left is messages.Left
    assert client_sdk.Waiting is messages.Waiting and client_sdk.Called is clinic.Called
    assert client_sdk.ErrorEvent is messages.Error
    assert client_sdk.MemberStateChanged is messages.MemberState
    assert client_sdk.Joined(3, "Ana").type == "joined"
    assert client_sdk.ErrorEvent("forbidden", "no", False).type == "error"
    assert client_sdk.Reconnecting(1, 0.5).type == "reconnecting"  # the SDK's own events too
    for name, cls in SERVER_MESSAGES.items():
        assert cls.TYPE == name and "type" not in {f.name for f in dataclasses.fields(cls)}
