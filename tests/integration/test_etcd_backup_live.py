"""etcd backups and the restore, run for real: etcd 3.7, etcdctl and etcdutl in network namespaces.

prod's external etcd members run from the program's certificates and flags (tests/integration/
test_etcd_live.py builds them), each in its own namespace at its planned address, started and stopped
by a kubelet stand-in that follows the static pod manifest. The snapshot script the timer runs and every
script of the restore are the program's own renderers, run unmodified apart from their paths (moved under
each node's directory) through `NamespaceTransport`, which stands where SSH does in production; `ctr` is
a stand-in that checks its command line and runs the real etcdctl/etcdutl.

Proven: the timer's script takes a snapshot that etcdutl accepts (0600, in a 0700 directory, with its
digest), skips a run while a recent one exists, and keeps only the newest `keep`; tools.etcd_backup copies
the newest and verifies it; after every member is killed and its data wiped (the members come back as an
empty cluster), tools.etcd_restore refuses while that cluster has quorum, and with --force restores
every member from the snapshot: the keys written before it are back, the ones after it are not, the
revision is bumped, and the cluster takes writes. The control planes' manifests are held meanwhile.

Runs as root; needs iproute2 and the etcd 3.7 build (tests/real/build-binaries etcd etcdctl etcdutl).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from render.backup import BACKUP_DIR, BACKUP_SCRIPT_PATH, BackupPolicy, backup_script
from render.etcd import MANIFEST_PATH, STAGED_MANIFEST_PATH
from render.node_prep import STATIC_POD_DIR
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.lab_nodes import NODE_PGREP, LabNode, NamespaceTransport, StaticPods, fake_ctr
from tests.integration.netns import Lab, Namespace, cleanup_stale, poll_until
from tests.integration.test_etcd_live import STACK, EtcdLab, program, write
from tests.real.binaries import binary
from tools.access import StackAccess, ToolError, access_from_outputs
from tools.etcd_backup import backup
from tools.etcd_restore import restore
from tools.plan import bundle_by_path

pytestmark = pytest.mark.integration

FORM_BOUND = 40.0
POLICY = BackupPolicy(interval_minutes=60, keep=2)
CONTROL_PLANE_MANIFESTS = ("kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")


def report(message: str) -> None:
    print(f"[etcd-backup-live] {message}")


class BackupLab:
    """prod's etcd members and control planes as lab nodes, with the tools' view of the stack."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.etcd = binary("etcd")
        self.etcdctl = binary("etcdctl")
        self.etcdutl = binary("etcdutl")
        self.cluster = EtcdLab(lab, work, self.etcd, self.etcdctl)
        ev = program()
        outputs = {key: output.value for key, output in ev.outputs.items()}
        # Without Secrets' encryption at rest: its restore steps (a file on every control plane, Secrets re-written
        # through the API) need the API servers this etcd-only lab does not run, and would write the host's
        # /etc/kubernetes, which `localise` does not move. tests/real/test_encryption_live.py proves them.
        self.access: StackAccess = dataclasses.replace(
            access_from_outputs(STACK, outputs), encryption_key="", encryption_keys={}
        )
        self.nodes: dict[str, LabNode] = {}
        manifests = {}
        for name, live in self.cluster.members.items():
            root = self.cluster.node_root(name)
            bundle = bundle_by_path(ev.named(f"{name}-etcd-member").inputs["stdin"])
            manifest = Path(self.localise(name, MANIFEST_PATH))
            write(manifest, self.localise(name, bundle[STAGED_MANIFEST_PATH][1]), 0o600)
            image = bundle[STAGED_MANIFEST_PATH][1].split("image: ", 1)[1].split()[0]
            self.nodes[name] = self._node(name, live.namespace, root, image)
            manifests[name] = (live.namespace, manifest)
        # The control planes run no etcd; their API server manifests must be held during a restore.
        for node in self.access.role("cp"):
            namespace = lab.namespace(node.hostname.removeprefix(f"{STACK}-"))
            root = self.cluster.node_root(node.hostname)
            for held in CONTROL_PLANE_MANIFESTS:
                write(root / "manifests" / held, f"# {held} of {node.hostname}\n", 0o600)
            self.nodes[node.hostname] = self._node(node.hostname, namespace, root, image)
        self.transport = NamespaceTransport(self.nodes)
        self.pods = StaticPods(lab, self.etcd, manifests)

    def _node(self, name: str, namespace: Namespace, root: Path, image: str) -> LabNode:
        bin_dir = root / "bin"
        write(bin_dir / "pgrep", NODE_PGREP, 0o755)
        write(bin_dir / "ctr", fake_ctr(Path(self.etcd).parent, image), 0o755)
        return LabNode(self.access.nodes[name], namespace, root, lambda text: self.localise(name, text), bin_dir)

    def localise(self, name: str, text: str) -> str:
        root = self.cluster.node_root(name)
        text = text.replace(BACKUP_DIR, f"{root}/backups").replace(BACKUP_SCRIPT_PATH, f"{root}/sbin/backup")
        return self.cluster.localise(name, text)

    @property
    def urls(self) -> list[str]:
        return [member.client_url for member in self.cluster.spec.members]

    def put(self, key: str, value: str) -> bool:
        result = self.cluster.etcdctl("put", key, value, endpoints=self.urls, pair=self.cluster.apiserver)
        return result.returncode == 0 and result.stdout.strip() == "OK"

    def get(self, key: str) -> str | None:
        result = self.cluster.etcdctl(
            "get", key, "--print-value-only", endpoints=self.urls, pair=self.cluster.apiserver
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.rstrip("\n") or None

    def healthy(self) -> bool:
        return (
            self.cluster.etcdctl("endpoint", "health", endpoints=self.urls, pair=self.cluster.healthcheck).returncode
            == 0
        )

    def revision(self) -> int:
        result = self.cluster.etcdctl(
            "endpoint", "status", "-w", "json", endpoints=self.urls[:1], pair=self.cluster.healthcheck
        )
        assert result.returncode == 0, result.stderr
        return int(json.loads(result.stdout)[0]["Status"]["header"]["revision"])

    def run_backup(self, name: str, *, force: bool = False) -> str:
        """The timer's ExecStart on `name` (KUBEADM_HA_BACKUP_FORCE as `systemctl set-environment` would pass it)."""
        lab = self.nodes[name]
        text = lab.localise(backup_script(name, POLICY).render())
        env = ["/usr/bin/env", "-i", f"PATH={lab.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"]
        env += ["KUBEADM_HA_BACKUP_FORCE=1"] if force else []
        result = lab.namespace.run(*env, "bash", "-c", text, check=False, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.fixture
def backup_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackupLab]:
    require_root()
    require_programs("ip")
    cleanup_stale()
    lab = Lab("etcdbak", log_dir=tmp_path / "logs")
    try:
        live = BackupLab(lab, tmp_path / "work")
        with live.pods:
            started = time.monotonic()
            poll_until(live.healthy, timeout=FORM_BOUND, interval=0.3, message="prod's etcd members to form a cluster")
            report(f"{len(live.cluster.members)} members (etcd 3.7) healthy after {time.monotonic() - started:.1f}s")
            yield live
    finally:
        if phase_failed(request):
            print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs()}")
        lab.close()


def test_snapshots_restore_every_member_after_a_total_loss(backup_lab: BackupLab, tmp_path: Path) -> None:
    lab = backup_lab
    first = lab.cluster.spec.members[0].name
    for index in range(50):
        assert lab.put(f"/registry/kubeadm-ha/before/{index:03d}", f"value-{index}")

    # The timer's script: a verified snapshot, root-only, beside its digest; a second run is skipped.
    output = lab.run_backup(first)
    directory = lab.nodes[first].root / "backups"
    snapshots = sorted(directory.glob("etcd-*.db"))
    assert len(snapshots) == 1, output
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(snapshots[0].stat().st_mode) == 0o600
    digest = (directory / f"{snapshots[0].name}.sha256").read_text().split()[0]
    assert '"totalKey":' in output
    assert "already done" in lab.run_backup(first)
    # Forced runs (one per second: names carry the second) keep the newest `keep`.
    for _ in range(2):
        time.sleep(1.1)
        lab.run_backup(first, force=True)
    kept = sorted(directory.glob("etcd-*.db"))
    assert len(kept) == POLICY.keep and snapshots[0] not in kept
    assert len(list(directory.glob("*.sha256"))) == POLICY.keep and not list(directory.glob(".*part"))
    report(f"timer script: {len(kept)} snapshots kept of 3 taken; first digest {digest[:12]}")

    # tools.etcd_backup copies the newest and checks it; then the cluster moves on past the snapshot.
    out = tmp_path / "copied"
    started = time.monotonic()
    copied = backup(lab.access, lab.transport, out, now=False, etcdutl=lab.etcdutl)
    assert copied.name == kept[-1].name and stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert copied.read_bytes() == kept[-1].read_bytes()
    report(
        f"tools.etcd_backup copied {copied.name} ({copied.stat().st_size} bytes) in {time.monotonic() - started:.1f}s"
    )
    assert lab.put("/registry/kubeadm-ha/after-snapshot", "lost")
    revision_before = lab.revision()

    # Disaster: every member dies and loses its data; kubelet brings them back as an empty cluster.
    lab.pods.paused.set()
    lab.pods.kill_all()
    for name in lab.cluster.members:
        data = lab.cluster.node_root(name) / "data"
        shutil.rmtree(data, ignore_errors=True)
    lab.pods.paused.clear()
    poll_until(lab.healthy, timeout=FORM_BOUND, interval=0.3, message="the wiped members to form an empty cluster")
    assert lab.get("/registry/kubeadm-ha/before/000") is None

    # That empty cluster has quorum: the restore refuses without --force, and changes nothing.
    with pytest.raises(ToolError, match="healthy quorum"):
        restore(lab.access, lab.transport, copied, force=False)
    assert all(step == "etcd-quorum-probe" for _, step in lab.transport.ran[-3:])

    started = time.monotonic()
    timings = restore(lab.access, lab.transport, copied, force=True, restore_id="20260101T000000Z")
    took = time.monotonic() - started
    report("restore: " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in timings.items()) + f"; {took:.1f}s")

    # Every key of the snapshot is back, nothing written after it, revisions moved far ahead, writes work.
    for index in range(50):
        assert lab.get(f"/registry/kubeadm-ha/before/{index:03d}") == f"value-{index}"
    assert lab.get("/registry/kubeadm-ha/after-snapshot") is None
    assert lab.revision() > revision_before + 900_000_000
    assert lab.put("/registry/kubeadm-ha/after-restore", "written")
    assert lab.get("/registry/kubeadm-ha/after-restore") == "written"
    listing = lab.cluster.etcdctl("member", "list", "-w", "json", endpoints=lab.urls, pair=lab.cluster.healthcheck)
    members = {member["name"] for member in json.loads(listing.stdout)["members"]}
    assert members == set(lab.cluster.members)
    # The old data stays beside the restored one; the control planes got their manifests back.
    for name in lab.cluster.members:
        assert (lab.cluster.node_root(name) / "data.before-restore-20260101T000000Z").is_dir()
    for node in lab.access.role("cp"):
        manifests = lab.cluster.node_root(node.hostname) / "manifests"
        assert sorted(path.name for path in manifests.iterdir()) == sorted(CONTROL_PLANE_MANIFESTS)
    held = [(host, step) for host, step in lab.transport.ran if step == "etcd-restore-hold"]
    assert [host for host, _ in held][:3] == [node.hostname for node in lab.access.role("cp")]
    assert STATIC_POD_DIR in MANIFEST_PATH
