"""EtcdMaintenance: the defragmentation and alarm timer on every etcd member.

The script, its units and why it works the way it does are in render/etcd_maintenance.py; the members are
the snapshot timer's (components/backup.py `BackupTarget`: each control plane with stacked etcd, each etcd
VM with external etcd). `EtcdMaintenance` only wires one install step per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.nodes import step_on_each
from render.etcd_maintenance import STATUS_PATH, TIMER, install_maintenance_timer_script

if TYPE_CHECKING:
    from components.backup import BackupTarget
    from components.nodes import NodeContext


@dataclass(frozen=True)
class EtcdMaintenanceArgs:
    context: NodeContext
    targets: Sequence[BackupTarget]


class EtcdMaintenance(pulumi.ComponentResource):
    """The maintenance timer on every etcd member, each ticking at its own minute (its node's index)."""

    def __init__(self, name: str, args: EtcdMaintenanceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:EtcdMaintenance", name, None, opts)
        interval_hours = args.context.config.etcd.maintenance.defrag_interval_hours
        self.installed: dict[str, command.remote.Command] = step_on_each(
            args.context,
            args.targets,
            "etcd-maintenance-timer",
            lambda target: install_maintenance_timer_script(target.node.hostname, target.node.index, interval_hours),
            parent=self,
        )
        self.register_outputs({"timer": TIMER, "status": STATUS_PATH, "members": list(self.installed)})
