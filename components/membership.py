"""A Kubernetes node's membership, seen from a control plane that holds admin.conf.

Two steps per node run on that "admin" control plane: before the join, the
bootstrap token is refreshed (tokens live 24 h; a node may join a year after the
cluster was made); after it, the step waits until the node is Ready. Pulumi
deletes in reverse order, so removing a node runs the second step's delete
(drain), then the node's own kubeadm step's delete (`kubeadm reset`, which stops
kubelet), then the first step's delete (the Node object, which a running kubelet
would have re-registered), then the VM.
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_command as command

from components.addressing import AddressPlan, NodePlan
from components.kubeadm import token_documents
from components.lifecycle import (
    TOKEN_CONFIG_PATH,
    Target,
    delete_node_script,
    drain_node_script,
    join_token_script,
    node_ready_script,
)
from components.nodes import NodeContext
from components.remote import run_step
from components.scripts import BundleFile, encode_bundle
from components.vm import Vm


def admin_for(plan: AddressPlan, node: NodePlan) -> NodePlan | None:
    """The first control plane that is not `node` itself (None in a one-control-plane cluster)."""
    return next((cp for cp in plan.control_planes if cp != node), None)


def token_step(
    context: NodeContext,
    node: NodePlan,
    vm: Vm,
    admin: NodePlan,
    *,
    parent: pulumi.Resource,
    after: Sequence[pulumi.Resource],
) -> command.remote.Command:
    token = context.pki.bootstrap_token
    # The token id names the token's Secret and is public by design (only its second half is secret).
    token_id = pulumi.Output.unsecret(token.apply(lambda value: value.split(".", 1)[0]))
    version = context.config.kubernetes.version
    payload = token.apply(lambda value: encode_bundle([BundleFile(TOKEN_CONFIG_PATH, token_documents(value, version))]))
    return run_step(
        f"{node.hostname}-join-token",
        context.access(admin),
        token_id.apply(lambda identifier: join_token_script(Target(admin.hostname, node.hostname), identifier)),
        parent=parent,
        stdin=payload,
        # Created before the join, so deleted after the node's `kubeadm reset`: the Node object goes last.
        delete=delete_node_script(Target(admin.hostname, node.hostname)),
        depends_on=after,
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).network,
    )


def membership_step(
    context: NodeContext,
    node: NodePlan,
    vm: Vm,
    admin: NodePlan,
    kubeadm_step: command.remote.Command,
    *,
    parent: pulumi.Resource,
    after: Sequence[pulumi.Resource] = (),
) -> command.remote.Command:
    target = Target(admin.hostname, node.hostname)
    return run_step(
        f"{node.hostname}-membership",
        context.access(admin),
        node_ready_script(target),
        parent=parent,
        delete=drain_node_script(target),
        depends_on=[kubeadm_step, *after],
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).network,
    )
