"""What an offline evaluation returns: the registrations, reads, stack outputs and logs.

:data:`UNKNOWN` stands for a value not known yet (a first preview); :class:`Evaluation`
holds everything one evaluation registered and answers questions about the dependency graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

STACK_TYPE: Final = "pulumi:pulumi:Stack"


class _Unknown:
    """Type of :data:`UNKNOWN`; a singleton so ``is`` comparisons are reliable."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
"""Stands for a value that is not known yet (only ever seen in preview)."""


StackOutputs = Mapping[str, Any] | None | _Unknown
"""Another stack's outputs as the engine would read them: a mapping, None (no such stack) or UNKNOWN."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Registration:
    """One ``RegisterResource`` call, as the engine would have received it."""

    urn: str
    type: str
    name: str
    parent: str | None
    custom: bool
    id: str | None
    inputs: dict[str, Any]
    """Inputs with secrets unwrapped to plain values; unknown values are :data:`UNKNOWN`."""
    outputs: dict[str, Any]
    """The state the mock returned, decoded the same way as ``inputs``."""
    secret_inputs: frozenset[str]
    """Top-level input names whose value is, or contains, a Pulumi secret."""
    dependencies: tuple[str, ...]
    property_dependencies: dict[str, tuple[str, ...]]
    additional_secret_outputs: tuple[str, ...]
    delete_before_replace: bool
    deleted_with: str | None
    replace_on_changes: tuple[str, ...]
    ignore_changes: tuple[str, ...]
    protect: bool
    retain_on_delete: bool
    provider: str | None
    """Provider reference (``<provider urn>::<provider id>``), if one was set explicitly."""


@dataclass(frozen=True)
class OutputValue:
    """A stack output. ``value`` holds :data:`UNKNOWN` wherever ``known`` is false."""

    value: Any
    secret: bool
    known: bool


@dataclass(frozen=True)
class LogMessage:
    """A message logged through ``pulumi.log`` (info and above; debug is SDK chatter)."""

    severity: str
    message: str
    urn: str | None


@dataclass(frozen=True)
class Read:
    """One ``ReadResource`` call (a ``pulumi.StackReference``, say): read, not registered."""

    urn: str
    type: str
    name: str
    id: str | None
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    registered_before: int
    """How many resources (the root stack included) had been registered when the read was made."""


ResourceRef = Registration | str


@dataclass
class Evaluation:
    """Everything one evaluation of the program registered."""

    stack: str
    preview: bool
    resources: list[Registration]
    """In registration order; the first entry is the root ``pulumi:pulumi:Stack``."""
    outputs: dict[str, OutputValue]
    config: dict[str, str] = field(default_factory=dict)
    """The configuration as handed to the program (engine encoding: strings/JSON)."""
    logs: list[LogMessage] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    """Resources the program read rather than registered (``pulumi.StackReference``), in order."""

    @property
    def stack_urn(self) -> str:
        return self.by_type(STACK_TYPE)[0].urn

    def state(self, *, without: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
        """The stack's state after this run, as readStackResourceOutputs returns it: urn -> type and outputs.

        `without`: URNs the run did not get to create (a stand-in for a run that failed part-way; the real
        engine persists each resource as its step completes). Components have no state of their own here.
        """
        return {
            r.urn: {"type": r.type, "outputs": dict(r.outputs)}
            for r in self.resources
            if r.custom and r.urn not in without
        }

    def by_type(self, type_: str) -> list[Registration]:
        return [r for r in self.resources if r.type == type_]

    def by_urn(self, urn: str) -> Registration:
        for registration in self.resources:
            if registration.urn == urn:
                return registration
        raise LookupError(f"no resource with URN {urn!r}")

    def named(self, name: str) -> Registration:
        """The only resource called ``name`` (any type); an error if there are none or several."""
        matches = [r for r in self.resources if r.name == name]
        if len(matches) != 1:
            found = ", ".join(r.urn for r in matches) or "none"
            raise LookupError(f"expected exactly one resource named {name!r}, found {found}")
        return matches[0]

    def children(self, urn: ResourceRef) -> list[Registration]:
        """Direct children of a resource, in registration order."""
        parent = self._urn(urn)
        return [r for r in self.resources if r.parent == parent]

    def descendants(self, urn: ResourceRef) -> list[Registration]:
        found: list[Registration] = []
        pending = [self._urn(urn)]
        while pending:
            children = self.children(pending.pop())
            found.extend(children)
            pending.extend(child.urn for child in children)
        return found

    def depends_on(self, later: ResourceRef, earlier: ResourceRef) -> bool:
        """Whether ``later`` (transitively) waits for ``earlier`` through its dependencies.

        Resources may be given as registrations, URNs or unique names. The SDK never
        sends a dependency on a local component: it replaces it by the component's
        custom descendants. So a dependency on a component is satisfied when every one
        of its custom descendants is reachable.
        """
        source = self._urn(later)
        target = self.by_urn(self._urn(earlier))
        if target.custom or target.type == STACK_TYPE:
            targets = {target.urn}
        else:
            targets = {r.urn for r in self.descendants(target) if r.custom}
            if not targets:
                return False
        reachable = self._reachable(source)
        return targets <= reachable

    def dot(self) -> str:
        """A Graphviz DOT graph of the custom resources; arrows point from a
        dependency to the resource that waits for it (creation order)."""
        custom = [r for r in self.resources if r.custom]
        known = {r.urn for r in custom}
        lines = [f"digraph {_dot_quote(self.stack)} {{", "  rankdir=LR;", "  node [shape=box];"]
        for registration in custom:
            label = f"{_dot_escape(registration.name)}\\n{_dot_escape(registration.type)}"
            lines.append(f'  {_dot_quote(registration.urn)} [label="{label}"];')
        for registration in custom:
            for dependency in dict.fromkeys(registration.dependencies):
                if dependency in known:
                    lines.append(f"  {_dot_quote(dependency)} -> {_dot_quote(registration.urn)};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _urn(self, ref: ResourceRef) -> str:
        if isinstance(ref, Registration):
            return ref.urn
        if ref.startswith("urn:pulumi:"):
            return ref
        return self.named(ref).urn

    def _reachable(self, start: str) -> set[str]:
        by_urn = {r.urn: r for r in self.resources}
        seen: set[str] = set()
        pending = list(by_urn[start].dependencies) if start in by_urn else []
        while pending:
            urn = pending.pop()
            if urn in seen:
                continue
            seen.add(urn)
            if urn in by_urn:
                pending.extend(by_urn[urn].dependencies)
        return seen


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_quote(text: str) -> str:
    return f'"{_dot_escape(text)}"'
