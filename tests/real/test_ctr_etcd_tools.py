"""`kha_etcdctl` / `kha_etcdutl` (render/backup.py `etcd_tool_functions`) through the real `ctr run`.

Every other test replaces `ctr` with a stand-in (tests/integration/lab_nodes.py `fake_ctr`); here the command
line the program renders reaches a real containerd 2.2 (daemon, `ctr` and the runc shim built from
github.com/containerd/containerd/v2 by tests/real/build-binaries), Debian's runc, and a real etcd 3.7 with
TLS client-certificate auth, as on a node: containerd, etcd and the scripts share one network namespace, so
`--net-host` reaches the member at https://127.0.0.1:2379 (the container gets the network namespace of
containerd's shim, not of the `ctr` that asked for it).

Real: containerd (overlayfs snapshotter, its own config, root, state and socket), ctr, the shim, runc, etcd,
and the etcdctl/etcdutl inside the container; the etcd manifest prod's first member gets
(`render_manifest`), whose image the functions read; the scripts, rendered by the program and run by bash.
Stand-ins: the etcd image is built locally, with the real etcdctl and etcdutl at /usr/local/bin (where the
registry.k8s.io/etcd image has them, on its PATH), because registries cannot be reached from the test
machine; it is imported under the manifest's name. The certificates are the test's own (a CA, a server
certificate for 127.0.0.1, a client certificate at the healthcheck client's paths), and etcd runs with the
test's flags. The scripts' paths (/etc/kubernetes/..., /var/backups/..., the log and state directories) are
replaced by temporary ones in the rendered text, nothing else; `ctr` finds the daemon through
CONTAINERD_ADDRESS, which it reads in place of a missing `--address`.

Proven: `kha_etcdctl endpoint health` succeeds and the restore's quorum probe says `quorum`; `put`/`get`
round-trip, and the key is in etcd (read back without the container); the timer's script (`backup_script`)
takes a snapshot through `ctr run` into the bind-mounted backup directory, which `kha_etcdutl snapshot
status` accepts; `--rm` leaves no container or task behind; a manifest naming an image the node does not
have makes the step fail with ctr's own message and keep no snapshot.

Runs as root; needs iproute2, util-linux (nsenter), runc (Debian), and tests/real/build-binaries containerd
ctr containerd-shim-runc-v2 etcd etcdctl etcdutl. Under CI=true missing ones fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from components.etcd import plan_membership
from model.addressing import plan_addresses
from model.previous import NEW_STACK
from model.stack import config_from_stack_file
from model.versions import DEFAULT_KUBERNETES, release_for
from render.backup import BACKUP_DIR, HELD_MANIFEST_DIR, BackupPolicy, backup_script
from render.backup import etcd_tool_functions as tool_functions
from render.etcd import ETCD_IMAGE_REPOSITORY, MANIFEST_PATH, EtcdPaths, render_manifest
from render.etcd_restore import quorum_probe_script
from render.scripts import LOG_DIR, STATE_DIR, Script
from tests.certificates import issue
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, Namespace, Process, cleanup_stale, poll_until, scratch_dir
from tests.real.binaries import binary

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
STACK = "prod"
NAMESPACE = "k8s.io"
PATHS = EtcdPaths()
CERT_DIR = os.path.dirname(PATHS.trusted_ca)
POLICY = BackupPolicy(interval_minutes=60, keep=2)
MISSING_IMAGE = f"{ETCD_IMAGE_REPOSITORY}:0.0.0-not-on-this-node"
START_BOUND = 30.0
SCRIPT_BOUND = 120.0
CTR_BOUND = 60.0
SNAPSHOTTER = "overlayfs"
# Where containerd 2.2 and runc keep state outside `--root`/`--state` whatever the config says (the shim sockets,
# runc's state, ctr's stdio fifos, the container cgroups): removed after the run unless they were there before.
RUN_DIR = Path("/run/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def report(message: str) -> None:
    print(f"[ctr-etcd] {message}")


def member_manifest() -> tuple[str, str, str]:
    """(hostname, manifest, image) of prod's first etcd member, as the program renders them."""
    config = config_from_stack_file(str(REPO / f"Pulumi.{STACK}.yaml"), STACK)
    spec = plan_membership(config, plan_addresses(config), NEW_STACK)
    member = spec.members[0]
    return member.name, render_manifest(member, spec), spec.image


# ----------------------------------------------------------------------------- certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pki(directory: Path) -> dict[str, Path]:
    """An etcd CA, a server pair for 127.0.0.1, and the healthcheck client's pair, by their kubeadm file names."""
    directory.mkdir(parents=True, mode=0o700)
    ca_key = _key()
    ca = issue("etcd-ca", ca_key)
    server_key, client_key = _key(), _key()
    server = issue(
        "etcd-server", server_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.SERVER_AUTH], ips=("127.0.0.1",)
    )
    client = issue("kube-etcd-healthcheck-client", client_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": (os.path.basename(PATHS.trusted_ca), ca.public_bytes(serialization.Encoding.PEM)),
        "server-cert": ("server.crt", server.public_bytes(serialization.Encoding.PEM)),
        "server-key": ("server.key", _pem_key(server_key)),
        "client-cert": (os.path.basename(PATHS.healthcheck_cert), client.public_bytes(serialization.Encoding.PEM)),
        "client-key": (os.path.basename(PATHS.healthcheck_key), _pem_key(client_key)),
    }
    paths = {}
    for role, (name, content) in files.items():
        path = directory / name
        path.write_bytes(content)
        path.chmod(0o600)
        paths[role] = path
    return paths


# ----------------------------------------------------------------------------- the etcd image


def _blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_etcd_image(work: Path, name: str, tools: dict[str, str]) -> Path:
    """An OCI image archive: one uncompressed layer with `tools` in /usr/local/bin, a config with PATH, `name`."""
    layout = work / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_path = work / "layer.tar"
    with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as layer:
        for directory in ("usr", "usr/local", "usr/local/bin"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        for tool, source in tools.items():
            info = layer.gettarinfo(source, arcname=f"usr/local/bin/{tool}")
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755
            with open(source, "rb") as handle:
                layer.addfile(info, handle)
    digest = hashlib.sha256()
    with open(layer_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    layer_digest = f"sha256:{digest.hexdigest()}"
    layer_size = layer_path.stat().st_size
    layer_path.rename(blobs / digest.hexdigest())
    architecture = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        # Uncompressed, the layer's digest is its diff ID.
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(blobs, json.dumps(config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(blobs, json.dumps(manifest).encode()),
                # `ctr images import` names the image after this annotation.
                "annotations": {"io.containerd.image.name": name},
            }
        ],
    }
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps(index))
    archive = work / "etcd-image.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in ("oci-layout", "index.json", "blobs"):
            tar.add(layout / entry, arcname=entry)
    shutil.rmtree(layout)
    return archive


# ----------------------------------------------------------------------------- the node


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class CtrNode:
    """One etcd member's node: containerd, etcd and the scripts in one network namespace."""

    namespace: Namespace
    work: Path
    socket: Path
    ctr: str
    etcdctl: str
    host: str
    manifest: str
    image: str
    pki: dict[str, Path]

    def ctr_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.ctr, "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            capture_output=True, text=True, timeout=CTR_BOUND, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def containers(self) -> list[str]:
        listed = self.ctr_run("containers", "list", "--quiet")
        assert listed.returncode == 0, listed.stderr
        tasks = self.ctr_run("tasks", "list", "--quiet")
        assert tasks.returncode == 0, tasks.stderr
        return listed.stdout.split() + tasks.stdout.split()

    def remove_containers(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            for container in self.ctr_run("containers", "list", "--quiet").stdout.split():
                self.ctr_run("tasks", "delete", "--force", container)
                self.ctr_run("containers", "delete", container)

    def etcd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The host's etcdctl, without any container: what etcd really holds."""
        return self.namespace.run(
            self.etcdctl, "--endpoints=https://127.0.0.1:2379", f"--cacert={self.pki['ca']}",
            f"--cert={self.pki['client-cert']}", f"--key={self.pki['client-key']}", "--dial-timeout=3s",
            "--command-timeout=10s", *args, check=False, timeout=30,
        )  # fmt: skip

    def localise(self, text: str, root: Path) -> str:
        """The rendered script with every node path moved: certificates to the node's, the rest under `root`."""
        moves = {
            MANIFEST_PATH: root / "manifests" / "etcd.yaml",
            HELD_MANIFEST_DIR: root / "restore-held",
            CERT_DIR: self.pki["ca"].parent,
            BACKUP_DIR: root / "backups",
            LOG_DIR: root / "log",
            STATE_DIR: root / "state",
        }
        for original, moved in moves.items():
            text = text.replace(original, str(moved))
        for original in ("/etc/kubernetes", "/var/"):
            assert original not in text, f"{original} is still in the script"
        return text

    def run(self, script: Script, root: Path, *, image: str | None = None) -> Ran:
        """`script` as the node runs it (bash, as root, in the network namespace), the manifest naming `image`."""
        manifest = root / "manifests" / "etcd.yaml"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        text = self.manifest.replace(f"image: {self.image}", f"image: {image or self.image}")
        assert f"image: {image or self.image}\n" in text, text
        manifest.write_text(text)
        env = [
            "/usr/bin/env", "-i", f"PATH={os.path.dirname(self.ctr)}:/usr/sbin:/usr/bin:/sbin:/bin",
            f"CONTAINERD_ADDRESS={self.socket}",
        ]  # fmt: skip
        argv = self.namespace.exec_argv([*env, "bash", "-c", self.localise(script.render(), root), script.step])
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=SCRIPT_BOUND, check=False, stdin=subprocess.DEVNULL
        )
        ran = Ran(result.returncode, result.stdout, result.stderr)
        # `--rm`: each `ctr run` deletes its container and task, whatever the tool's exit.
        assert self.containers() == [], f"containers left behind after {script.step}\n{ran.output}"
        return ran


def containerd_config(work: Path, socket: Path) -> str:
    # Only what `ctr run` needs: no CRI (no kubelet here), no NRI socket and no /opt/containerd on the host.
    disabled = [
        "io.containerd.grpc.v1.cri",
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.podsandbox.controller.v1.podsandbox",
        "io.containerd.nri.v1.nri",
        "io.containerd.internal.v1.opt",
    ]
    return "\n".join(
        [
            "version = 3",
            f'root = "{work / "root"}"',
            f'state = "{work / "state"}"',
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]",
            f'  address = "{socket}"',
            "[ttrpc]",
            f'  address = "{socket}.ttrpc"',
            "",
        ]
    )


def start_containerd(
    lab: Lab, namespace: Namespace, work: Path, binaries: dict[str, str], nsenter: str, name: str = "containerd"
) -> Path:
    """A containerd in `namespace` (root, state and socket under `work`), logging to `name`.log; its socket."""
    socket = work / "containerd.sock"
    config = work / "containerd.toml"
    config.write_text(containerd_config(work, socket))
    argv = [binaries["containerd"], "--config", str(config), "--log-level", "info"]
    log_path = lab.log_dir / f"{name}.log"
    # nsenter joins the network namespace only: `ip netns exec` also remounts /sys, which hides the cgroup v1
    # hierarchies from runc ("no cgroup mount found in mountinfo").
    full = [nsenter, f"--net={namespace.path}", "--", *argv]
    # The shim and runc are found on PATH, as the containerd package installs them.
    env = {"PATH": f"{os.path.dirname(binaries['containerd'])}:/usr/sbin:/usr/bin:/sbin:/bin"}
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    process = Process(name, namespace, argv, log_path, popen)
    lab.processes.append(process)

    def ready() -> bool:
        assert process.alive(), f"containerd exited {popen.returncode}"
        result = subprocess.run(
            [binaries["ctr"], "--address", str(socket), "version"], capture_output=True, timeout=5, check=False
        )
        return result.returncode == 0

    poll_until(ready, timeout=START_BOUND, interval=0.2, message="containerd to answer on its socket")
    return socket


def start_etcd(lab: Lab, namespace: Namespace, work: Path, etcd: str, pki: dict[str, Path]) -> Process:
    data = work / "etcd-data"
    data.mkdir(mode=0o700)
    argv = [
        etcd, "--name=member", f"--data-dir={data}",
        "--listen-client-urls=https://127.0.0.1:2379", "--advertise-client-urls=https://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=member=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381",
        "--client-cert-auth=true", f"--trusted-ca-file={pki['ca']}",
        f"--cert-file={pki['server-cert']}", f"--key-file={pki['server-key']}",
    ]  # fmt: skip
    return lab.spawn(namespace, ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv], name="etcd")


def unmount_under(root: Path) -> None:
    """Unmount whatever is still mounted below `root` (a killed containerd leaves its overlay mounts), deepest first."""
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4].encode().decode("unicode_escape") for line in handle]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True, timeout=30, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def remove_empty_dirs(top: Path) -> None:
    """Remove `top` and the directories below it, bottom up, while they are empty (cgroupfs takes rmdir only)."""
    if not top.is_dir():
        return
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def containerd_running() -> bool:
    """A containerd or shim (comm is cut at 15 characters) that is not a zombie waiting for its parent."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            comm, _, rest = stat_file.read_text().rpartition(")")
            if comm.split("(", 1)[1] in ("containerd", "containerd-shim") and rest.split()[0] != "Z":
                return True
    return False


def sweep_run_dir(runc: str) -> None:
    """Remove RUN_DIR, which this run created. A killed daemon leaves runc state, shim sockets and ctr's fifos in
    it; while some containerd runs (another run's) only empty directories go, as its may be among them."""
    if containerd_running():
        remove_empty_dirs(RUN_DIR)
        return
    state = RUN_DIR / "runc" / NAMESPACE
    for container in sorted(state.iterdir()) if state.is_dir() else ():
        argv = [runc, "--root", str(state), "delete", "--force", container.name]
        subprocess.run(argv, capture_output=True, timeout=30, check=False)
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def stop_containerd(lab: Lab) -> None:
    """Stop the lab's containerd daemons (TERM, so each unmounts what it can) before `lab.close()` kills the rest."""
    for process in lab.processes:
        if process.name.startswith("containerd"):
            process.stop(signal.SIGTERM, timeout=10)


@dataclass
class HostState:
    """What a containerd run leaves outside its daemons, to be removed once they are stopped: mounts under the test's
    directory (`work`, removed too), RUN_DIR if this run created it, new k8s.io cgroups."""

    work: Path
    run_dir_existed: bool
    cgroups: set[Path]

    @classmethod
    def before(cls, work: Path) -> HostState:
        return cls(work, RUN_DIR.exists(), set(CGROUP_ROOT.glob(f"*/{NAMESPACE}")))

    def restore(self, runc: str) -> None:
        unmount_under(self.work)
        if not self.run_dir_existed:
            sweep_run_dir(runc)
        for cgroup in set(CGROUP_ROOT.glob(f"*/{NAMESPACE}")) - self.cgroups:
            remove_empty_dirs(cgroup)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest) -> Iterator[CtrNode]:
    require_root()
    programs = require_programs("ip", "nsenter", "runc", "umount", "bash", "timeout")
    binaries = {
        name: binary(name) for name in ("containerd", "ctr", "containerd-shim-runc-v2", "etcd", "etcdctl", "etcdutl")
    }
    cleanup_stale()
    host, manifest, image = member_manifest()
    assert image == f"{ETCD_IMAGE_REPOSITORY}:{release_for(DEFAULT_KUBERNETES).etcd_image_tag}", image
    work = scratch_dir("ctr")
    host_state = HostState.before(work)
    lab = Lab("ctr", log_dir=work / "logs")
    live: CtrNode | None = None
    failed = False
    failures = request.session.testsfailed
    try:
        namespace = lab.namespace("node")
        pki = write_pki(work / "pki" / "etcd")
        etcd = start_etcd(lab, namespace, work, binaries["etcd"], pki)
        live = CtrNode(namespace, work, work / "containerd.sock", binaries["ctr"], binaries["etcdctl"], host,
                       manifest, image, pki)  # fmt: skip

        def healthy() -> bool:
            assert etcd.alive(), "etcd exited"
            return live.etcd("endpoint", "health").returncode == 0

        poll_until(healthy, timeout=START_BOUND, interval=0.3, message="etcd to answer with TLS")
        live.socket = start_containerd(lab, namespace, work, binaries, programs["nsenter"])
        archive = build_etcd_image(work, image, {"etcdctl": binaries["etcdctl"], "etcdutl": binaries["etcdutl"]})
        imported = live.ctr_run("images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr
        archive.unlink()
        listed = live.ctr_run("images", "list", "--quiet")
        assert listed.stdout.split() == [image], listed.stdout + listed.stderr
        # Unpacked into the snapshotter `ctr run` uses by default, as on the nodes.
        snapshots = live.ctr_run("snapshots", "--snapshotter", SNAPSHOTTER, "list")
        assert len(snapshots.stdout.splitlines()) > 1, snapshots.stdout + snapshots.stderr
        report(f"containerd ({SNAPSHOTTER} snapshotter) holds {image}; etcd answers on https://127.0.0.1:2379")
        yield live
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request) or request.session.testsfailed > failures:
            print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs(tail=30)}")
        if live is not None and live.socket.exists():
            # Through the daemon first: a container a failed test left running takes its runc state, cgroups and
            # rootfs mount with it; what a kill would leave is swept below.
            live.remove_containers()
        stop_containerd(lab)
        lab.close()
        host_state.restore(programs["runc"])


def tools_script(node: CtrNode, step: str, *body: str, writable: tuple[str, ...] = ()) -> Script:
    """`body` after the functions every etcd script gets, run as the restore's probes are (on_node=False)."""
    return Script(
        step=step, host=node.host, done_when="false", functions=tool_functions(writable=writable), on_node=False,
        body=body,
    )  # fmt: skip


# ----------------------------------------------------------------------------- tests


def test_endpoint_health_through_ctr_run(node: CtrNode, tmp_path: Path) -> None:
    ran = node.run(tools_script(node, "ctr-health", "kha_etcdctl endpoint health"), tmp_path)
    assert ran.returncode == 0, ran.output
    assert "https://127.0.0.1:2379 is healthy" in ran.stdout + ran.stderr, ran.output
    probe = node.run(quorum_probe_script(node.host), tmp_path)
    assert probe.returncode == 0 and probe.stdout.splitlines()[0] == "quorum", probe.output


def test_put_and_get_round_trip(node: CtrNode, tmp_path: Path) -> None:
    value = f"written-through-ctr-{os.getpid()}"
    body = (f"kha_etcdctl put kubeadm-ha/ctr-probe {value}", "kha_etcdctl get kubeadm-ha/ctr-probe --print-value-only")
    ran = node.run(tools_script(node, "ctr-put-get", *body), tmp_path)
    assert ran.returncode == 0, ran.output
    assert ran.stdout.split()[:2] == ["OK", value], ran.output
    direct = node.etcd("get", "kubeadm-ha/ctr-probe", "--print-value-only")
    assert direct.stdout.strip() == value, direct.stdout + direct.stderr


def test_the_timer_snapshot_through_ctr_run(node: CtrNode, tmp_path: Path) -> None:
    assert node.etcd("put", "kubeadm-ha/before-snapshot", "kept").returncode == 0
    ran = node.run(backup_script(node.host, POLICY), tmp_path)
    assert ran.returncode == 0, ran.output
    backups = tmp_path / "backups"
    snapshots = sorted(backups.glob(f"etcd-{node.host}-*.db"))
    assert len(snapshots) == 1, ran.output
    snapshot = snapshots[0]
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    digest = Path(f"{snapshot}.sha256").read_text().split()
    assert digest == [hashlib.sha256(snapshot.read_bytes()).hexdigest(), snapshot.name]
    assert not list(backups.glob(".*.part")), "a partial snapshot was left"

    status = f"kha_etcdutl snapshot status {snapshot} --write-out=json"
    checked = node.run(tools_script(node, "ctr-status", status, writable=(BACKUP_DIR,)), tmp_path)
    assert checked.returncode == 0, checked.output
    fields = json.loads(checked.stdout.splitlines()[0])
    assert fields["totalKey"] > 0 and fields["revision"] > 0, fields
    report(f"snapshot {snapshot.name}: {fields}")


def test_an_image_the_node_lacks_fails_the_step(node: CtrNode, tmp_path: Path) -> None:
    ran = node.run(backup_script(node.host, POLICY), tmp_path, image=MISSING_IMAGE)
    assert ran.returncode != 0, ran.output
    assert f"kubeadm-ha: kha_etcd_snapshot_save failed on {node.host} during etcd-backup" in ran.stderr, ran.output
    assert f"kubeadm-ha: etcdctl snapshot save failed on {node.host}; kept nothing (exit 1)" in ran.stderr, ran.output
    # ctr's own words, from the log tail the step shows.
    assert f'image "{MISSING_IMAGE}": not found' in ran.stderr, ran.output
    assert not list((tmp_path / "backups").iterdir()), "the failed run kept a file"


def test_the_quorum_probe_fails_not_says_no_quorum_when_etcdctl_cannot_run(node: CtrNode, tmp_path: Path) -> None:
    """etcd is healthy here; with the image gone the probe used to print `no-quorum`, and the restore, reading
    that, would have gone ahead without --force against a live cluster."""
    probe = node.run(quorum_probe_script(node.host), tmp_path, image=MISSING_IMAGE)
    assert probe.returncode != 0, probe.output
    assert "no-quorum" not in probe.stdout, probe.output
    assert f"kubeadm-ha: etcdctl cannot run on {node.host}" in probe.stderr, probe.output
    assert f'image "{MISSING_IMAGE}": not found' in probe.stderr, probe.output
