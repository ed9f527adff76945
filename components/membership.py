"""A Kubernetes node's membership, seen from a control plane that holds admin.conf.

Steps per node, in the order they are created:
- on that "admin" control plane, the bootstrap token is refreshed (tokens live 24 h; a node may join a
  year after the cluster was made);
- a reset step, on the machine running Pulumi, that does nothing until the node leaves;
- the node's own kubeadm step (control_plane.py, worker_pool.py);
- on the admin node again, a step that waits until the node is Ready.
Pulumi deletes in reverse order, so a leaving node is drained (the last step's delete), then reset
(`kubeadm reset`, which stops kubelet; skipped when the node does not answer), then its Node object, and
a stacked control plane's etcd member, are deleted (the token step's delete: a running kubelet would
re-register the Node), then the VM goes. The first control plane's token step runs only once the second
control plane exists, so a step of its own that does nothing when created carries that last delete.

A node never drains or deletes itself: a first control plane without another one is its own admin, and
those steps then have no delete. Scaling the control planes down to one thus moves them to the survivor
(an update), rather than dropping them, which would run their deletes against the survivor.
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_command as command

from components.nodes import NodeContext
from components.remote import run_delete_locally, run_step
from components.vm import Vm
from model.addressing import AddressPlan, NodePlan
from render.admin_node import (
    TOKEN_CONFIG_PATH,
    Target,
    delete_node_script,
    drain_node_script,
    join_token_script,
    node_ready_script,
)
from render.kubeadm import token_documents
from render.lifecycle import SshNode, reset_over_ssh_script
from render.scripts import BundleFile, Script, encode_bundle


def admin_for(plan: AddressPlan, node: NodePlan) -> NodePlan:
    """The first control plane that is not `node` itself; `node` when it is the only control plane."""
    return next((cp for cp in plan.control_planes if cp != node), node)


def _unless_itself(admin: NodePlan, node: NodePlan, script: Script) -> Script | None:
    return None if admin == node else script


def _node_removal(context: NodeContext, node: NodePlan, admin: NodePlan) -> Script | None:
    stacked_control_plane = node.role == "cp" and not context.config.etcd.external
    removal = delete_node_script(Target(admin.hostname, node.hostname), etcd_member=stacked_control_plane)
    return _unless_itself(admin, node, removal)


def token_step(
    context: NodeContext,
    node: NodePlan,
    vm: Vm,
    admin: NodePlan,
    *,
    parent: pulumi.Resource,
    after: Sequence[pulumi.Resource],
    removes_node: bool,
) -> command.remote.Command:
    """Refresh the bootstrap token on `admin`; with `removes_node` (it precedes the node's reset), its delete
    removes the Node object."""
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
        delete=_node_removal(context, node, admin) if removes_node else None,
        depends_on=after,
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).anchor,
    )


def node_removal_step(
    context: NodeContext, node: NodePlan, vm: Vm, admin: NodePlan, *, parent: pulumi.Resource
) -> command.remote.Command:
    """For the first control plane, whose token step comes too late: nothing on create; its delete removes the
    Node object (and etcd member) from `admin`. Creating it needs no connection, so it precedes the join."""
    return run_step(
        f"{node.hostname}-node-removal",
        context.access(admin),
        None,
        parent=parent,
        delete=_node_removal(context, node, admin),
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).anchor,
    )


def reset_step(
    context: NodeContext, node: NodePlan, vm: Vm, *, parent: pulumi.Resource, after: Sequence[pulumi.Resource]
) -> command.local.Command:
    """`kubeadm reset` of the node when it leaves, from the machine running Pulumi, skipped if it does not answer.

    `after` is the step that removes the Node object: created before, so deleted after the reset.
    """
    script = context.pki.host_public_key(node.hostname).apply(
        lambda host_key: reset_over_ssh_script(
            SshNode(node.hostname, str(node.address), context.config.ssh.user, host_key)
        )
    )
    return run_delete_locally(
        f"{node.hostname}-reset",
        script,
        parent=parent,
        stdin=context.pki.operator_private_key,
        depends_on=after,
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).anchor,
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
        delete=_unless_itself(admin, node, drain_node_script(target)),
        depends_on=[kubeadm_step, *after],
        replace_with=vm.domain.id,
        deleted_with=context.hypervisor_for(node).anchor,
    )
