"""KubeletServingApproval: the kubelet-serving CSR approver on every control plane, and one step after the joins.

With `serverTLSBootstrap: true` each kubelet asks for its serving certificate with a CSR that nothing in
Kubernetes approves, and asks again each time it rotates the certificate, long after any `pulumi up`. So:
- every control plane gets a systemd timer (`<host>-kubelet-serving-approver`) that approves, every two
  minutes, the kubelet-serving CSRs of the planned nodes whose requester, subject, SANs and usages are exactly
  what that node's kubelet asks for, and leaves every other CSR pending for an operator (reported, never
  denied);
- one step on the first control plane (`<host>-kubelet-serving-approve`), after the joins, approves the same way
  until every planned kubelet serves a certificate that the cluster CA verifies for its name and address, and
  fails after a bounded wait naming the kubelets still without one and why.

What is approved, and why those names, is told in render/csr_approval.py; this component only wires the steps.
Every input is rendered from the sorted plan, so a second `pulumi up` changes nothing. A change of plan (a node
added or removed) changes every step's script: pulumi-command updates the step, which runs its (guarded) script
again, rewriting each timer's approver and waiting for the new kubelets. The steps are replaced with their own
control plane's VM only, as every node step is. A worker whose VM is rebuilt with the same plan joins again with
no serving certificate and the one-shot step does not run again: the timers approve its CSR within minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.nodes import StepTarget, step_on_each
from components.remote import run_step
from render.csr_approval import approve_step_script, install_approver_script, serving_plan
from render.kubelet_serving import kubelet_serving_script

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from model.addressing import NodePlan


# A control plane, its VM, and the step after which it holds /etc/kubernetes/admin.conf.
ApproverTarget = StepTarget


@dataclass(frozen=True)
class KubeletServingApprovalArgs:
    context: NodeContext
    # Every control plane; the first one also runs the one-shot step.
    targets: Sequence[ApproverTarget]
    # Every node whose kubelet registers with the cluster: the control planes and the workers.
    nodes: Sequence[NodePlan]
    # The same nodes, each with its VM and the step after which kubeadm has set it up: a kubelet set up before
    # serverTLSBootstrap is moved to it (render/kubelet_serving.py) before the one-shot step waits for it.
    kubelets: Sequence[StepTarget]
    # The steps the one-shot step follows: every join, and every wait for a joined node to be Ready.
    after: Sequence[pulumi.Resource]


class KubeletServingApproval(pulumi.ComponentResource):
    """The approver timer on every control plane, and the step that waits for every planned kubelet's certificate."""

    def __init__(self, name: str, args: KubeletServingApprovalArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:KubeletServingApproval", name, None, opts)
        if not args.targets:
            raise ValueError("KubeletServingApproval needs at least one control plane")
        plan = serving_plan(args.nodes)
        self.timers: dict[str, command.remote.Command] = {}
        for target in args.targets:
            host = target.node.hostname
            self.timers[host] = run_step(
                f"{host}-kubelet-serving-approver",
                args.context.access(target.node),
                install_approver_script(host, plan),
                parent=self,
                depends_on=[target.after],
                replace_with=target.vm.domain.id,
            )
        self.moved = step_on_each(
            args.context,
            args.kubelets,
            "kubelet-serving",
            lambda target: kubelet_serving_script(target.node.hostname),
            parent=self,
        )
        first = args.targets[0]
        # Named after its node, as every node step is (tests/program/test_day2.py finds a step's node by its name).
        self.approved = run_step(
            f"{first.node.hostname}-kubelet-serving-approve",
            args.context.access(first.node),
            approve_step_script(first.node.hostname, plan),
            parent=self,
            depends_on=[first.after, *args.after, *self.moved.values()],
            replace_with=first.vm.domain.id,
        )
        self.register_outputs({"approvers": list(self.timers), "nodes": [entry.hostname for entry in plan]})

    @property
    def steps(self) -> list[command.remote.Command]:
        """Every step, for the program's `finished` output."""
        return [*self.timers.values(), *self.moved.values(), self.approved]
