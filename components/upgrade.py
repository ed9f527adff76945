"""KubernetesUpgrade: raise the cluster's version in the order kubeadm requires.

Registered only in a run that raises `kubernetes.version` (judged against the
last deployment's outputs), so the steps exist exactly while they are needed:
the first control plane runs `kubeadm upgrade apply`, the others `kubeadm
upgrade node` one at a time, then workers in batches of `workers.maxUnavailable`
(drain, upgrade on the node, wait Ready on the new version and uncordon). Every
step's guard sees work already done, so a failed run is resumed by the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command

from components.addressing import NodePlan
from components.control_plane import ControlPlaneNode
from components.lifecycle import Target, drain_for_upgrade_script, uncordon_script, upgrade_node_script
from components.nodes import NodeContext
from components.remote import run_step


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
        context = args.context
        kubernetes = context.config.kubernetes
        version = kubernetes.version
        previous: list[pulumi.Resource] = list(args.after)
        for position, control_plane in enumerate(args.control_planes):
            node = control_plane.node
            step = run_step(
                f"{node.hostname}-upgrade-{version}",
                context.access(node),
                upgrade_node_script(node.hostname, kubernetes, first_control_plane=position == 0),
                parent=self,
                depends_on=previous,
            )
            previous = [step]
        admin_access = context.access(args.admin)
        nodes = list(context.plan.workers)
        size = context.config.workers.max_unavailable
        for start in range(0, len(nodes), size):
            batch_done: list[pulumi.Resource] = []
            for node in nodes[start : start + size]:
                target = Target(args.admin.hostname, node.hostname)
                drain = run_step(
                    f"{node.hostname}-upgrade-drain-{version}",
                    admin_access,
                    drain_for_upgrade_script(target, kubernetes),
                    parent=self,
                    depends_on=previous,
                )
                upgraded = run_step(
                    f"{node.hostname}-upgrade-{version}",
                    context.access(node),
                    upgrade_node_script(node.hostname, kubernetes, first_control_plane=False),
                    parent=self,
                    depends_on=[drain],
                )
                batch_done.append(
                    run_step(
                        f"{node.hostname}-upgrade-uncordon-{version}",
                        admin_access,
                        uncordon_script(target, kubernetes),
                        parent=self,
                        depends_on=[upgraded],
                    )
                )
            previous = batch_done
        finished: list[command.remote.Command] = [step for step in previous if isinstance(step, command.remote.Command)]
        self.completed_version: pulumi.Output[str] = pulumi.Output.all(*(step.id for step in finished)).apply(
            lambda _ids: version
        )
        self.register_outputs({"version": version})
