"""EtcdCluster: the external etcd topology, a dedicated etcd cluster on its own VMs.

Each member runs etcd as a kubelet static pod, as kubeadm's guide for an external etcd cluster does
(why, its flags and its manifest: render/etcd.py; its steps' scripts: render/etcd_scripts.py). Here:
the membership plan (`plan_membership`) and the component that creates the members' VMs and steps.

Membership changes:

* A new stack bootstraps every planned member with `initial-cluster-state: new`.
  Those names are exported (`etcdInitialMembers`) and re-exported unchanged
  forever, so an initial member keeps exactly the same flags on every run (etcd
  ignores the `initial-*` flags once it has data, and unchanged flags mean no
  restart).
* Any other member is *added*: its step waits for the existing members to be
  healthy, runs `etcdctl member add`, then starts with state `existing` and an
  initial cluster of every lower-numbered member plus itself. Each member step
  depends on the previous one, and an added member's step returns only once it
  is healthy, so additions happen one at a time.
* Lowering `etcd.replicas` drops the highest-numbered members. Each member step
  carries a `delete` command that removes the member from the cluster and stops
  it; pulumi-command runs it before the VM goes (the step depends on the VM), and
  the chain makes deletes run one at a time, highest first. An initial member
  that was removed and comes back is added like any other (the planned members
  are exported as `etcdMembers` for that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.pki import ETCD_CA, EtcdPki
from components.remote import run_step, secret
from components.vm import Vm, VmSize
from model.addressing import AddressPlan
from model.config import ClusterConfig
from model.offsets import role_address
from model.previous import PreviousDeployment
from model.running import etcd_image_tag
from render.etcd import ETCD_IMAGE_REPOSITORY, EtcdClusterSpec, EtcdMember, MemberStart
from render.etcd_scripts import MemberPems, cluster_health_script, member_delete_script, member_files, member_script
from render.node_prep import etcd_node_preparation
from render.scripts import Script, encode_bundle, sha256_hex

if TYPE_CHECKING:
    from components.nodes import NodeContext


def _member_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def plan_membership(config: ClusterConfig, plan: AddressPlan, previous: PreviousDeployment) -> EtcdClusterSpec:
    """Who bootstraps the cluster and who is added to it, from the plan and the last deployment's outputs."""
    members = tuple(
        EtcdMember(node.hostname, node.index, node.address) for node in sorted(plan.etcd_members, key=lambda n: n.index)
    )
    initial_names = previous.etcd_initial_members or tuple(member.name for member in members)
    # Addresses come from the name, so a bootstrapping member keeps the same initial cluster even after
    # other initial members were removed.
    initial_cluster = tuple(
        EtcdMember(name, _member_index(name), role_address(plan.network, "etcd", _member_index(name)))
        for name in sorted(initial_names, key=_member_index)
    )
    last_members = previous.etcd_members
    starts: dict[str, MemberStart] = {}
    for member in members:
        bootstrapped = member.name in initial_names and (last_members is None or member.name in last_members)
        if bootstrapped:
            starts[member.name] = MemberStart("new", initial_cluster)
        else:
            # Additions run in index order after every lower-numbered member, so those are the cluster it joins.
            below = tuple(other for other in members if other.index < member.index)
            starts[member.name] = MemberStart("existing", (*below, member))
    return EtcdClusterSpec(
        token=f"{config.cluster_name}-etcd",
        image=f"{ETCD_IMAGE_REPOSITORY}:{etcd_image_tag(config, previous)}",
        members=members,
        starts=starts,
        initial_members=tuple(member.name for member in initial_cluster),
        maintenance=config.etcd.maintenance,
        timing=config.etcd.timing,
    )


# --- the component --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdClusterArgs:
    context: NodeContext
    spec: EtcdClusterSpec


class EtcdCluster(pulumi.ComponentResource):
    """The external etcd members' VMs and steps; `ready` is the step `kubeadm init` waits for."""

    def __init__(self, name: str, args: EtcdClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:EtcdCluster", name, None, opts)
        context, spec = args.context, args.spec
        pki = context.pki.etcd
        if pki is None or not spec.members:
            raise ValueError("EtcdCluster needs planned members and their certificates (external topology)")
        etcd = context.config.etcd
        size = VmSize(etcd.cpus, etcd.memory_mib, etcd.disk_gib)
        nodes = {node.hostname: node for node in context.plan.etcd_members}
        self.vms: dict[str, Vm] = {}
        self.members: dict[str, command.remote.Command] = {}
        previous: command.remote.Command | None = None
        for member in spec.members:
            node = nodes[member.name]
            preparation = etcd_node_preparation(
                node.hostname, context.config.kubernetes, from_bundle=context.config.artifacts.from_bundle
            )
            vm = Vm(node.hostname, context.vm_args(node, size, preparation), pulumi.ResourceOptions(parent=self))
            script, bundle = _member_outputs(member, spec, context.pki.cas[ETCD_CA.name].cert_pem, pki)
            step = run_step(
                f"{member.name}-etcd-member",
                context.access(node),
                script,
                parent=self,
                stdin=bundle,
                delete=member_delete_script(member, spec.paths),
                # The chain serialises additions, restarts and (in reverse) removals.
                depends_on=[vm.ready, *([previous] if previous is not None else [])],
                # Tearing down the whole cluster removes no members one by one.
                deleted_with=context.hypervisor_for(node).anchor,
            )
            self.vms[member.name], self.members[member.name] = vm, step
            previous = step
        first = nodes[spec.members[0].name]
        self.ready = run_step(
            f"{first.hostname}-etcd-health",
            context.access(first),
            cluster_health_script(first.hostname, spec),
            parent=self,
            depends_on=list(self.members.values()),
        )
        self.endpoints = spec.client_urls
        self.register_outputs({"endpoints": list(self.endpoints), "initialMembers": list(spec.initial_members)})


def _member_outputs(
    member: EtcdMember, spec: EtcdClusterSpec, ca_cert: pulumi.Output[str], pki: EtcdPki
) -> tuple[pulumi.Output[Script], pulumi.Output[str]]:
    """The member's script (public: it holds the certificates' digests) and its secret stdin bundle."""
    issued = pki.members[member.name]
    paths = spec.paths
    public = {
        paths.trusted_ca: ca_cert,
        paths.server_cert: issued.server.cert_pem,
        paths.peer_cert: issued.peer.cert_pem,
        paths.healthcheck_cert: pki.healthcheck_client.cert_pem,
    }
    digests = pulumi.Output.all(*public.values()).apply(
        lambda pems: {path: sha256_hex(pem) for path, pem in zip(public, pems, strict=True)}
    )
    pems = pulumi.Output.all(
        ca_cert,
        issued.server.cert_pem,
        issued.server.key_pem,
        issued.peer.cert_pem,
        issued.peer.key_pem,
        pki.healthcheck_client.cert_pem,
        pki.healthcheck_client.key_pem,
    )
    bundle = secret(pems.apply(lambda values: encode_bundle(member_files(member, spec, MemberPems(*values)))))
    return digests.apply(lambda found: member_script(member, spec, found)), bundle
