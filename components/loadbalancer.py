"""LoadBalancer: HAProxy in front of every kube-apiserver, keepalived holding the VIP when there are 2+ LBs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command

from components.nodes import NodeContext
from components.remote import run_step
from components.vm import Vm, VmSize
from render import lb_config
from render.node_prep import load_balancer_preparation
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    STATE_DIR,
    BundleFile,
    Script,
    encode_bundle,
    files_match,
    sha256_hex,
    write_file,
)
from render.scripts import command as shell

# The configs the daemons last accepted and were (re)started with. Written last, so a step that stopped after
# installing the files (a config rejected by its checker) is not mistaken for done when it runs again.
LB_APPLIED_MARKER = f"{STATE_DIR}/lb-config-applied"


def lb_config_script(hostname: str, files: Sequence[BundleFile]) -> Script:
    """Installs the configs from the stdin bundle, checks them with the daemons' own checkers, (re)starts."""
    with_keepalived = any(item.path == lb_config.KEEPALIVED_CONF_PATH for item in files)
    services = ["haproxy", "keepalived"] if with_keepalived else ["haproxy"]
    active = " && ".join(shell("systemctl", "is-active", "--quiet", service) for service in services)
    body = [
        "install_bundle",
        shell("haproxy", "-c", "-q", "-f", lb_config.HAPROXY_CFG_PATH),
        shell("systemctl", "enable", "haproxy"),
        shell("systemctl", "reload-or-restart", "haproxy"),
    ]
    if with_keepalived:
        body += [
            shell("keepalived", "--config-test", "--use-file", lb_config.KEEPALIVED_CONF_PATH),
            shell("systemctl", "enable", "keepalived"),
            shell("systemctl", "restart", "keepalived"),
        ]
    else:
        body.append(shell("systemctl", "disable", "--now", "keepalived") + " 2>/dev/null || true")
    # The digests make the script change with the configs, so a new backend set re-runs the step.
    digests = {item.path: sha256_hex(item.content) for item in files}
    applied = "".join(f"{digest}  {path}\n" for path, digest in sorted(digests.items()))
    body += write_file(LB_APPLIED_MARKER, applied)
    return Script(
        step="configure-lb",
        host=hostname,
        done_when=f"{files_match({**digests, LB_APPLIED_MARKER: sha256_hex(applied)})} && {active}",
        functions=INSTALL_BUNDLE_FUNCTION,
        body=tuple(body),
    )


@dataclass(frozen=True)
class LoadBalancerArgs:
    context: NodeContext


class LoadBalancer(pulumi.ComponentResource):
    """The API endpoint. `configured` lists the steps that must finish before `kubeadm init`."""

    def __init__(self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:LoadBalancer", name, None, opts)
        context = args.context
        lb = context.config.load_balancer
        size = VmSize(lb.cpus, lb.memory_mib, lb.disk_gib)
        self.vms: dict[str, Vm] = {}
        self.configured: list[command.remote.Command] = []
        for node in context.plan.load_balancers:
            vm = Vm(
                node.hostname,
                context.vm_args(
                    node,
                    size,
                    load_balancer_preparation(node.hostname, from_bundle=context.config.artifacts.from_bundle),
                ),
                pulumi.ResourceOptions(parent=self),
            )
            self.vms[node.hostname] = vm
            # The configs travel as a public bundle; their digests in the script make a changed backend set re-run it.
            files = lb_config.lb_node_files(
                context.config.cluster_name, context.config.load_balancer.port, context.plan, node
            )
            self.configured.append(
                run_step(
                    f"{node.hostname}-configure-lb",
                    context.access(node),
                    lb_config_script(node.hostname, files),
                    parent=self,
                    stdin=encode_bundle(files),
                    stdin_is_secret=False,
                    depends_on=[vm.ready],
                    replace_with=vm.domain.id,
                )
            )
        self.endpoint = f"{context.plan.vip}:{lb.port}"
        self.register_outputs({"endpoint": self.endpoint})
