"""The packages depend on each other one way only, and no package's modules import in a circle.

    hvsock_tools -> guest_client, hvsock_common, hvsock    (the programs: CLI, bridge, testbed)
    host_service -> hvsock_common, ring, hvsock     guest_client -> hvsock_common, ring, hvsock
    hvsock_common   (nothing of ours but the generated code's absence: no grpc either)
    ring            (nothing of ours)

The guest library is what programs install in a VM; it must not drag the emulated host in (it
once imported host_service for addresses, errors, the worker pool and a settings helper), and
the host must not depend on its client; neither depends on the programs built on them. Read
from the source with ``ast``, so an import inside a function or under ``TYPE_CHECKING`` counts
too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.unit

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("ring", "hvsock_common", "host_service", "guest_client", "hvsock_tools")

#: Package -> packages of this project it must never import.
FORBIDDEN = {
    "guest_client": {"host_service", "hvsock_tools"},
    "host_service": {"guest_client", "hvsock_tools"},
    "hvsock_tools": {"host_service", "ring"},
    "hvsock_common": {"host_service", "guest_client", "hvsock_tools", "ring", "hvsock"},
    "ring": {"host_service", "guest_client", "hvsock_tools", "hvsock_common", "hvsock"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for package in PACKAGES:
        # ring._ring is compiled from .pyx, and cimports declarations from .pxd files; both are
        # modules of the package all the same (read with a regex below, not ast).
        for suffix in ("py", "pyx", "pxd"):
            for path in sorted((REPO / package).rglob(f"*.{suffix}")):
                found.setdefault(_module_name(path), path)
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(nodes: list[ast.stmt], *, module_level: bool, typing: bool) -> Iterator[ast.AST]:
    """Statements that import, in ``nodes`` and below (functions only when not module_level;
    ``if TYPE_CHECKING:`` blocks only when typing)."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            if typing:
                yield from _walk(node.body, module_level=module_level, typing=typing)
            yield from _walk(node.orelse, module_level=module_level, typing=typing)
        elif module_level and isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        ):
            # A class body runs at import time, a function body does not.
            if isinstance(node, ast.ClassDef):
                yield from _walk(node.body, module_level=module_level, typing=typing)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _walk(
                        [c for c in children if isinstance(c, ast.stmt | ast.excepthandler)],
                        module_level=module_level,
                        typing=typing,
                    )


#: Imports and cimports in Cython source, which ``ast`` cannot parse (its imports all run at
#: import time: ring/_ring.pyx has none in functions).
_PYX_IMPORT = re.compile(r"^(?:from\s+(\.*[\w.]*)\s+c?import\b|c?import\s+([\w.]+))", re.M)


def _pyx_imports(name: str, package: list[str]) -> set[str]:
    out = set()
    for source, plain in _PYX_IMPORT.findall(MODULES[name].read_text()):
        text = source or plain
        level = len(text) - len(text.lstrip("."))
        if level:
            text = ".".join([*package[: len(package) - (level - 1)], text[level:]]).rstrip(".")
        out.add(text)
    return out


def _imports(name: str, *, module_level: bool = False, typing: bool = True) -> set[str]:
    """Absolute names ``name`` imports (``from x import y`` gives ``x.y`` when that is a module
    of ours, else ``x``)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if path.suffix in (".pyx", ".pxd"):
        return _pyx_imports(name, package)
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in _walk(tree.body, module_level=module_level, typing=typing):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.add(full if full in MODULES else source)
    return out


def _ours(imported: str) -> str | None:
    """The module of this project an imported name resolves to (its longest known prefix)."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def _graph(*, module_level: bool, typing: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        targets = {_ours(i) for i in _imports(name, module_level=module_level, typing=typing)}
        # A submodule's package always runs first; an edge back to it is not a choice made.
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: set[frozenset[str]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.add(frozenset(group))
    return groups


def test_every_package_is_found() -> None:
    for package in PACKAGES:
        assert package in MODULES
    assert "ring._ring" in MODULES


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_one_way(package: str) -> None:
    wrong = []
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        for imported in _imports(name):
            if imported.split(".")[0] in FORBIDDEN[package]:
                wrong.append(f"{path.relative_to(REPO)}: {imported}")
    assert not wrong, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(
        wrong
    )


def test_shared_package_needs_no_transport() -> None:
    # What both sides speak does not depend on how they speak it; the pure core builds on it.
    for name in MODULES:
        if name.split(".")[0] == "hvsock_common":
            roots = {i.split(".")[0] for i in _imports(name)}
            assert not roots & {"grpc", "asyncio", "grpc_status"}, name


def test_no_import_cycle_at_module_level() -> None:
    assert _cycles(_graph(module_level=True, typing=False)) == set()


def test_no_import_cycle_even_through_deferred_imports() -> None:
    # An import inside a function is still a dependency: it only moves the cycle's failure
    # from import time to the first call.
    assert _cycles(_graph(module_level=False, typing=False)) == set()


def test_the_checks_see_what_they_look_for() -> None:
    # Guard against a vacuous pass: the parser resolves relative and deferred imports, and the
    # cycle finder finds a cycle.
    assert "guest_client._channel" in _imports("guest_client._socket")
    assert "guest_client._partition" in _imports("guest_client._socket")  # TYPE_CHECKING
    assert "guest_client._partition" not in _imports("guest_client._socket", typing=False)
    assert "hvsock_tools._api" in _imports("hvsock_tools.proxies")
    assert "hvsock_common.addresses" in _imports("host_service.core.router")
    assert {"ring._errors", "libc.errno"} <= _imports("ring._ring")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset({"a", "b", "c"})}


def test_core_purity_is_still_checked() -> None:
    # The core (and so the part of hvsock_common it imports) must load without grpc/asyncio;
    # that is proved by running it, in this test file:
    purity = REPO / "tests" / "integration" / "test_core_purity.py"
    assert "def test_core_imports_without_io_modules" in purity.read_text()
