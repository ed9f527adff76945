"""Hypervisor resources and the Vm component: volumes, cloud-init disk, domain, readiness."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_libvirt as libvirt

from components.addressing import NodePlan
from components.config import ClusterConfig, HypervisorConfig
from components.node_prep import PREPARED_MARKER
from components.remote import NodeAccess, run_step, secret
from components.scripts import LOG_DIR, Script, command, quote

CLOUD_INIT_TIMEOUT_SECONDS = 1800
READY_MARKER = "/var/lib/kubeadm-ha/cloud-init-done"
_SHOW_CLOUD_INIT_STATUS = "cloud-init status --long >&2 || true"


@dataclass(frozen=True)
class VmSize:
    cpus: int
    memory_mib: int
    disk_gib: int


class Hypervisor(pulumi.ComponentResource):
    """One libvirt host: its provider, the cluster's NAT network and the shared base image."""

    def __init__(
        self, name: str, hypervisor: HypervisorConfig, config: ClusterConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("kubeadm-ha:index:Hypervisor", name, None, opts)
        self.pool = hypervisor.pool
        self.provider = libvirt.Provider(
            f"{name}-libvirt", uri=hypervisor.uri, opts=pulumi.ResourceOptions(parent=self)
        )
        on_host = pulumi.ResourceOptions(parent=self, provider=self.provider)
        self.network = libvirt.Network(
            f"{name}-network",
            name=f"{config.cluster_name}-net",
            mode=config.network.mode,
            domain=config.network.domain,
            addresses=[str(config.network.cidr)],
            autostart=True,
            dhcp=libvirt.NetworkDhcpArgs(enabled=True),
            dns=libvirt.NetworkDnsArgs(enabled=True, local_only=True),
            opts=on_host,
        )
        self.base_image = libvirt.Volume(
            f"{name}-base-image",
            name=f"{config.cluster_name}-base.qcow2",
            pool=hypervisor.pool,
            source=config.image,
            format="qcow2",
            opts=on_host,
        )
        self.register_outputs({"networkId": self.network.id, "baseImageId": self.base_image.id})


@dataclass(frozen=True)
class VmArgs:
    node: NodePlan
    size: VmSize
    hypervisor: Hypervisor
    access: NodeAccess
    user_data: pulumi.Output[str]  # secret: carries the node's SSH host private key
    meta_data: str
    network_config: str


def readiness_script(hostname: str) -> Script:
    """Wait (bounded) until cloud-init is done and the node preparation it ran has completed.

    `cloud-init status --wait` exits 2 for "done with recoverable errors" (newer cloud-init reports, for
    example, deprecated keys that way); that is shown, not fatal. What matters is the preparation's marker.
    """
    return Script(
        step="wait-for-cloud-init",
        host=hostname,
        done_when=f"[ -f {READY_MARKER} ]",
        body=(
            "rc=0",
            f"timeout {CLOUD_INIT_TIMEOUT_SECONDS} cloud-init status --wait >/dev/null || rc=$?",
            'if [ "$rc" -eq 2 ]; then',
            '  echo "kubeadm-ha: cloud-init finished with recoverable errors on ${KUBEADM_HA_HOST}:" >&2',
            f"  {_SHOW_CLOUD_INIT_STATUS}",
            'elif [ "$rc" -ne 0 ]; then',
            '  echo "kubeadm-ha: cloud-init did not finish cleanly on ${KUBEADM_HA_HOST}:" >&2',
            f"  {_SHOW_CLOUD_INIT_STATUS}",
            "  exit 1",
            "fi",
            f"[ -f {PREPARED_MARKER} ] || {{ echo "
            + quote("kubeadm-ha: node preparation did not complete on ")
            + '"${KUBEADM_HA_HOST}"'
            + quote(f"; see {LOG_DIR}/node-prep.log on the node")
            + " >&2; exit 1; }",
            command("touch", READY_MARKER),
        ),
    )


class Vm(pulumi.ComponentResource):
    """A node: copy-on-write root volume, cloud-init disk, domain, and a step that waits for cloud-init."""

    def __init__(self, name: str, args: VmArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:Vm", name, None, opts)
        node = args.node
        on_host = pulumi.ResourceOptions(parent=self, provider=args.hypervisor.provider)
        self.root_volume = libvirt.Volume(
            f"{name}-root",
            name=f"{node.hostname}-root.qcow2",
            pool=args.hypervisor.pool,
            base_volume_id=args.hypervisor.base_image.id,
            format="qcow2",
            size=args.size.disk_gib * 1024**3,
            # Fixed names in the pool: a rebuild (README: replace a node) removes the old volume first.
            opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(delete_before_replace=True)),
        )
        self.cloud_init = libvirt.CloudInitDisk(
            f"{name}-cloud-init",
            name=f"{node.hostname}-cloud-init.iso",
            pool=args.hypervisor.pool,
            user_data=secret(args.user_data),
            meta_data=args.meta_data,
            network_config=args.network_config,
            # cloud-init reads its seed at first boot only. A changed document (a new Kubernetes version, an
            # extra SSH key) must not rebuild running nodes; replacing this disk is how a node is rebuilt
            # with current documents (README: replace a node).
            opts=pulumi.ResourceOptions.merge(
                on_host,
                pulumi.ResourceOptions(
                    ignore_changes=["userData", "metaData", "networkConfig"], delete_before_replace=True
                ),
            ),
        )
        self.domain = libvirt.Domain(
            f"{name}-domain",
            name=node.hostname,
            vcpu=args.size.cpus,
            memory=args.size.memory_mib,
            autostart=True,
            running=True,
            # No `machine`: the default i440fx has the IDE bus the cloud-init disk is attached to.
            cloudinit=self.cloud_init.id,
            disks=[libvirt.DomainDiskArgs(volume_id=self.root_volume.id)],
            network_interfaces=[
                libvirt.DomainNetworkInterfaceArgs(
                    network_id=args.hypervisor.network.id,
                    hostname=node.hostname,
                    addresses=[str(node.address)],
                    mac=node.mac,
                    wait_for_lease=False,
                )
            ],
            consoles=[libvirt.DomainConsoleArgs(type="pty", target_port="0", target_type="serial")],
            # The name is unique on the hypervisor, so a replacement must remove the old domain first.
            opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(delete_before_replace=True)),
        )
        self.ready = run_step(
            f"{name}-ready",
            args.access,
            readiness_script(node.hostname),
            parent=self,
            depends_on=[self.domain],
            booting=True,
            replace_with=self.domain.id,
        )
        self.register_outputs({"address": str(node.address), "domainId": self.domain.id})
