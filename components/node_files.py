"""NodeFiles: the file modes and owners CIS asks for on every node (render/node_files.py), after kubeadm set
the node up and again after every Kubernetes upgrade (which rewrites the kubelet's files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.nodes import StepTarget, step_on_each
from render.node_files import node_files_script

if TYPE_CHECKING:
    from components.nodes import NodeContext


@dataclass(frozen=True)
class FilesTarget(StepTarget):
    """A node as for any chain of steps, and whether etcd runs there."""

    etcd_member: bool = False


@dataclass(frozen=True)
class NodeFilesArgs:
    context: NodeContext
    targets: Sequence[FilesTarget]
    after: Sequence[pulumi.Resource] = ()  # an upgrade of this run


class NodeFiles(pulumi.ComponentResource):
    def __init__(self, name: str, args: NodeFilesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:NodeFiles", name, None, opts)
        version = args.context.config.kubernetes.version
        self.steps: dict[str, command.remote.Command] = step_on_each(
            args.context,
            args.targets,
            "node-files",
            lambda target: node_files_script(target.node.hostname, etcd_member=target.etcd_member, version=version),
            parent=self,
            after=args.after,
        )
        self.register_outputs({})
