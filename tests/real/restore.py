"""An etcd restore under a real Kubernetes control plane, proven: shared by the external-etcd lab
(tests/real/test_restore_live.py) and the stacked one (tests/real/test_stacked_control_plane_live.py).

`restore_and_prove`: ConfigMaps are created with kubectl through the VIP, the timer's snapshot script runs on
the first member and tools.etcd_backup copies the snapshot, one more ConfigMap is created, every member is killed
and wiped, tools.etcd_restore refuses while what came back answers a quorum read, and with --force restores
every member; through the VIP the ConfigMaps from before the snapshot are served, the later one is gone, and
kubectl creates a new one. Scripts run unmodified in the nodes' namespaces through NodeTransport, with the real
etcdctl/etcdutl behind the `ctr` stand-in of tests/integration/lab_nodes.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from render.backup import BackupPolicy, backup_script
from render.etcd import MANIFEST_PATH, STAGED_MANIFEST_PATH
from render.node_prep import STATIC_POD_DIR
from tests.integration.lab_nodes import fake_ctr
from tests.integration.netns import poll_until
from tests.real.binaries import binary
from tests.real.control_plane_lab import APISERVER_BOUND, COMPONENTS, ControlPlaneLab, Node, report
from tests.real.kubelet import Kubelet, node_tools
from tests.real.node_root import DEFAULT_PATH
from tests.real.node_transport import NodeTransport
from tools.access import StackAccess, ToolError, access_from_outputs
from tools.etcd_backup import backup
from tools.etcd_restore import restore
from tools.offline import Evaluation
from tools.plan import mask

BEFORE = tuple(f"kubeadm-ha-restore-before-{index}" for index in range(5))
AFTER = "kubeadm-ha-restore-after-snapshot"
WRITTEN = "kubeadm-ha-restore-after-restore"
ETCD_BOUND = 60.0
KUBECTL_BOUND = 60.0


class Kubectl:
    """The real kubectl in the client namespace, with the program's `kubeconfig` output."""

    def __init__(self, lab: ControlPlaneLab) -> None:
        self.lab = lab
        self.home = lab.work / "kubectl-home"
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.kubeconfig = self.home / "kubeconfig"
        fd = os.open(self.kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as sink:
            sink.write(lab.evaluation.outputs["kubeconfig"].value)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [self.lab.binaries["kubectl"], f"--kubeconfig={self.kubeconfig}", "--request-timeout=10s", *args]
        result = subprocess.run(
            self.lab.client.exec_argv(argv),
            capture_output=True,
            text=True,
            timeout=KUBECTL_BOUND,
            check=False,
            env={"PATH": DEFAULT_PATH, "HOME": str(self.home)},
        )
        return subprocess.CompletedProcess(argv, result.returncode, mask(result.stdout), mask(result.stderr))

    def create(self, name: str) -> None:
        ran = self("create", "configmap", name, "-n", "default", f"--from-literal=name={name}")
        assert ran.returncode == 0, ran.stdout + ran.stderr

    def value(self, name: str) -> str | None:
        """The ConfigMap's `name` key; None when the API says it does not exist."""
        ran = self("get", "configmap", name, "-n", "default", "-o", "jsonpath={.data.name}")
        if ran.returncode != 0 and "NotFound" in ran.stderr:
            return None
        assert ran.returncode == 0, ran.stdout + ran.stderr
        return ran.stdout


class RestoreLab:
    def __init__(self, lab: ControlPlaneLab, outputs: Evaluation | None = None) -> None:
        """`outputs`: the program run whose outputs the tools read (the lab's own by default)."""
        self.lab = lab
        self.members = list(lab.etcd_client_urls())
        self.control_planes = [plan.hostname for plan in lab.plan.control_planes]
        self.etcdutl = binary("etcdutl")
        values = {key: output.value for key, output in (outputs or lab.evaluation).outputs.items()}
        self.access: StackAccess = access_from_outputs(lab.stack, values)
        etcd_bin = Path(lab.binaries["etcdctl"]).parent
        tools = {}
        for name in [*self.members, *self.control_planes]:
            node = lab.nodes[name]
            # kubectl: the restore re-writes Secrets with the program's `encryption-rewrite` script.
            directory = node_tools(lab.work / f"restore-bin-{name}", {"kubectl": lab.binaries["kubectl"]})
            if name in self.members:
                # The manifest the member runs from: the program's staged one (external), kubeadm's (stacked).
                staged = STAGED_MANIFEST_PATH if lab.etcd_spec is not None else MANIFEST_PATH
                image = node.root.read(staged).split("image: ", 1)[1].split()[0]
                (directory / "ctr").write_text(fake_ctr(etcd_bin, image))
                (directory / "ctr").chmod(0o755)
            tools[name] = directory
        self.transport = NodeTransport(lab, tools)
        self.kubectl = Kubectl(lab)

    def place_etcd_manifests(self) -> None:
        """What each `etcd-member` step does last: the staged manifest into kubelet's directory (external etcd;
        kubeadm wrote the stacked members')."""
        if self.lab.etcd_spec is None:
            return
        temporary = f"{STATIC_POD_DIR}/.etcd.yaml.kubeadm-ha.tmp"
        for name in self.members:
            node = self.lab.nodes[name]
            for argv in (
                ["install", "-d", "-m", "0755", STATIC_POD_DIR],
                ["install", "-m", "0600", STAGED_MANIFEST_PATH, temporary],
                ["mv", "-f", temporary, MANIFEST_PATH],
            ):
                ran = node.root.run(argv, netns=node.namespace.name, timeout=30)
                assert ran.returncode == 0, ran.output

    def wipe(self, node: Node) -> None:
        ran = node.root.run(["rm", "-rf", "/var/lib/etcd"], netns=node.namespace.name, timeout=60)
        assert ran.returncode == 0, ran.output

    def api_ready(self) -> bool:
        return self.lab.request("GET", "/readyz", admin=False, timeout=3).status == 200

    def kubelet(self) -> Kubelet:
        """The kubelet stand-in for every etcd member and control-plane component of the lab (both on a stacked
        control plane)."""
        pods: dict[str, tuple[str, ...]] = {name: ("etcd",) for name in self.members}
        for name in self.control_planes:
            running = tuple(c for c in COMPONENTS if c in self.lab.nodes[name].processes)
            pods[name] = (*pods.get(name, ()), *running)
        return Kubelet(self.lab, pods)


def restore_and_prove(live: RestoreLab, kubelet: Kubelet, tmp_path: Path) -> None:
    """See the module."""
    lab, kubectl = live.lab, live.kubectl
    first = lab.nodes[live.members[0]]
    for name in BEFORE:
        kubectl.create(name)

    # The timer's script on the first member, then tools.etcd_backup copies the newest and verifies it.
    policy = BackupPolicy(lab.config.etcd.backup.interval_minutes, lab.config.etcd.backup.keep)
    snapshot_step = live.transport.run(
        live.access.nodes[first.name], backup_script(first.name, policy), timeout=300
    )  # the same script the timer's service runs
    assert snapshot_step.returncode == 0, snapshot_step.stderr.decode()
    started = time.monotonic()
    copied = backup(live.access, live.transport, tmp_path / "copied", now=False, etcdutl=live.etcdutl)
    report(
        f"tools.etcd_backup copied {copied.name} ({copied.stat().st_size} bytes) in {time.monotonic() - started:.1f}s"
    )
    kubectl.create(AFTER)
    assert kubectl.value(AFTER) == AFTER

    # Disaster: every member dies at once and loses its data; kubelet brings them back as an empty cluster.
    urls = list(lab.etcd_client_urls().values())
    kubelet.paused.set()
    kubelet.kill("etcd")
    for name in live.members:
        live.wipe(lab.nodes[name])
    kubelet.paused.clear()
    # External members come back as one new, empty cluster; stacked, only the first control plane's (kubeadm's
    # manifest makes it a new cluster of one; the others', joining an `existing` cluster, cannot start).
    poll_until(
        lambda: any(lab.etcdctl("endpoint", "health", endpoints=[url]).returncode == 0 for url in urls),
        timeout=ETCD_BOUND,
        interval=0.5,
        message="a wiped member to answer a quorum read",
    )

    # That empty cluster answers quorum reads: refused without --force.
    with pytest.raises(ToolError, match="healthy quorum"):
        restore(live.access, live.transport, copied, force=False)

    started = time.monotonic()
    timings = restore(live.access, live.transport, copied, force=True, restore_id="20260101T000000Z")
    took = time.monotonic() - started
    report("restore: " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in timings.items()) + f"; {took:.1f}s")
    held = [host for host, step in live.transport.ran if step == "etcd-restore-hold"]
    assert held[:3] == live.control_planes
    # Every API server was stopped by the hold (the controller managers and schedulers may have exited on their
    # own before: they lose their leases while etcd is empty, and kubelet restarts them).
    for name in live.control_planes:
        assert f"stopped kube-apiserver on {name}" in kubelet.events
    stops = kubelet.stop_seconds()
    report("kubelet stand-in stops: " + ", ".join(f"{what} {seconds:.1f}s" for what, seconds in stops.items()))

    # The API servers the restore put back serve the restored objects through the VIP.
    started = time.monotonic()
    poll_until(live.api_ready, timeout=APISERVER_BOUND, interval=1, message="the API through the VIP after the restore")
    for name in live.control_planes:
        lab.wait_apiserver_ready(name, timeout=APISERVER_BOUND)
    report(f"every kube-apiserver ready {time.monotonic() - started:.1f}s after the restore")
    for name in BEFORE:
        assert kubectl.value(name) == name
    assert kubectl.value(AFTER) is None
    kubectl.create(WRITTEN)
    assert kubectl.value(WRITTEN) == WRITTEN
    listing = kubectl("get", "configmaps", "-n", "default", "-o", "name")
    assert listing.returncode == 0, listing.stderr
    names = {line.removeprefix("configmap/") for line in listing.stdout.split()}
    assert set(BEFORE) | {WRITTEN} <= names and AFTER not in names
    for name in live.members:
        assert lab.nodes[name].root.path("/var/lib/etcd.before-restore-20260101T000000Z").is_dir()
    shutil.rmtree(tmp_path / "copied", ignore_errors=True)
