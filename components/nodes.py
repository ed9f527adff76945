"""What every node-building component shares: how to reach a node and how to boot it."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pulumi
import pulumi_command as command

from components.artifacts import node_software
from components.pki import ClusterPki
from components.remote import NodeAccess, run_step, secret
from components.vm import Hypervisor, Vm, VmArgs, VmSize
from model.addressing import AddressPlan, NodePlan
from model.bundle import Manifest
from model.config import ClusterConfig
from model.versions import release_for
from render.cloudinit import (
    NodeIdentity,
    StaticAddress,
    node_identity,
    render_meta_data,
    render_network_config,
    render_user_data,
)
from render.scripts import Script


@dataclass(frozen=True)
class StepTarget:
    """A node, its VM, and the step after which the node is set up: what a chain of steps over nodes takes."""

    node: NodePlan
    vm: Vm
    after: pulumi.Resource


T = TypeVar("T", bound=StepTarget)


def step_on_each(
    context: NodeContext,
    targets: Sequence[T],
    suffix: str,
    script: Callable[[T], Script],
    *,
    parent: pulumi.Resource,
    after: Sequence[pulumi.Resource] = (),
) -> dict[str, command.remote.Command]:
    """One `<host>-<suffix>` step per target, each once its node is set up (and after `after`), in no order
    among themselves, replaced with its VM; by hostname."""
    return {
        target.node.hostname: run_step(
            f"{target.node.hostname}-{suffix}",
            context.access(target.node),
            script(target),
            parent=parent,
            depends_on=[target.after, *after],
            replace_with=target.vm.domain.id,
        )
        for target in targets
    }


@dataclass(frozen=True)
class NodeContext:
    config: ClusterConfig
    plan: AddressPlan
    pki: ClusterPki
    hypervisors: Mapping[str, Hypervisor]  # by name
    placement: Mapping[str, str]  # hostname -> hypervisor name (model/placement.py)
    bundle: Manifest | None = None  # the pinned artifact bundle's manifest (components/artifacts.py)

    def access(self, node: NodePlan) -> NodeAccess:
        return NodeAccess(
            hostname=node.hostname,
            address=str(node.address),
            user=self.config.ssh.user,
            private_key=self.pki.operator_private_key,
            host_public_key=self.pki.host_public_key(node.hostname),
        )

    def hypervisor_for(self, node: NodePlan) -> Hypervisor:
        return self.hypervisors[self.placement[node.hostname]]

    def network_config(self, node: NodePlan) -> str:
        network = self.config.network
        if not network.bridged:
            return render_network_config(node.mac)
        assert network.gateway is not None  # config validation requires it in bridge mode
        interface = ipaddress.IPv4Interface(f"{node.address}/{network.cidr.prefixlen}")
        return render_network_config(node.mac, StaticAddress(interface, network.gateway, network.dns))

    def vm_args(self, node: NodePlan, size: VmSize, preparation: Script) -> VmArgs:
        operator_key = self.pki.operator_ssh_key.public_key_openssh
        host_key = self.pki.host_keys[node.hostname]

        def identity(operator_public: str, host_public: str) -> NodeIdentity:
            return node_identity(
                node,
                domain=self.config.network.domain,
                ssh_user=self.config.ssh.user,
                authorized_keys=(operator_public.strip(), *self.config.ssh.authorized_keys),
                host_key_public_openssh=host_public.strip(),
            )

        identity_output = pulumi.Output.all(operator_key, host_key.public_key_openssh).apply(
            lambda values: identity(*values)
        )
        prepared = preparation.render()
        user_data = identity_output.apply(lambda ident: render_user_data(ident, prepared))
        return VmArgs(
            node=node,
            size=size,
            hypervisor=self.hypervisor_for(node),
            access=self.access(node),
            user_data=user_data,
            host_private_key=secret(host_key.private_key_openssh),
            meta_data=render_meta_data(node.hostname),
            network_config=self.network_config(node),
            software=node_software(
                self.config.artifacts,
                self.bundle,
                node.hostname,
                node.role,
                external_etcd=self.config.etcd.external,
                pause_tag=release_for(self.config.kubernetes.version).pause_tag,
            ),
        )
