"""KubernetesUpgrade: raise the cluster's version in the order kubeadm requires.

Registered only in a run that raises `kubernetes.version` (judged against the
last deployment's outputs), so the steps exist exactly while they are needed:
every node is drained, upgraded on the node, then waited for (Ready on the new
version) and uncordoned: the control planes one at a time, the first running
`kubeadm upgrade apply` and the others `kubeadm upgrade node`, then the workers
in batches of `workers.maxUnavailable`. Every
step's guard sees work already done, so a failed run is resumed by the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command

from components.artifacts import bundled_kubernetes
from components.control_plane import ControlPlaneNode
from components.membership import admin_for
from components.nodes import NodeContext
from components.remote import run_step
from model.addressing import NodePlan
from render.admin_node import Target, drain_for_upgrade_script, uncordon_script
from render.lifecycle import upgrade_node_script


@dataclass(frozen=True)
class KubernetesUpgradeArgs:
    context: NodeContext
    control_planes: Sequence[ControlPlaneNode]
    # The control plane that drains and uncordons workers.
    admin: NodePlan
    # The cluster as it stands: every join done before anything is upgraded.
    after: Sequence[pulumi.Resource]


class KubernetesUpgrade(pulumi.ComponentResource):
    def __init__(self, name: str, args: KubernetesUpgradeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:KubernetesUpgrade", name, None, opts)
        self.context = context = args.context
        previous: list[pulumi.Resource] = list(args.after)
        # Control planes one at a time, each drained from another control plane (kubeadm's upgrade guide
        # drains every node before its kubelet is upgraded; the first one also runs `upgrade apply`).
        for position, control_plane in enumerate(args.control_planes):
            node = control_plane.node
            admin = admin_for(context.plan, node)
            previous = [self._upgrade(node, admin, first_control_plane=position == 0, after=previous)]
        nodes = list(context.plan.workers)
        size = context.config.workers.max_unavailable
        for start in range(0, len(nodes), size):
            batch = nodes[start : start + size]
            previous = [self._upgrade(node, args.admin, first_control_plane=False, after=previous) for node in batch]
        version = context.config.kubernetes.version
        finished: list[command.remote.Command] = [step for step in previous if isinstance(step, command.remote.Command)]
        self.completed_version: pulumi.Output[str] = pulumi.Output.all(*(step.id for step in finished)).apply(
            lambda _ids: version
        )
        self.register_outputs({"version": version})

    def _upgrade(
        self, node: NodePlan, admin: NodePlan, *, first_control_plane: bool, after: Sequence[pulumi.Resource]
    ) -> command.remote.Command:
        """Drain (on `admin`), upgrade (on the node), wait Ready on the new version and uncordon (on `admin`)."""
        kubernetes = self.context.config.kubernetes
        version = kubernetes.version
        target = Target(admin.hostname, node.hostname)
        admin_access = self.context.access(admin)
        drain = run_step(
            f"{node.hostname}-upgrade-drain-{version}",
            admin_access,
            drain_for_upgrade_script(target, kubernetes),
            parent=self,
            depends_on=after,
        )
        upgraded = run_step(
            f"{node.hostname}-upgrade-{version}",
            self.context.access(node),
            upgrade_node_script(
                node.hostname,
                kubernetes,
                first_control_plane=first_control_plane,
                bundled=bundled_kubernetes(self.context.bundle, self.context.config.artifacts),
            ),
            parent=self,
            depends_on=[drain],
        )
        return run_step(
            f"{node.hostname}-upgrade-uncordon-{version}",
            admin_access,
            uncordon_script(target, kubernetes),
            parent=self,
            depends_on=[upgraded],
        )
