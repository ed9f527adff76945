"""Issue 19, parts 2 and 3: `pulumi up` of a lab stack with the real CLI, language host and plugins against a
libvirtd the test starts, then the no-op and drift checks.

Lab stack: 2 load balancers + 1 control plane, no workers, QEMU under TCG (`domainType: qemu`), the Debian
image from build-image given as `image: {url: PATH, sha256: ...}`. libvirtd runs in a network namespace of
its own with nothing but loopback (tests/real/engine/libvirtd.py): the program's NAT network has no route
out, and so do the guests. The control plane's node preparation cannot install containerd and the Kubernetes
packages there, so `up` is expected to stop at that node's readiness step (the air-gap issue takes over).

The first `up` runs with `--continue-on-error`: the LB branch does not depend on the control plane's, and
without it the engine stops scheduling at the first failure, so which LB steps ran would depend on which
guest finished booting first. Every later `up` is plain. The no-op checks exclude the control plane's
readiness step and what depends on it (`--exclude URN --exclude-dependents`): those steps cannot exist here,
and an `up` that creates them is, by construction, not a no-op. Everything that exists is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.real.engine.guest import Ssh, tcp_open
from tests.real.engine.lab_stack import LabStack, Run
from tests.real.engine.libvirtd import Libvirtd, network_namespace, running_libvirtd

HERE = Path(__file__).resolve().parent
STACK = "lab"
CIDR = "10.17.9.0/24"
VIP = "10.17.9.10"
LBS = ("lab-lb-1", "lab-lb-2")
CP = "lab-cp-1"
NODES = (*LBS, CP)
# TCG boots took 196-358 s per guest with three at once; the readiness step's own bound is 1800 s.
UP_TIMEOUT_SECONDS = 2400
QUICK_TIMEOUT_SECONDS = 600
FAILOVER_SECONDS = 60


def lab_config(image: Path, sha256: str, uri: str) -> dict[str, Any]:
    return {
        "kubeadm-ha:clusterName": "lab",
        "kubeadm-ha:network": {"mode": "nat", "cidr": CIDR},
        "kubeadm-ha:image": {"url": str(image), "sha256": sha256},
        "kubeadm-ha:hypervisors": [{"name": "local", "uri": uri, "domainType": "qemu"}],
        "kubeadm-ha:loadBalancer": {"replicas": 2, "cpus": 1, "memoryMiB": 512, "diskGiB": 10},
        "kubeadm-ha:controlPlane": {"replicas": 1, "cpus": 2, "memoryMiB": 2048, "diskGiB": 20},
        "kubeadm-ha:workers": {"replicas": 0},
    }


@dataclass
class Lab:
    stack: LabStack
    libvirtd: Libvirtd
    directory: Path
    first_up: Run
    ssh: dict[str, Ssh] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def urn(self, name: str) -> str:
        """The URN of the program's resource `name`, from the first up's plan (it lists every resource)."""
        for document in self.first_up.documents():
            for step in document.get("steps", []):
                if step["urn"].endswith(f"::{name}"):
                    return str(step["urn"])
        raise AssertionError(f"{name} is not in the first up's plan")

    @property
    def cp_ready(self) -> str:
        return self.urn(f"{CP}-ready")

    def lb_step(self, hostname: str, step: str) -> str:
        return self.urn(f"{hostname}-{step}")

    def excluded(self) -> list[str]:
        return ["--exclude", self.cp_ready, "--exclude-dependents"]


def _image() -> Path:
    given = os.environ.get("KUBEADM_HA_ENGINE_IMAGE")
    if given:
        return Path(given) / "disk.qcow2"
    built = subprocess.run([str(HERE / "build-image")], capture_output=True, text=True, timeout=2400, check=False)
    if built.returncode != 0:
        pytest.fail(f"build-image failed:\n{built.stderr[-4000:]}", pytrace=False)
    return Path(built.stdout.strip().splitlines()[-1]) / "disk.qcow2"


def _sha256(path: Path) -> str:
    done = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.split()[0]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    image = _image()
    # QEMU runs as libvirt-qemu: the pool must be reachable by it, so not under /tmp/pytest-of-root (0700).
    directory = Path(tempfile.mkdtemp(prefix="kubeadm-ha-engine-up-", dir="/var/tmp"))
    directory.chmod(0o755)
    try:
        with (
            network_namespace(f"kha-lab-{os.getpid()}") as netns,
            running_libvirtd(directory / "libvirtd", netns) as lv,
        ):
            yield from _deployed(lv, image, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _deployed(lv: Libvirtd, image: Path, directory: Path) -> Iterator[Lab]:
    pool = directory / "pool"
    pool.mkdir(mode=0o755)
    lv.virsh("pool-define-as", "default", "dir", "--target", str(pool))
    lv.virsh("pool-start", "default")
    stack = LabStack(directory / "pulumi", STACK, lv.prefix()).setup(lab_config(image, _sha256(image), lv.uri))
    first = stack.pulumi("up", "--yes", "--json", "--continue-on-error", timeout=UP_TIMEOUT_SECONDS)
    lab = Lab(stack, lv, directory, first)
    try:
        _connect(lab)
        yield lab
    finally:
        destroyed = stack.pulumi("destroy", "--yes", "--json", timeout=QUICK_TIMEOUT_SECONDS)
        left = {kind: lv.names(kind) for kind in ("domain", "network")}
        left["volumes"] = lv.volumes("default")
        # Then running_libvirtd removes whatever is left, and the lab directory (state, logs) goes.
        print(f"teardown: pulumi destroy exit {destroyed.returncode} in {destroyed.seconds:.0f} s; left: {left}")


def _connect(lab: Lab) -> None:
    """SSH sessions to each node from the stack's outputs (operator key in a 0600 file, never printed)."""
    nodes = lab.stack.output("nodes")
    host_keys = lab.stack.output("hostKeys")
    user = lab.stack.output("sshUser")
    key = lab.directory / "operator_ed25519"
    key.touch(mode=0o600)
    key.write_text(lab.stack.secret_output("sshPrivateKey") + "\n")
    for name in NODES:
        lab.ssh[name] = Ssh.pinned(
            name, nodes[name]["address"], user, key, host_keys[name], lab.directory, lab.libvirtd.prefix()
        )


# --- Part 2: the real up ------------------------------------------------------------------------------------------


def test_up_boots_the_nodes_with_the_programs_cloud_init_and_pinned_host_keys(lab: Lab) -> None:
    assert lab.first_up.returncode != 0, lab.first_up.describe()  # the control plane's preparation fails
    resources = lab.stack.resources()
    for name in NODES:
        assert any(urn.endswith(f"::{name}-domain") for urn in resources), f"{name}-domain not created"
        facts = lab.ssh[name].run(
            "hostname; ip -o -4 addr show dev eth0 | grep -v secondary; sudo -n true && echo sudo-ok; "
            "ls /etc/ssh/ | grep '^ssh_host_' | sort | tr '\\n' ' '; echo; "
            "sudo -n cloud-init query --format '{{ v1.platform }} {{ v1.subplatform }}'"
        )
        assert facts.returncode == 0, facts.stderr
        lines = facts.stdout.splitlines()
        assert lines[0] == name
        assert f" {lab.ssh[name].address}/24 " in lines[1], lines[1]
        assert lines[2] == "sudo-ok"
        assert lines[3].split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"], lines[3]
        # cloud-init read the program's seed from the provider's ISO: NoCloud from a config disk.
        assert "nocloud" in facts.stdout and "config-disk" in facts.stdout, facts.stdout
    # The domain as the provider defined it from the program's values.
    xml = lab.libvirtd.virsh("dumpxml", CP).stdout
    assert "<domain type='qemu'" in xml and "mode='maximum'" in xml, xml
    assert "type='vnc'" in xml and "127.0.0.1" in xml, xml
    # Nothing downloaded: only the three plugins installed from files, and the language host from PATH.
    plugins = sorted(path.name for path in (lab.stack.base / "pulumi-home" / "plugins").iterdir() if path.is_dir())
    assert [name.split("-v")[0] for name in plugins] == ["resource-command", "resource-libvirt", "resource-tls"], (
        plugins
    )


def test_control_plane_preparation_stops_up_naming_the_host_and_the_step(lab: Lab) -> None:
    errors = lab.first_up.errors()
    assert "lab-cp-1" in errors and "node preparation did not complete" in errors, lab.first_up.describe()
    resources = lab.stack.resources()
    assert lab.cp_ready not in resources  # a failed create records nothing
    for name in ("place-pki", "kubeadm-init"):
        assert not any(urn.endswith(f"::{CP}-{name}") for urn in resources), name
    # The LB branch ran to its end.
    for hostname in LBS:
        for step in ("ready", "configure-lb"):
            assert lab.lb_step(hostname, step) in resources, f"{hostname}-{step} not created"
    lab.notes["timeline"] = _timeline(lab, lab.first_up)


def _vip_holders(lab: Lab) -> list[str]:
    return [name for name in LBS if f" {VIP}/" in lab.ssh[name].run("ip -o -4 addr show dev eth0").stdout]


def test_lb_steps_run_and_the_vip_fails_over(lab: Lab) -> None:
    for name in LBS:
        active = lab.ssh[name].run("systemctl is-active haproxy keepalived")
        assert active.stdout.split() == ["active", "active"], active.stdout
    deadline = time.monotonic() + FAILOVER_SECONDS
    while len(holders := _vip_holders(lab)) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(holders) == 1, f"VIP held by {holders}"
    assert tcp_open(lab.libvirtd.prefix(), VIP, 6443), "HAProxy does not answer on the VIP"
    holder = holders[0]
    other = LBS[1] if holder == LBS[0] else LBS[0]
    stopped = time.monotonic()
    lab.ssh[holder].run("sudo -n systemctl stop haproxy")
    moved = None
    try:
        while time.monotonic() - stopped < FAILOVER_SECONDS:
            if _vip_holders(lab) == [other] and tcp_open(lab.libvirtd.prefix(), VIP, 6443):
                moved = time.monotonic() - stopped
                break
            time.sleep(0.5)
    finally:
        lab.ssh[holder].run("sudo -n systemctl start haproxy")
    assert moved is not None, f"the VIP did not move from {holder} to {other} within {FAILOVER_SECONDS} s"
    print(f"VIP failover {holder} -> {other}: {moved:.1f} s")


def test_a_rerun_touches_nothing_before_the_failed_step(lab: Lab) -> None:
    before = lab.stack.resources()
    rerun = lab.stack.pulumi("up", "--yes", "--json", timeout=UP_TIMEOUT_SECONDS)
    assert rerun.returncode != 0, rerun.describe()
    assert "lab-cp-1" in rerun.errors() and "node preparation did not complete" in rerun.errors(), rerun.describe()
    steps = rerun.steps()
    changed = {urn: op for urn, op in steps.items() if op != "same"}
    assert changed == {lab.cp_ready: "create"}, changed
    after = lab.stack.resources()
    touched = [
        urn for urn, resource in before.items() if after.get(urn, {}).get("modified") != resource.get("modified")
    ]
    assert touched == [], touched
    print(f"re-run: {rerun.seconds:.0f} s, {len(steps)} steps, only {CP}-ready attempted again")


# --- Part 3: no-op and drift ------------------------------------------------------------------------------------


def _changes(run: Run) -> dict[str, str]:
    return {urn: op for urn, op in run.steps().items() if op not in ("same", "read")}


def test_a_second_up_changes_nothing(lab: Lab) -> None:
    again = lab.stack.pulumi(
        "up", "--yes", "--json", "--expect-no-changes", *lab.excluded(), timeout=QUICK_TIMEOUT_SECONDS
    )
    assert again.returncode == 0, again.describe() + json.dumps(_changes(again), indent=1)
    assert _changes(again) == {}


def test_refresh_finds_no_drift(lab: Lab) -> None:
    refreshed = lab.stack.pulumi("refresh", "--yes", "--json", "--expect-no-changes", timeout=QUICK_TIMEOUT_SECONDS)
    assert refreshed.returncode == 0, refreshed.describe() + json.dumps(_changes(refreshed), indent=1)


def test_preview_after_refresh_plans_nothing(lab: Lab) -> None:
    preview = lab.stack.pulumi(
        "preview", "--json", "--expect-no-changes", *lab.excluded(), timeout=QUICK_TIMEOUT_SECONDS
    )
    assert preview.returncode == 0, preview.describe() + json.dumps(_changes(preview), indent=1)
    # Without the exclusion: only the control plane's readiness step and the steps after it, all creates.
    full = lab.stack.pulumi("preview", "--json", timeout=QUICK_TIMEOUT_SECONDS)
    assert full.returncode == 0, full.describe()
    changes = _changes(full)
    assert lab.cp_ready in changes and set(changes.values()) == {"create"}, changes
    assert all(f"::{CP}-" in urn for urn in changes), changes


def test_a_swapped_host_key_is_refused_by_the_real_provider(lab: Lab) -> None:
    """lb-2 answers with another host key (a machine in its place): the real pulumi-command refuses to run
    the program's step there. The key is put back afterwards."""
    node = lab.ssh[LBS[1]]
    swap = (
        "sudo -n cp -a /etc/ssh/ssh_host_ed25519_key /root/pinned_key && sudo -n rm -f /etc/ssh/ssh_host_ed25519_key"
        " && sudo -n ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && sudo -n systemctl restart ssh"
    )
    assert node.run(swap).returncode == 0
    restore = (
        "sudo -n cp -a /root/pinned_key /etc/ssh/ssh_host_ed25519_key && sudo -n rm -f /root/pinned_key"
        " && sudo -n systemctl restart ssh"
    )
    try:
        refused = lab.stack.pulumi(
            "up",
            "--yes",
            "--json",
            "--target-replace",
            lab.lb_step(LBS[1], "configure-lb"),
            timeout=QUICK_TIMEOUT_SECONDS,
        )
    finally:
        # Our own ssh now fails host key verification too: restore through a session pinned to the new key.
        new_key = subprocess.run(
            [*lab.libvirtd.prefix(), "ssh-keyscan", "-t", "ed25519", node.address],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split(maxsplit=1)[-1]
        swapped = Ssh.pinned(
            node.hostname, node.address, node.user, node.key, new_key, lab.directory, list(node.prefix)
        )
        restored = swapped.run(restore)
    assert refused.returncode != 0, refused.describe()
    assert "host key mismatch" in refused.output, refused.describe()
    assert restored.returncode == 0, restored.stderr
    assert node.run("true").returncode == 0  # the pinned key answers again


def test_wall_time_of_the_real_up(lab: Lab) -> None:
    timeline = lab.notes.get("timeline")
    assert timeline, "the first up's timeline was not taken"
    print("real `pulumi up` (first, TCG): " + ", ".join(f"{key} {value:.0f} s" for key, value in timeline.items()))


# --- timing ---------------------------------------------------------------------------------------------------------


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _timeline(lab: Lab, up: Run) -> dict[str, float]:
    """The first up's wall time split: boot (domain create starts -> cloud-init's final stage starts), node
    preparation (cloud-init's final stage: its runcmd is the preparation), LB steps (configure-lb), and the rest
    (preview, keys, image, volumes, network, the readiness steps noticing). Engine times are its events'
    timestamps; guest times are cloud-init's status.json (the guest clock is the host's RTC)."""
    times = {urn.rsplit("::", 1)[1]: span for urn, span in up.step_times().items()}
    boot, prep = [], []
    for name in NODES:
        asked = time.time()
        shown = lab.ssh[name].run("date +%s.%N; cut -d' ' -f1 /proc/uptime; sudo -n cat /run/cloud-init/status.json")
        guest_now, uptime, status = shown.stdout.split("\n", 2)
        # Guest time to host time; cloud-init's stage times may be seconds since boot rather than since the epoch.
        offset = float(guest_now) - (asked + time.time()) / 2
        booted = float(guest_now) - float(uptime)

        def host_time(value: float, booted: float = booted, offset: float = offset) -> float:
            return (value if value > 1e9 else booted + value) - offset

        final = json.loads(status)["v1"]["modules-final"]
        start, finished = host_time(float(final["start"])), host_time(float(final["finished"] or final["start"]))
        boot.append((times[f"{name}-domain"][0], start))
        prep.append((start, finished))
    spans = {
        "boot": [(min(s for s, _ in boot), max(e for _, e in boot))],
        "node preparation": prep,
        "LB steps": [times[f"{name}-configure-lb"] for name in LBS],
    }
    timeline = {"total": up.seconds, **{key: _union(value) for key, value in spans.items()}}
    timeline["rest"] = up.seconds - _union([span for value in spans.values() for span in value])
    return timeline
