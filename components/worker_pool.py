"""WorkerPool: worker VMs, each joined with `kubeadm join` in parallel once the control plane can take them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command

from components.control_plane import config_bundle, kubeadm_join_script
from components.membership import membership_step, reset_step, token_step
from components.nodes import NodeContext
from components.remote import run_step
from components.vm import Vm, VmSize
from model.addressing import NodePlan
from render.kubeadm import JOIN_CONFIG_PATH, ClusterShape, join_documents
from render.node_prep import kubernetes_node_preparation


@dataclass(frozen=True)
class WorkerPoolArgs:
    context: NodeContext
    nodes: Sequence[NodePlan]
    shape: ClusterShape
    # The first control plane and the pod network; workers do not wait for the other control planes.
    after: Sequence[pulumi.Resource]
    # The control plane that refreshes tokens for, and drains, these workers.
    admin: NodePlan


class WorkerPool(pulumi.ComponentResource):
    def __init__(self, name: str, args: WorkerPoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:WorkerPool", name, None, opts)
        context = args.context
        config = context.config
        size = VmSize(config.workers.cpus, config.workers.memory_mib, config.workers.disk_gib)
        self.vms: dict[str, Vm] = {}
        self.joins: dict[str, command.remote.Command] = {}
        self.memberships: dict[str, command.remote.Command] = {}
        for node in args.nodes:
            preparation = kubernetes_node_preparation(
                node.hostname, config.kubernetes, from_bundle=config.artifacts.from_bundle
            )
            vm = Vm(node.hostname, context.vm_args(node, size, preparation), pulumi.ResourceOptions(parent=self))
            documents = pulumi.Output.all(context.pki.bootstrap_token, context.pki.ca_cert_hash).apply(
                functools.partial(_worker_join_documents, args.shape, node)
            )
            self.vms[node.hostname] = vm
            token = token_step(context, node, vm, args.admin, parent=self, after=args.after, removes_node=True)
            reset = reset_step(context, node, vm, parent=self, after=[token])
            self.joins[node.hostname] = run_step(
                f"{node.hostname}-kubeadm-join",
                context.access(node),
                kubeadm_join_script(node.hostname, worker=True),
                parent=self,
                stdin=config_bundle(JOIN_CONFIG_PATH, documents),
                depends_on=[vm.ready, reset, *args.after],
                replace_with=vm.domain.id,
            )
            # Workers leave independently: several removals drain in parallel.
            self.memberships[node.hostname] = membership_step(
                context, node, vm, args.admin, self.joins[node.hostname], parent=self
            )
        self.register_outputs({"workers": [node.hostname for node in args.nodes]})


def _worker_join_documents(shape: ClusterShape, node: NodePlan, secrets: list[str]) -> str:
    token, ca_cert_hash = secrets
    return join_documents(
        shape,
        hostname=node.hostname,
        address=str(node.address),
        token=token,
        ca_cert_hash=ca_cert_hash,
        control_plane=False,
    )
