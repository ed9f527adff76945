"""NodeFiles: the file modes and owners CIS asks for on every node (render/node_files.py), after kubeadm set
the node up and again after every Kubernetes upgrade (which rewrites the kubelet's files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.remote import run_step
from render.node_files import node_files_script

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from components.vm import Vm
    from model.addressing import NodePlan


@dataclass(frozen=True)
class FilesTarget:
    """A node, its VM, the step after which kubeadm (or etcd) has set it up, and whether etcd runs there."""

    node: NodePlan
    vm: Vm
    after: pulumi.Resource
    etcd_member: bool


@dataclass(frozen=True)
class NodeFilesArgs:
    context: NodeContext
    targets: Sequence[FilesTarget]
    after: Sequence[pulumi.Resource] = ()  # an upgrade of this run


class NodeFiles(pulumi.ComponentResource):
    def __init__(self, name: str, args: NodeFilesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:NodeFiles", name, None, opts)
        version = args.context.config.kubernetes.version
        self.steps: dict[str, command.remote.Command] = {}
        for target in args.targets:
            host = target.node.hostname
            self.steps[host] = run_step(
                f"{host}-node-files",
                args.context.access(target.node),
                node_files_script(host, etcd_member=target.etcd_member, version=version),
                parent=self,
                depends_on=[target.after, *args.after],
                replace_with=target.vm.domain.id,
            )
        self.register_outputs({})
