"""The shape of the code's dependencies (ARCHITECTURE.md): no import cycle between packages or
between modules, no role package importing a sibling role's, and the router importing only
``protos`` besides itself (one known exception).

The graph is read from the source (every ``import`` in a module, function-local ones too), so
an import hidden inside a function to dodge a cycle counts as the cycle it is. Imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Set
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "engine", "kv_transfer", "protos", "worker", "prefill_worker", "decode_worker", "router",
    "cluster", "bench",
)  # fmt: skip
ROLE_PACKAGES = ("prefill_worker", "decode_worker")
# The router may import these besides router and protos; each is a debt named in
# ARCHITECTURE.md ("Known exceptions").
ROUTER_EXCEPTIONS = frozenset({"engine.tokenizer"})

# Cycles that stand for now, each through a backend chosen by name and imported only when
# chosen (DESIGN.md): the factory lives beside the interface its backends implement. The way
# out is the factory in a module of its own. engine/ belongs to the GPU issues; a cycle listed
# here that is gone fails the test, so the list only shrinks.
KNOWN_CYCLES = frozenset(
    {
        ("engine.layers.attention", "engine.layers.triton_attention"),
        ("kv_transfer.cuda_ipc", "kv_transfer.transfer_engine"),
    }
)

Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: Set[str]) -> Iterator[str]:
    """The project modules an import statement imports: ``from a import b`` imports the
    module ``a.b`` when there is one, else a name of ``a``."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, up level - 1 more
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            yield sub if sub in modules else target


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, function bodies included, but not the body of ``if TYPE_CHECKING:``: a
    type checker's import runs never, so it makes no cycle."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking(node):
            assert isinstance(node, ast.If)
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph() -> Graph:
    """Module -> the project modules it imports, for every module of ``PACKAGES``."""
    files = {
        _module_name(f): f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))
    }
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {
            name
            for node in _run_time_nodes(tree)
            for name in _imported(node, module, path.name == "__init__.py", files.keys())
            if name in files and name != module
        }
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        color[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = BLACK
                stack.pop()
            elif color.get(nxt, BLACK) == GREY:
                return [*path[path.index(nxt) :], nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def package_graph(graph: Graph) -> Graph:
    packages: Graph = {p: set() for p in PACKAGES}
    for module, targets in graph.items():
        for target in targets:
            a, b = module.split(".")[0], target.split(".")[0]
            if a != b:
                packages[a].add(b)
    return packages


def _format(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    for known in KNOWN_CYCLES:
        a, b = known
        assert b in graph[a] and a in graph[b], f"{known} is no longer a cycle: drop it"
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between modules: {_format(cycle or [])}"


def test_no_import_cycle_between_packages() -> None:
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, f"import cycle between packages: {_format(cycle or [])}"


def test_no_role_package_imports_a_sibling_role() -> None:
    """prefill_worker and decode_worker share only what lives in worker/; worker/ imports
    neither."""
    packages = package_graph(import_graph())
    for role in ROLE_PACKAGES:
        siblings = packages[role] & (set(ROLE_PACKAGES) - {role})
        assert not siblings, f"{role} imports {sorted(siblings)}"
    assert not packages["worker"] & set(ROLE_PACKAGES), packages["worker"]


def test_the_router_knows_only_protos() -> None:
    graph = import_graph()
    outside = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == "router"
        for target in targets
        if target.split(".")[0] not in ("router", "protos") and target not in ROUTER_EXCEPTIONS
    }
    assert not outside, sorted(outside)


# The router's layers (ARCHITECTURE.md): the OpenAI application (router.app) on the fleet
# (router.fleet) on the worker client (router.client). A lower layer never imports a higher
# one, nor the modules that put the router together (config, processes, __main__); the
# modules they share are router.metrics and router.brief.
ROUTER_LAYERS = {
    "router.client": ("router.app", "router.fleet", "router.config", "router.processes",
                      "router.__main__"),
    "router.fleet": ("router.app", "router.config", "router.processes", "router.__main__"),
}  # fmt: skip


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_router_layers_point_down() -> None:
    graph = import_graph()
    assert all(any(_within(m, layer) for m in graph) for layer in ROUTER_LAYERS)
    wrong = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        for layer, forbidden in ROUTER_LAYERS.items()
        if _within(module, layer)
        for target in targets
        if any(_within(target, f) for f in forbidden)
    }
    assert not wrong, sorted(wrong)
