"""Hypervisor resources and the Vm component: volumes, cloud-init disk, domain, readiness (its script is
render/readiness.py)."""

from __future__ import annotations

import hashlib
import os
import pwd
from dataclasses import dataclass

import pulumi
import pulumi_libvirt as libvirt
import pulumi_tls as tls

from components.artifacts import NodeSoftware, install_software
from components.remote import NodeAccess, run_locally, run_step
from model.addressing import NodePlan
from model.config import ClusterConfig, HypervisorConfig
from model.hostkeys import pin_host_key
from model.previous import NODE_RECORD, PreviousDeployment
from render.hostkey_disk import host_key_disk_cleanup_script, host_key_disk_write_script
from render.image import cached_image_path, image_fetch_script
from render.readiness import readiness_script


@dataclass(frozen=True)
class VmSize:
    cpus: int
    memory_mib: int
    disk_gib: int


def deployment_id(previous: PreviousDeployment, parent: pulumi.Resource) -> pulumi.Output[str]:
    """Eight hex digits drawn once per deployment of the stack and kept in its state.

    The libvirt provider adopts an existing volume of the same name as it is (terraform-provider-libvirt
    0.8.1), so a root disk left behind by a lost or half-destroyed deployment of this stack would boot with
    its old state and every step's guard would skip. Suffixing volume names with this id makes each
    deployment's names its own. pulumi-tls is the program's only source of randomness: the id is the
    digest of a key generated once and never used for anything else. A stack deployed before the id existed
    keeps its unsuffixed names (an empty id), so upgrading the program rebuilds no node.
    """
    if previous.exists and previous.deployment_id is None:
        return pulumi.Output.from_input("")
    seed = tls.PrivateKey(
        "deployment-id",
        algorithm="ED25519",
        opts=pulumi.ResourceOptions(
            parent=parent, additional_secret_outputs=["privateKeyPem", "privateKeyOpenssh", "privateKeyPemPkcs8"]
        ),
    )
    return seed.public_key_openssh.apply(lambda public: hashlib.sha256(public.encode()).hexdigest()[:8])


class Hypervisor(pulumi.ComponentResource):
    """One libvirt host: its provider, the cluster's NAT network (nat mode only), the base image and its fetch."""

    def __init__(
        self,
        name: str,
        hypervisor: HypervisorConfig,
        config: ClusterConfig,
        volume_suffix: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("kubeadm-ha:index:Hypervisor", name, None, opts)
        self.pool = hypervisor.pool
        self.settings = hypervisor
        self.volume_suffix = pulumi.Output.from_input(volume_suffix).apply(lambda ident: f"-{ident}" if ident else "")
        uri = hypervisor.uri
        if hypervisor.host_key is not None:
            uri = pin_host_key(
                uri, hypervisor.host_key, project=pulumi.get_project(), stack=pulumi.get_stack(), hypervisor=name
            )
        self.uri = uri
        self.provider = libvirt.Provider(f"{name}-libvirt", uri=uri, opts=pulumi.ResourceOptions(parent=self))
        on_host = pulumi.ResourceOptions(parent=self, provider=self.provider)
        # Bridge mode: the nodes join an existing bridge of this host; the program creates no network.
        self.bridge = (hypervisor.bridge or config.network.bridge) if config.network.bridged else None
        self.network: libvirt.Network | None = None
        if not config.network.bridged:
            self.network = libvirt.Network(
                f"{name}-network",
                name=f"{config.cluster_name}-net",
                mode=config.network.mode,
                domain=config.network.domain,
                addresses=[str(config.network.cidr)],
                autostart=True,
                dhcp=libvirt.NetworkDhcpArgs(enabled=True),
                dns=libvirt.NetworkDnsArgs(enabled=True, local_only=True),
                # terraform-provider-libvirt 0.8.1 rebuilds `dns` on read from two places (resource_libvirt_network.go:
                # `local_only` from <domain localOnly>, then `enabled` only when libvirt's <dns> element carries the
                # attribute), so the read-back need not match what was written and every run would show a diff.
                # The program never changes these settings on a running network.
                opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(ignore_changes=["dns"])),
            )
        # The provider reads `source` on the machine running Pulumi only when it creates the volume
        # (terraform-provider-libvirt 0.8.1 resource_libvirt_volume.go: every argument is ForceNew, and
        # resourceLibvirtVolumeCreate opens `source`). A fetch created once for the whole stack would not run
        # again when a host is added later, from another machine or after /var/tmp was cleaned. So each host
        # has its own fetch, the volume waits for it, and its triggers are everything that makes the engine
        # create the volume again: pulumi-command 1.2.1 replaces a command whose `triggers` change
        # (common/inputs.go, replaceOnChanges), and a replacement runs `create`. Whenever this volume is
        # created, the verified file was just checked (or fetched) here. Unchanged, nothing runs.
        path = cached_image_path(config.image)
        volume_name = self.volume_name(f"{config.cluster_name}-base")
        self.fetched = run_locally(
            f"{name}-fetch-image",
            image_fetch_script(config.image),
            parent=self,
            triggers=[config.image.url, config.image.sha256 or "", path, hypervisor.pool, volume_name, uri],
            depends_on=[],
        )
        self.base_image = libvirt.Volume(
            f"{name}-base-image",
            name=volume_name,
            pool=hypervisor.pool,
            source=path,
            format="qcow2",
            opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=[self.fetched])),
        )
        # Deleted only when the cluster leaves this host (or is destroyed): steps that undo one node's membership
        # are `deleted_with` it, so tearing the whole cluster down drains no node.
        self.anchor: pulumi.CustomResource = self.network if self.network is not None else self.base_image
        network = {"networkId": self.network.id} if self.network is not None else {}
        self.register_outputs({**network, "baseImageId": self.base_image.id})

    def interface(self, node: NodePlan) -> libvirt.DomainNetworkInterfaceArgs:
        """The node's NIC: on the NAT network with its DHCP reservation, or on the bridge (the guest sets its
        static address itself, from cloud-init)."""
        if self.network is None:
            return libvirt.DomainNetworkInterfaceArgs(bridge=self.bridge, mac=node.mac, wait_for_lease=False)
        return libvirt.DomainNetworkInterfaceArgs(
            network_id=self.network.id,
            hostname=node.hostname,
            addresses=[str(node.address)],
            mac=node.mac,
            wait_for_lease=False,
        )

    def volume_name(self, stem: str) -> pulumi.Output[str]:
        """`{stem}{suffix}.qcow2`: the provider adopts an existing volume of the same name as it is, so a name
        must not collide with a leftover of an earlier deployment of this stack (see `volume_suffix`)."""
        return self.volume_suffix.apply(lambda suffix: f"{stem}{suffix}.qcow2")


# The provider reads `addresses` back from the DHCP lease (terraform-provider-libvirt 0.8.1
# resource_libvirt_domain.go, read: addressesForMac): a domain just created (wait_for_lease off) or without a
# current lease reads back none, and the next run would update it. The address itself never changes
# (config.address_problems refuses that). The path names the one NIC by index: with the real engine (CLI
# 3.274, pulumi-libvirt 0.5.4) `networkInterfaces[*].addresses` still let the provider's diff of the inputs
# against that read-back through (an `update` of every new domain on the next run); `[0]` suppresses it
# (tests/real/engine/test_domain_readback.py).
DOMAIN_IGNORE_CHANGES = ["networkInterfaces[0].addresses"]


@dataclass(frozen=True)
class VmArgs:
    node: NodePlan
    size: VmSize
    hypervisor: Hypervisor
    access: NodeAccess
    user_data: pulumi.Output[str]  # no secret: the provider logs it (render/hostkey_disk.py)
    host_private_key: pulumi.Output[str]  # secret: the node's SSH host private key, for its key disk
    meta_data: str
    network_config: str
    # The artifact bundle and registry mirror (components/artifacts.py), installed before `ready`.
    software: NodeSoftware | None = None


class Vm(pulumi.ComponentResource):
    """A node: copy-on-write root volume, cloud-init disk, domain, and a step that waits for cloud-init."""

    def __init__(self, name: str, args: VmArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:Vm", name, None, opts)
        node = args.node
        on_host = pulumi.ResourceOptions(parent=self, provider=args.hypervisor.provider)
        # Where this VM is created, kept in the state before any of its disks exists: the engine persists
        # each resource as it is created, while a failed run leaves the `nodes` output as it was. The next
        # run reads it back (model/previous.py) so placement and the removed-host check see this VM even
        # if the run that created it failed. A Stash keeps its first value until it is deleted with the VM.
        self.record = pulumi.Stash(
            f"{name}-placement",
            input={
                "kind": NODE_RECORD,
                "hostname": node.hostname,
                "role": node.role,
                "hypervisor": args.hypervisor.settings.name,
                "address": str(node.address),
                "mac": node.mac,
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        on_host = pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=[self.record]))
        self.root_volume = libvirt.Volume(
            f"{name}-root",
            name=args.hypervisor.volume_name(f"{node.hostname}-root"),
            pool=args.hypervisor.pool,
            base_volume_id=args.hypervisor.base_image.id,
            format="qcow2",
            size=args.size.disk_gib * 1024**3,
            # Fixed names in the pool: a rebuild (README: replace a node) removes the old volume first.
            opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(delete_before_replace=True)),
        )
        self.host_key_disk = self._host_key_disk(name, args, on_host)
        self.cloud_init = libvirt.CloudInitDisk(
            f"{name}-cloud-init",
            name=args.hypervisor.volume_suffix.apply(lambda suffix: f"{node.hostname}-cloud-init{suffix}.iso"),
            pool=args.hypervisor.pool,
            user_data=args.user_data,
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
        settings = args.hypervisor.settings
        self.domain = libvirt.Domain(
            f"{name}-domain",
            name=node.hostname,
            type=settings.domain_type,
            cpu=libvirt.DomainCpuArgs(mode=settings.effective_cpu_mode),
            # The provider's default is SPICE, which RHEL 9 / Alma 9 QEMU no longer has; VNC on the host's
            # loopback only keeps a console for emergencies without exposing one on the network.
            graphics=libvirt.DomainGraphicsArgs(type="vnc", listen_type="address", listen_address="127.0.0.1"),
            vcpu=args.size.cpus,
            memory=args.size.memory_mib,
            autostart=True,
            running=True,
            # No `machine`: the default i440fx has the IDE bus the cloud-init disk is attached to.
            cloudinit=self.cloud_init.id,
            # The key disk second: the node reads it as /dev/vdb (render/hostkey_disk.py).
            disks=[
                libvirt.DomainDiskArgs(volume_id=self.root_volume.id),
                libvirt.DomainDiskArgs(volume_id=self.host_key_disk.id),
            ],
            network_interfaces=[args.hypervisor.interface(node)],
            consoles=[libvirt.DomainConsoleArgs(type="pty", target_port="0", target_type="serial")],
            # The name is unique on the hypervisor, so a replacement must remove the old domain first.
            opts=pulumi.ResourceOptions.merge(
                on_host, pulumi.ResourceOptions(delete_before_replace=True, ignore_changes=DOMAIN_IGNORE_CHANGES)
            ),
        )
        self.ready: pulumi.Resource = run_step(
            f"{name}-ready",
            args.access,
            readiness_script(node.hostname),
            parent=self,
            depends_on=[self.domain],
            booting=True,
            replace_with=self.domain.id,
        )
        if args.software is not None:
            self.ready = install_software(
                name, args.access, args.software, parent=self, after=self.ready, replace_with=self.domain.id
            )
        self.register_outputs({"address": str(node.address), "domainId": self.domain.id})

    def _host_key_disk(self, name: str, args: VmArgs, on_host: pulumi.ResourceOptions) -> libvirt.Volume:
        """The raw volume holding the node's SSH host private key (render/hostkey_disk.py says why not in
        cloud-init): written to a private file by a local step given the key on stdin, copied by libvirt,
        and the file removed once the volume exists.

        The provider reads `source` only when it creates the volume (resource_libvirt_volume.go, every argument
        ForceNew), so `source` is ignored afterwards: the file's path is under the home of whoever runs
        Pulumi, and another operator's run must not rebuild the disk. The write runs whenever the volume is
        about to be created (its triggers are what re-creates it, as the base image's fetch); the removal runs
        after each creation, and again if the path or the key changes.
        """
        node, hypervisor = args.node, args.hypervisor
        volume_name = hypervisor.volume_suffix.apply(lambda suffix: f"{node.hostname}-host-key{suffix}.raw")
        path = volume_name.apply(_host_key_file)
        written = run_locally(
            f"{name}-host-key-disk",
            path.apply(lambda where: host_key_disk_write_script(node.hostname, where)),
            parent=self,
            stdin=args.host_private_key,
            triggers=[volume_name, hypervisor.pool, hypervisor.uri],
            depends_on=[self.record],
        )
        volume = libvirt.Volume(
            f"{name}-host-key",
            name=volume_name,
            pool=hypervisor.pool,
            source=path,
            format="raw",
            opts=pulumi.ResourceOptions.merge(
                on_host,
                pulumi.ResourceOptions(depends_on=[written], ignore_changes=["source"], delete_before_replace=True),
            ),
        )
        run_locally(
            f"{name}-host-key-disk-cleanup",
            path.apply(lambda where: host_key_disk_cleanup_script(node.hostname, where)),
            parent=self,
            triggers=[volume.id, path, args.access.host_public_key],
            depends_on=[volume],
        )
        return volume


def _host_key_file(volume_name: str) -> str:
    """Private to the user running Pulumi: `~` from the passwd database, as the Pulumi CLI finds its own."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    return f"{home}/.cache/kubeadm-ha/host-keys/{pulumi.get_project()}-{pulumi.get_stack()}/{volume_name}"
