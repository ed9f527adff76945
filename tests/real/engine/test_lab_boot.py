"""Section 3 of issue 10, as far as it runs without the provider plugins: the lab stack's nodes booted
under TCG on a libvirtd of our own from the program's seed documents, reached like its steps reach them.

Lab stack: 2 load balancers + 1 control plane, no workers. The steps run are the program's own command
strings and stdin (from the offline evaluation of the same stack), over ssh with the pinned host key.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.real.engine.guest import PlannedNode, Ssh, boot, network_xml, planned_node
from tests.real.engine.libvirtd import Libvirtd, running_libvirtd
from tools.offline import Evaluation, evaluate

HERE = Path(__file__).resolve().parent
LAB_CONFIG = {
    "kubeadm-ha:clusterName": "lab",
    "kubeadm-ha:network": {"mode": "nat", "cidr": "10.17.9.0/24"},
    "kubeadm-ha:loadBalancer": {"replicas": 2, "cpus": 1, "memoryMiB": 512, "diskGiB": 10},
    "kubeadm-ha:controlPlane": {"replicas": 1, "cpus": 2, "memoryMiB": 2048, "diskGiB": 20},
    "kubeadm-ha:workers": {"replicas": 0},
}
NODES = ("lab-lb-1", "lab-lb-2", "lab-cp-1")
STEP_TIMEOUT_SECONDS = 1900  # the readiness step's own bound (1800 s) and a margin


@dataclass
class Lab:
    evaluation: Evaluation
    libvirtd: Libvirtd
    directory: Path
    nodes: dict[str, PlannedNode]
    ssh: dict[str, Ssh]
    boot_seconds: dict[str, float]

    def step(self, resource: str, timeout: float = STEP_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
        inputs = self.evaluation.named(resource).inputs
        hostname = next(name for name in self.nodes if resource.startswith(f"{name}-"))
        return self.ssh[hostname].run(inputs["create"], stdin=inputs.get("stdin"), timeout=timeout)


def _image() -> Path:
    given = os.environ.get("KUBEADM_HA_ENGINE_IMAGE")
    if given:
        return Path(given)
    built = subprocess.run([str(HERE / "build-image")], capture_output=True, text=True, timeout=2400, check=False)
    if built.returncode != 0:
        pytest.fail(f"build-image failed:\n{built.stderr[-4000:]}", pytrace=False)
    return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    image = _image()
    # QEMU runs as libvirt-qemu: the disks must be reachable by it, so not under /tmp/pytest-of-root (0700).
    directory = Path(tempfile.mkdtemp(prefix="kubeadm-ha-engine-lab-", dir="/var/tmp"))
    directory.chmod(0o755)
    try:
        yield from _lab(image, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _lab(image: Path, directory: Path) -> Iterator[Lab]:
    evaluation = evaluate("lab", config=LAB_CONFIG)
    nodes = {name: planned_node(evaluation, name) for name in NODES}
    key = directory / "operator_ed25519"
    key.write_text(evaluation.named("operator-ssh-key").outputs["privateKeyOpenssh"])
    key.chmod(0o600)
    with running_libvirtd(directory / "libvirtd") as lv:
        network = evaluation.named("local-network").inputs["name"]
        xml = directory / "network.xml"
        xml.write_text(network_xml(evaluation, list(nodes.values())))
        lv.virsh("net-define", str(xml))
        lv.virsh("net-start", network)
        started = time.monotonic()
        for node in nodes.values():
            boot(lv, node, image, directory, network)
        ssh = {name: Ssh.pinned(node, key, directory) for name, node in nodes.items()}
        boot_seconds = {}
        for name, session in ssh.items():
            session.wait_until_up()
            boot_seconds[name] = time.monotonic() - started
        yield Lab(evaluation, lv, directory, nodes, ssh, boot_seconds)


def test_seed_applied_hostname_user_address_and_only_the_pinned_host_key(lab: Lab) -> None:
    for name, node in lab.nodes.items():
        facts = lab.ssh[name].run(
            "hostname; ip -o -4 addr show dev eth0; sudo -n true && echo sudo-ok; "
            "ls /etc/ssh/ | grep '^ssh_host_' | sort | tr '\\n' ' '"
        )
        assert facts.returncode == 0, facts.stderr
        lines = facts.stdout.splitlines()
        assert lines[0] == name
        assert f" {node.address}/24 " in lines[1], lines[1]
        assert lines[2] == "sudo-ok"
        assert lines[3].split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"], lines[3]
    print(f"boot to SSH (s): {lab.boot_seconds}")


def test_a_swapped_host_key_is_refused(lab: Lab) -> None:
    node = lab.nodes["lab-lb-1"]
    other = lab.nodes["lab-lb-2"].host_public_key  # a valid ed25519 key, not this node's
    swapped = Ssh.pinned(node, lab.ssh["lab-lb-1"].key, lab.directory, host_key=other)
    refused = swapped.run("true", timeout=60, attempts=3)
    assert refused.returncode != 0
    assert "Host key verification failed" in refused.stderr, refused.stderr


def test_readiness_steps_pass_on_load_balancers_and_fail_on_the_control_plane_naming_it(lab: Lab) -> None:
    """LBs need no Kubernetes package (haproxy, keepalived are in the image); the control plane does,
    and with no route out its node preparation fails: the first step needing Kubernetes packages."""
    for name in ("lab-lb-1", "lab-lb-2"):
        ready = lab.step(f"{name}-ready")
        assert ready.returncode == 0, ready.stderr
    failed = lab.step("lab-cp-1-ready")
    assert failed.returncode != 0
    assert "lab-cp-1" in failed.stderr, failed.stderr
    print(f"lab-cp-1-ready (expected failure):\n{failed.stderr}")


def _vip_holder(lab: Lab, vip: str) -> list[str]:
    holders = []
    for name in ("lab-lb-1", "lab-lb-2"):
        shown = lab.ssh[name].run("ip -o -4 addr show dev eth0")
        if f" {vip}/" in shown.stdout:
            holders.append(name)
    return holders


def _tcp_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def test_lb_steps_start_haproxy_and_keepalived_and_the_vip_fails_over(lab: Lab) -> None:
    for name in ("lab-lb-1", "lab-lb-2"):
        applied = lab.step(f"{name}-configure-lb", timeout=600)
        assert applied.returncode == 0, applied.stderr
        again = lab.step(f"{name}-configure-lb", timeout=600)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
        active = lab.ssh[name].run("systemctl is-active haproxy keepalived")
        assert active.stdout.split() == ["active", "active"], active.stdout
    vip = "10.17.9.10"
    deadline = time.monotonic() + 60
    while len(holders := _vip_holder(lab, vip)) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(holders) == 1, f"VIP held by {holders}"
    assert _tcp_open(vip, 6443), "HAProxy does not answer on the VIP from the host"
    holder = holders[0]
    other = "lab-lb-2" if holder == "lab-lb-1" else "lab-lb-1"
    stopped = time.monotonic()
    lab.ssh[holder].run("sudo systemctl stop haproxy")
    moved = None
    while time.monotonic() - stopped < 60:
        if _vip_holder(lab, vip) == [other] and _tcp_open(vip, 6443):
            moved = time.monotonic() - stopped
            break
        time.sleep(0.5)
    assert moved is not None, f"the VIP did not move from {holder} to {other} within 60 s"
    print(f"VIP failover {holder} -> {other}, seen from the host: {moved:.1f} s")
