"""One lab node booted the way the program plans it, on the lab's own libvirtd, under QEMU's TCG.

Stand-in for the libvirt provider, whose plugin the Go module proxy does not serve (see
tests/real/engine/toolchain.py): the program's own documents and values (seed ISO from its user-data,
meta-data and network-config, the planned MAC and address as a DHCP reservation, the pinned host key,
the operator key, the step commands) are applied with virsh and ssh. The network is isolated (no
forwarding, no DNS forwarding): nothing a guest sends leaves this machine.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from components.remote import PER_DIAL_TIMEOUT_SECONDS, STEP_DIAL_ERROR_LIMIT
from tests.real.engine.libvirtd import Libvirtd
from tools.offline import Evaluation

BOOT_TIMEOUT_SECONDS = 900
# As the program's steps dial (components/remote.py): 10 s per dial, up to 10 failed dials per step.
SSH_CONNECT_TIMEOUT_SECONDS = PER_DIAL_TIMEOUT_SECONDS
DIAL_ATTEMPTS = STEP_DIAL_ERROR_LIMIT


@dataclass(frozen=True)
class PlannedNode:
    hostname: str
    address: str
    mac: str
    user: str
    host_public_key: str
    user_data: str
    meta_data: str
    network_config: str
    memory_mib: int
    cpus: int


def planned_node(evaluation: Evaluation, hostname: str) -> PlannedNode:
    domain = evaluation.named(f"{hostname}-domain").inputs
    nic = domain["networkInterfaces"][0]
    seed = evaluation.named(f"{hostname}-cloud-init").inputs
    ready = evaluation.named(f"{hostname}-ready").inputs["connection"]
    return PlannedNode(
        hostname=hostname,
        address=nic["addresses"][0],
        mac=nic["mac"],
        user=ready["user"],
        host_public_key=ready["hostKey"],
        user_data=seed["userData"],
        meta_data=seed["metaData"],
        network_config=seed["networkConfig"],
        memory_mib=int(domain["memory"]),
        cpus=int(domain["vcpu"]),
    )


def network_xml(evaluation: Evaluation, nodes: list[PlannedNode]) -> str:
    """The program's network (name, bridge address, DHCP reservations) without NAT: isolated."""
    network = evaluation.named("local-network").inputs
    cidr = network["addresses"][0]
    base, prefix = cidr.split("/")
    gateway = base.rsplit(".", 1)[0] + ".1"
    hosts = "".join(f"<host mac='{node.mac}' name='{escape(node.hostname)}' ip='{node.address}'/>" for node in nodes)
    start, end = base.rsplit(".", 1)[0] + ".200", base.rsplit(".", 1)[0] + ".250"
    return (
        f"<network><name>{escape(network['name'])}</name><bridge name='virbr-lab' stp='off'/>"
        "<dns enable='no'/>"
        f"<ip address='{gateway}' prefix='{prefix}'><dhcp><range start='{start}' end='{end}'/>{hosts}</dhcp></ip>"
        "</network>"
    )


def domain_xml(node: PlannedNode, image: Path, root: Path, seed: Path, network: str) -> str:
    return f"""<domain type='qemu'>
  <name>{escape(node.hostname)}</name>
  <memory unit='MiB'>{node.memory_mib}</memory>
  <vcpu>{node.cpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image / "vmlinuz"}</kernel><initrd>{image / "initrd.img"}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{root}'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{seed}'/>
      <target dev='hdd' bus='ide'/><readonly/></disk>
    <interface type='network'><source network='{escape(network)}'/><mac address='{node.mac}'/>
      <model type='virtio'/></interface>
    <serial type='file'><source path='{root.parent / (node.hostname + ".console.log")}'/></serial>
    <console type='file'><source path='{root.parent / (node.hostname + ".console.log")}'/>
      <target type='serial'/></console>
  </devices>
</domain>
"""


def seed_iso(node: PlannedNode, directory: Path) -> Path:
    """The NoCloud seed as the libvirt provider's CloudInitDisk makes it: an ISO labelled cidata."""
    files = directory / f"{node.hostname}-seed"
    files.mkdir(parents=True, exist_ok=True)
    (files / "user-data").write_text(node.user_data)
    (files / "meta-data").write_text(node.meta_data)
    (files / "network-config").write_text(node.network_config)
    iso = directory / f"{node.hostname}-cloud-init.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(files)],
        check=True,
        timeout=60,
    )
    return iso


@dataclass
class Ssh:
    """ssh as the program's steps connect: the operator key, and only the pinned host key trusted."""

    node: PlannedNode
    key: Path
    known_hosts: Path

    @classmethod
    def pinned(cls, node: PlannedNode, key: Path, directory: Path, host_key: str | None = None) -> Ssh:
        known = directory / f"{node.hostname}.known_hosts.{abs(hash(host_key or node.host_public_key))}"
        known.write_text(f"{node.address} {(host_key or node.host_public_key).strip()}\n")
        return cls(node, key, known)

    def argv(self) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}",
            f"{self.node.user}@{self.node.address}",
        ]

    def run(
        self, command: str, *, stdin: str | None = None, timeout: float = 120, attempts: int = DIAL_ATTEMPTS
    ) -> subprocess.CompletedProcess[str]:
        """pulumi-command hands the command string to the remote shell as is; so does ssh. Failed dials
        (exit 255 before the session: a timeout or a refused connection) are retried like its dials."""
        for _ in range(attempts):
            done = subprocess.run(
                [*self.argv(), command],
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            dial_failed = done.returncode == 255 and ("timed out" in done.stderr or "refused" in done.stderr)
            if not dial_failed:
                return done
            time.sleep(2)
        return done

    def wait_until_up(self, timeout: float = BOOT_TIMEOUT_SECONDS) -> float:
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < timeout:
            try:
                done = self.run("true", timeout=30, attempts=1)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0:
                return time.monotonic() - started
            last = done.stderr.strip()
            time.sleep(3)
        raise TimeoutError(f"{self.node.hostname}: no SSH within {timeout} s; last error: {last}")


def boot(lv: Libvirtd, node: PlannedNode, image: Path, directory: Path, network: str) -> None:
    root = directory / f"{node.hostname}-root.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image / "root.qcow2"), str(root), "10G"],
        check=True,
        timeout=60,
    )
    seed = seed_iso(node, directory)
    xml = directory / f"{node.hostname}.xml"
    xml.write_text(domain_xml(node, image, root, seed, network))
    lv.virsh("define", str(xml))
    lv.virsh("start", node.hostname)


def quote(text: str) -> str:
    return shlex.quote(text)
