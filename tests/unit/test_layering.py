"""The layout keeps its layers: tools → components → render → model, one way, no cycles.

Read from the source with `ast`, every import counts: top-level, inside functions and under
`TYPE_CHECKING`, so a layer cannot be crossed by a deferred import either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from model.release import PROGRAM_DIRECTORIES

ROOT = Path(__file__).resolve().parents[2]
# Lower layers first: a module may import its own layer and the layers after it in this list.
LAYERS = ("tools", "components", "render", "model")
PROVIDER_PACKAGES = ("pulumi_command", "pulumi_libvirt", "pulumi_tls")
# What creating a resource (or seeing one's outputs) takes in the Pulumi SDK.
RESOURCE_NAMES = {
    "ComponentResource",
    "CustomResource",
    "Resource",
    "ProviderResource",
    "StackReference",
    "Output",
    "Input",
    "export",
    "register_resource",
}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def product_modules() -> dict[str, Path]:
    found = {"__main__": ROOT / "__main__.py"}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            found[_module_name(path)] = path
    return found


@cache
def _tree(name: str) -> ast.Module:
    path = product_modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def _imported(name: str) -> Iterator[str]:
    """Every module `name` imports (absolute names; `from pkg import mod` yields `pkg.mod` where that is a module)."""
    modules = product_modules()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{name}: relative import of {node.module}"
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    yield f"{node.module}.{alias.name}"


def _layer(module: str) -> str | None:
    top = module.partition(".")[0]
    return top if top in LAYERS else None


@cache
def product_imports() -> dict[str, frozenset[str]]:
    modules = product_modules()
    return {name: frozenset(target for target in _imported(name) if target in modules) for name in modules}


def test_every_product_package_is_found() -> None:
    assert {_layer(name) for name in product_modules()} == {None, *LAYERS}
    assert len(product_modules()) > 40


@pytest.mark.parametrize("name", sorted(product_modules()))
def test_imports_point_down_the_layers(name: str) -> None:
    layer = _layer(name)
    allowed = set(LAYERS if layer is None else LAYERS[LAYERS.index(layer) :])
    if name == "__main__":
        allowed.discard("tools")  # the program never runs the operator commands
    wrong = sorted(target for target in product_imports()[name] if _layer(target) not in allowed)
    assert not wrong, f"{name} ({layer or 'program'}) imports against the layering: {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in product_modules() if _layer(n) in {"render", "model"}))
def test_render_and_model_create_no_resources(name: str) -> None:
    imported = set(_imported(name))
    providers = sorted(target for target in imported if target.partition(".")[0] in PROVIDER_PACKAGES)
    assert not providers, f"{name} imports a provider package: {providers}"
    if _layer(name) == "render":
        assert not [target for target in imported if target.partition(".")[0] == "pulumi"], (
            f"{name}: a renderer imports no Pulumi at all (typed inputs in, text out)"
        )
    used = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Attribute) and node.attr in RESOURCE_NAMES:
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pulumi"):
            used |= {alias.name for alias in node.names if alias.name in RESOURCE_NAMES}
    assert not used, f"{name} touches resources or outputs: {sorted(used)}"


@pytest.mark.parametrize("name", sorted(n for n in product_modules() if _layer(n) == "render"))
def test_renderers_take_narrow_inputs(name: str) -> None:
    """A renderer names what it renders from: a sub-model or plain values, never the whole stack config."""
    whole = sorted(
        alias.name
        for node in ast.walk(_tree(name))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name in {"ClusterConfig", "NodeContext"}
    )
    assert not whole, f"{name} takes {whole}; pass the fields or sub-models it renders from"


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(product_imports()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(product_modules()))
def test_modules_stay_small(name: str) -> None:
    lines = len(product_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, (
        f"{name}: {lines} lines (split it by concern; the layout keeps modules under {MAX_LINES})"
    )


def test_program_digest_covers_every_package_the_program_imports() -> None:
    reached, todo = set(), ["__main__"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(product_imports()[name])
    packages = {_layer(name) for name in reached} - {None}
    assert packages == {"components", "render", "model"}
    assert packages <= set(PROGRAM_DIRECTORIES)
