"""EtcdBackups: the etcd snapshot timer on every etcd member, and the stack output saying where snapshots are.

The timer's script and units, and the etcd tools they run, are rendered by render/backup.py; the node
side of a restore by render/etcd_restore.py. `EtcdBackups` only wires the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.nodes import StepTarget, step_on_each
from render.backup import BACKUP_DIR, BackupPolicy, install_timer_script, snapshot_locations

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from model.config import ClusterConfig


# --- the component ----------------------------------------------------------------------------------------


# An etcd member's node, its VM, and the step after which etcd runs there.
BackupTarget = StepTarget


@dataclass(frozen=True)
class EtcdBackupsArgs:
    context: NodeContext
    targets: Sequence[BackupTarget]


class EtcdBackups(pulumi.ComponentResource):
    """The snapshot timer on every etcd member."""

    def __init__(self, name: str, args: EtcdBackupsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:EtcdBackups", name, None, opts)
        policy = backup_policy(args.context.config)
        self.installed: dict[str, command.remote.Command] = step_on_each(
            args.context,
            args.targets,
            "etcd-backup-timer",
            lambda target: install_timer_script(target.node.hostname, policy),
            parent=self,
        )
        self.register_outputs({"directory": BACKUP_DIR, "members": list(self.installed)})


# --- outputs ----------------------------------------------------------------------------------------------

HOST_KEYS_OUTPUT = "hostKeys"
ETCD_BACKUPS_OUTPUT = "etcdBackups"


def backup_policy(config: ClusterConfig) -> BackupPolicy:
    """What the timer renders from: `etcd.backup`."""
    return BackupPolicy(config.etcd.backup.interval_minutes, config.etcd.backup.keep)


def backup_locations(config: ClusterConfig, members: Sequence[str]) -> dict[str, object]:
    """The `etcdBackups` output (render/backup.py `snapshot_locations`), with the config's backup policy."""
    return snapshot_locations(backup_policy(config), members)
