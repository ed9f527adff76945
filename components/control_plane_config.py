"""ControlPlaneSettings: the program's ClusterConfiguration applied to running control planes, one at a time.

New settings (a flag, the audit policy; issue 20) reach a running cluster through this chain of
`<host>-control-plane-config` steps, each after the previous, so at most one control plane restarts a component
at a time and the load balancers always have the others. The script is rendered by
render/control_plane_config.py; on a control plane kubeadm has just set up it finds nothing to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pulumi
import pulumi_command as command

from components.nodes import StepTarget
from components.remote import run_step
from render import hardening
from render.control_plane_config import SETTINGS_PATH, control_plane_config_script
from render.kubeadm import ClusterShape, settings_documents
from render.scripts import BundleFile, encode_bundle, sha256_hex

if TYPE_CHECKING:
    from components.nodes import NodeContext


def settings_files(shape: ClusterShape) -> list[BundleFile]:
    """The files every control plane's flags name, as kubeadm init/join and the settings step place them."""
    return [BundleFile(hardening.AUDIT_POLICY_PATH, hardening.audit_policy(), 0o600)]


SettingsTarget = StepTarget


@dataclass(frozen=True)
class ControlPlaneSettingsArgs:
    context: NodeContext
    targets: Sequence[SettingsTarget]  # control planes, in order
    shape: ClusterShape
    after: Sequence[pulumi.Resource] = ()


class ControlPlaneSettings(pulumi.ComponentResource):
    """One `control-plane-config` step per control plane, chained."""

    def __init__(self, name: str, args: ControlPlaneSettingsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:ControlPlaneSettings", name, None, opts)
        shape = args.shape
        stacked = shape.external_etcd is None
        etcd_flags = hardening.etcd_args(shape.hardening.etcd, shape.hardening.etcd_timing) if stacked else ()
        directories = [shape.hardening.audit.log_dir]
        self.steps: dict[str, command.remote.Command] = {}
        previous: list[pulumi.Resource] = list(args.after)
        for target in args.targets:
            host = target.node.hostname
            files = [
                BundleFile(SETTINGS_PATH, settings_documents(shape, hostname=host, address=str(target.node.address))),
                *settings_files(shape),
            ]
            digest = sha256_hex("\n".join(f"{item.path} {sha256_hex(item.content)}" for item in files))
            step = run_step(
                f"{host}-control-plane-config",
                args.context.access(target.node),
                control_plane_config_script(
                    host, digest, stacked_etcd=stacked, etcd_flags=etcd_flags, directories=directories
                ),
                parent=self,
                # Public files: the operator reads in the diff what a change will write.
                stdin=encode_bundle(files),
                stdin_is_secret=False,
                depends_on=[target.after, *previous],
                replace_with=target.vm.domain.id,
            )
            self.steps[host] = step
            previous = [step]
        self.register_outputs({})
