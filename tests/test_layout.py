"""The house rules of the layout, read from the source with ``ast`` (imports under
``if TYPE_CHECKING:`` are for type checkers only and do not count):

- the contract (q8kv.v1, q8kv.wire, q8kv.format) imports nothing else of q8kv (wire may
  import v1), so both sides can use it;
- the client never imports the server, nor does q8kv.hf (the transformers backend, a client);
- the RPC layer talks to the engine only, never to the cache or the backends;
- backends import only the format and each other;
- only the app wires everything together, and nothing imports the app but the CLI entry;
- no import cycles between modules;
- no module outside the generated stubs is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Where each part of the q8kv package lives in the checkout.
ROOTS = {"q8kv": REPO / "proto" / "q8kv", "q8kv.server": REPO / "server",
         "q8kv.client": REPO / "client", "q8kv.hf": REPO / "hf"}
GENERATED = ("_pb2.py", "_pb2_grpc.py")
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            found[name] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """The q8kv modules ``name`` imports at run time, resolved to modules of MODULES."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # a submodule, or a name defined in ``base``
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in MODULES else base)
            visit(child)

    visit(tree)
    return {_owner(t) for t in targets if t.startswith("q8kv")} - {None, name}


def _owner(target: str) -> str | None:
    """The module of MODULES that ``target`` (a module or a name in one) refers to."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(where: str, forbidden) -> list[str]:
    return sorted(
        f"{src} imports {dst}"
        for src, dsts in GRAPH.items()
        if _in(src, where)
        for dst in dsts
        if forbidden(dst)
    )


def test_the_graph_is_read():
    """The rules below would pass vacuously on an empty graph."""
    assert "q8kv.server.app" in GRAPH and "q8kv.server.rpc.servicer" in GRAPH
    assert "q8kv.server.engine.operations" in GRAPH["q8kv.server.rpc.servicer"] or any(
        _in(dst, "q8kv.server.engine") for dst in GRAPH["q8kv.server.rpc.servicer"]
    )


@pytest.mark.parametrize("contract", ["q8kv.v1", "q8kv.wire", "q8kv.format"])
def test_the_contract_imports_nothing_else_of_q8kv(contract):
    allowed = ("q8kv.v1",) if contract == "q8kv.wire" else ()
    assert _violations(
        contract, lambda dst: not _in(dst, contract) and not any(_in(dst, a) for a in allowed)
    ) == []


def test_the_client_never_imports_the_server():
    assert _violations("q8kv.client", lambda dst: _in(dst, "q8kv.server")) == []


def test_the_hf_backend_never_imports_the_server():
    assert "q8kv.hf.cache" in GRAPH  # the rule below would pass vacuously without it
    assert _violations("q8kv.hf", lambda dst: _in(dst, "q8kv.server")) == []


def test_the_rpc_layer_talks_to_the_engine_only():
    forbidden = ("q8kv.server.cache", "q8kv.server.backends", "q8kv.server.persistence")
    assert _violations("q8kv.server.rpc", lambda dst: any(_in(dst, f) for f in forbidden)) == []


def test_backends_import_only_the_format_and_each_other():
    assert _violations(
        "q8kv.server.backends",
        lambda dst: not (_in(dst, "q8kv.server.backends") or _in(dst, "q8kv.format")),
    ) == []


def test_nothing_imports_the_app_but_its_entry_point():
    importers = {src for src, dsts in GRAPH.items() if "q8kv.server.app" in dsts}
    assert importers == {"q8kv.server.__main__"}


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_modules_stay_small():
    long = {
        name: n for name, path in MODULES.items()
        if not path.name.endswith(GENERATED)
        and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
