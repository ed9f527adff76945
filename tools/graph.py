"""Reading an evaluated deployment as a graph: which remote steps wait for which, and in what order.

Shared by the plan command and the benchmark, so both report the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from tools.offline import Evaluation, Registration

REMOTE_STEP = "command:remote:Command"
_NOT_IN_GRAPH = ("pulumi:providers:", "pulumi:pulumi:Stack")


@dataclass
class DeploymentGraph:
    evaluation: Evaluation

    @cached_property
    def _by_urn(self) -> dict[str, Registration]:
        return {r.urn: r for r in self.evaluation.resources}

    @cached_property
    def custom_resources(self) -> list[Registration]:
        return [r for r in self.evaluation.resources if r.custom and not r.type.startswith(_NOT_IN_GRAPH)]

    @cached_property
    def steps(self) -> list[Registration]:
        return [r for r in self.evaluation.resources if r.type == REMOTE_STEP]

    def _nearest(self, start: Registration, wanted: set[str]) -> set[str]:
        """URNs in `wanted` reachable from `start` through dependencies without passing another wanted one."""
        found: set[str] = set()
        seen: set[str] = set()
        stack = list(start.dependencies)
        while stack:
            urn = stack.pop()
            if urn in seen:
                continue
            seen.add(urn)
            if urn in wanted:
                found.add(urn)
                continue
            dependency = self._by_urn.get(urn)
            if dependency is not None:
                stack.extend(dependency.dependencies)
        return found

    def edges_between(self, members: Iterable[Registration]) -> dict[str, set[str]]:
        """urn -> the members it directly waits for, looking through resources outside `members`."""
        chosen = list(members)
        wanted = {r.urn for r in chosen}
        return {r.urn: self._nearest(r, wanted) for r in chosen}

    @cached_property
    def step_edges(self) -> dict[str, set[str]]:
        return transitive_reduction(self.edges_between(self.steps))

    @cached_property
    def step_depth(self) -> dict[str, int]:
        """1 for a step that waits for no other step; otherwise one more than the deepest step it waits for."""
        depth: dict[str, int] = {}

        def visit(urn: str) -> int:
            if urn not in depth:
                depth[urn] = 1 + max((visit(before) for before in self.step_edges[urn]), default=0)
            return depth[urn]

        for step in self.steps:
            visit(step.urn)
        return depth

    def longest_chain(self) -> list[Registration]:
        """The longest sequence of remote steps that must run one after another."""
        if not self.steps:
            return []
        depth = self.step_depth
        end = max(self.steps, key=lambda step: (depth[step.urn], step.urn))
        chain = [end]
        while self.step_edges[chain[-1].urn]:
            chain.append(self._by_urn[max(self.step_edges[chain[-1].urn], key=lambda urn: (depth[urn], urn))])
        return list(reversed(chain))

    def phases(self) -> list[list[Registration]]:
        """Remote steps grouped by depth: every step of phase k can start once phase k-1 is done."""
        grouped: dict[int, list[Registration]] = {}
        for step in self.steps:
            grouped.setdefault(self.step_depth[step.urn], []).append(step)
        return [sorted(grouped[level], key=lambda step: step.name) for level in sorted(grouped)]

    def component_counts(self) -> dict[str, int]:
        """Custom resources under each component instance, keyed `Type name`."""
        components = [r for r in self.evaluation.resources if not r.custom and r.type != "pulumi:pulumi:Stack"]
        counts: dict[str, int] = {}
        for component in components:
            prefix = component.urn
            counts[f"{component.type.rsplit(':', 1)[-1]} {component.name}"] = sum(
                1 for r in self.custom_resources if _is_under(self._by_urn, r, prefix)
            )
        return counts


def _is_under(by_urn: Mapping[str, Registration], resource: Registration, ancestor: str) -> bool:
    parent = resource.parent
    while parent is not None:
        if parent == ancestor:
            return True
        found = by_urn.get(parent)
        parent = found.parent if found is not None else None
    return False


def transitive_reduction(edges: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges implied by longer paths, so a drawn graph shows only the orderings that matter."""
    reachable: dict[str, set[str]] = {}

    def ancestors(urn: str) -> set[str]:
        if urn not in reachable:
            found: set[str] = set()
            for before in edges.get(urn, ()):
                found.add(before)
                found |= ancestors(before)
            reachable[urn] = found
        return reachable[urn]

    reduced: dict[str, set[str]] = {}
    for urn, befores in edges.items():
        implied = set().union(*(ancestors(before) for before in befores)) if befores else set()
        reduced[urn] = {before for before in befores if before not in implied}
    return reduced
