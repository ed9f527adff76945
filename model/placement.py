"""Which hypervisor each VM runs on, and which host losses the result survives.

Pure functions of the planned nodes, the configured hypervisors and where the last deployment ran each
node, so the offline plan, the tests and `pulumi up` all see the same placement.

The rule, for every role alike:

- A node the last deployment ran stays on the hypervisor it ran on. A VM cannot move between hosts (its
  disks live in that host's storage pool; the provider would build a new, empty VM elsewhere), so adding a
  hypervisor or a worker never moves an existing VM, and neither does reordering `hypervisors`.
- A new node goes to the hypervisor with the fewest nodes of its role, then the fewest VMs of any role,
  then the earliest in `hypervisors`. Nodes are placed in role order (lb, etcd, cp, worker), then index
  order. So replicas of a role land on distinct hypervisors while there are enough of them, workers go
  round-robin on a new cluster, and a newly added hypervisor takes the next new nodes first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.addressing import plan_addresses

if TYPE_CHECKING:
    from model.addressing import NodePlan
    from model.config import ClusterConfig
    from model.offsets import Role
    from model.previous import PreviousDeployment

PLACEMENT_ORDER: tuple[Role, ...] = ("lb", "etcd", "cp", "worker")


def place(nodes: Sequence[NodePlan], hypervisors: Sequence[str], running: Mapping[str, str]) -> dict[str, str]:
    """hostname -> hypervisor name for every node of `nodes`.

    `running` is hostname -> hypervisor of the last deployment. A running node keeps its hypervisor even
    when that is not in `hypervisors` any more: `moved_nodes` reports it, and the config is refused.
    """
    if not hypervisors:
        raise ValueError("no hypervisors to place nodes on")
    placed = {node.hostname: running[node.hostname] for node in nodes if node.hostname in running}
    role_of = {node.hostname: node.role for node in nodes}
    ordered = sorted(nodes, key=lambda node: (PLACEMENT_ORDER.index(node.role), node.index))
    for node in ordered:
        if node.hostname in placed:
            continue
        same_role = [name for host, name in placed.items() if role_of[host] == node.role]
        everything = list(placed.values())
        placed[node.hostname] = min(
            hypervisors,
            key=lambda name: (same_role.count(name), everything.count(name), hypervisors.index(name)),
        )
    return {node.hostname: placed[node.hostname] for node in nodes}


@dataclass(frozen=True)
class Finding:
    """Something about a placement the operator must know; `path` is the stack-file key to change."""

    path: str
    rule: str


def moved_nodes(running: Mapping[str, str], hypervisors: Sequence[str]) -> list[Finding]:
    """Nodes of the last deployment on a hypervisor the config no longer has (removed or renamed).

    Refused even for nodes this run removes: the VM's delete needs that host's provider, and every
    drain/reset step of those nodes is `deleted_with` the host's resources, so removing the host in the
    same run would skip draining them.
    """
    stranded: dict[str, list[str]] = {}
    for hostname, hypervisor in sorted(running.items()):
        if hypervisor not in hypervisors:
            stranded.setdefault(hypervisor, []).append(hostname)
    return [
        Finding(
            "hypervisors",
            f"hypervisor {hypervisor!r} is gone from the config, but the last deployment runs {', '.join(names)} "
            "on it. A VM never moves between hosts (its disks are in that host's pool), and removing a host "
            "in the same run as its VMs would skip their drain and reset: keep the hypervisor (under the "
            "same name) until no VM runs there",
        )
        for hypervisor, names in stranded.items()
    ]


def hosts_needed_for_quorum(members: int) -> int | None:
    """The fewest hosts over which `members` (spread evenly) keep a majority after losing any one; None: never."""
    for hosts in range(2, members + 1):
        if -(-members // hosts) <= (members - 1) // 2:
            return hosts
    return None


@dataclass(frozen=True)
class _Group:
    path: str  # the replicas key
    what: str
    nodes: tuple[str, ...]
    quorum: bool  # a majority must survive (etcd); otherwise one survivor is enough
    consequence: str

    def survivors_needed(self) -> int:
        return len(self.nodes) // 2 + 1 if self.quorum else 1

    def hosts_needed(self) -> int | None:
        if self.quorum:
            return hosts_needed_for_quorum(len(self.nodes))
        return 2 if len(self.nodes) >= 2 else None


def host_loss_findings(
    nodes: Sequence[NodePlan],
    placement: Mapping[str, str],
    hypervisors: Sequence[str],
    *,
    external_etcd: bool,
) -> list[Finding]:
    """What the loss of one hypervisor would break; empty when the cluster survives losing any one of them."""
    by_role = {
        role: tuple(node.hostname for node in sorted(nodes, key=lambda n: n.index) if node.role == role)
        for role in PLACEMENT_ORDER
    }
    no_api = "nothing answers on the API endpoint"
    no_quorum = "etcd loses its quorum and the API stops"
    groups = [_Group("loadBalancer.replicas", "load balancers", by_role["lb"], False, no_api)]
    if external_etcd:
        groups.append(_Group("etcd.replicas", "etcd members", by_role["etcd"], True, no_quorum))
        groups.append(_Group("controlPlane.replicas", "control planes", by_role["cp"], False, no_api))
    else:
        groups.append(
            _Group("controlPlane.replicas", "stacked etcd members (control planes)", by_role["cp"], True, no_quorum)
        )
    if by_role["worker"]:
        groups.append(_Group("workers.replicas", "workers", by_role["worker"], False, "no pod can run"))

    findings = []
    for group in groups:
        on_host = {name: [host for host in group.nodes if placement[host] == name] for name in hypervisors}
        worst = max(hypervisors, key=lambda name: (len(on_host[name]), -hypervisors.index(name)))
        left = len(group.nodes) - len(on_host[worst])
        if left >= group.survivors_needed():
            continue
        lost = f"losing hypervisor {worst!r} (it runs {', '.join(on_host[worst])}) leaves {left} of {len(group.nodes)}"
        needed = group.hosts_needed()
        if needed is None:
            advice = f"{len(group.nodes)} cannot survive any host loss; raise {group.path}"
            path = group.path
        elif len(hypervisors) < needed:
            advice = f"{len(group.nodes)} need at least {needed} hypervisors, the config has {len(hypervisors)}"
            path = "hypervisors"
        else:
            advice = (
                "running nodes never move between hosts; to spread them, lower the replicas and raise them "
                "again (the highest-numbered nodes go, and come back on the least-used hypervisors)"
            )
            path = "hypervisors"
        findings.append(Finding(path, f"{lost} {group.what}: {group.consequence}. {advice}"))
    return findings


def plan_placement(config: ClusterConfig, previous: PreviousDeployment) -> dict[str, str]:
    """The placement of every planned node of `config`, given the last deployment."""
    names = [hypervisor.name for hypervisor in config.hypervisors]
    return place(plan_addresses(config).nodes, names, previous.node_hypervisors)


def placement_findings(config: ClusterConfig, previous: PreviousDeployment) -> tuple[list[Finding], list[Finding]]:
    """(what refuses the config, what the loss of one hypervisor would break) for `config` after `previous`."""
    names = [hypervisor.name for hypervisor in config.hypervisors]
    fragile = host_loss_findings(
        plan_addresses(config).nodes, plan_placement(config, previous), names, external_etcd=config.etcd.external
    )
    return moved_nodes(previous.node_hypervisors, names), fragile
