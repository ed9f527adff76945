"""The node's bundle step (render/artifacts.py `bundle_install_script`) against the real binaries it installs.

A small but real bundle, written by tools.bundle's `write_bundle`: the binaries tests/real/build-binaries makes
(kubeadm and kubectl 1.37.2, containerd, ctr and the runc shim 2.2.9, runc 1.3.6, crictl 1.34.0, the CNI plugins
bridge, host-local, loopback and portmap 1.8.0) and the pause image as an OCI archive (tests/real/oci_images.py).
kubelet and the other images kubeadm lists are left out to keep the suite's builds cheap: the step installs what
the manifest lists, and what a stack needs in a manifest is checked by model/bundle.py's own tests.

The step is the rendered script, run by bash as root the way pulumi-command runs it (`sudo bash -c SCRIPT`, so with
SUDO_USER set), on a sandbox node (tests/real/sandbox_node.py): a private mount namespace with /etc, /var, /usr and
/opt overlaid, /run its own, and a network namespace with nothing but `lo` (the node is air-gapped indeed). The
bundle is staged where CopyToRemote puts it, ~SUDO_USER/kubeadm-ha-bundle/<sha256>/<name>, the SSH user's home
found by the real getent in the node's /etc/passwd.

Stand-ins, because systemd cannot run here (no PID 1 of the node's own): `systemctl` is a script that does what the
step asks of systemd for containerd from the unit file the step wrote (restart runs its ExecStart, is-active asks
whether that process lives; daemon-reload and enable are only recorded, enable refusing a unit without a file), and,
where the machine has no kmod, `modprobe` (the unit's ExecStartPre, `-` prefixed, and the step's check for the OS
tools it needs). Everything else is real: containerd 2.2.9 started from /usr/bin/containerd as the unit says, with its
default configuration, and its ctr importing the archive into the k8s.io namespace.

Proven: (1) a good bundle installs: every binary at its path with mode 0755, the CNI plugins, the units, the image
under its exact name (`ctr -n k8s.io images ls -q`), the marker; (2) a second run says "already done" and changes
nothing (every file's mode, size and mtime, containerd's process, systemctl's calls), and a run that lost its marker
changes no binary and does not restart containerd; (3) one changed byte in a staged file stops the step naming the
host and the file, and (4) a missing file likewise, installing nothing; (5) a manifest other than the pinned one
stops it naming artifacts.bundle.sha256; (6) a .tar bundle installs too.

Runs as root; needs util-linux (unshare, nsenter), tar, curl, and tests/real/build-binaries kubeadm kubectl containerd
ctr containerd-shim-runc-v2 runc crictl bridge host-local loopback portmap pause. Under CI=true missing ones fail.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.bundle import BINARIES, CNI_PLUGIN_DIR, MANIFEST, Entry, Manifest, parse_manifest
from model.versions import DEFAULT_KUBERNETES
from render.artifact_units import CONTAINERD_SERVICE, KUBEADM_DROP_IN, KUBELET_SERVICE, UNIT_DIR
from render.artifacts import CONTAINERD_SOCKET, INSTALLED_MARKER, STAGE_DIR, BundleInstall, bundle_install_script
from render.scripts import remote_command
from tests.integration.conftest import require_programs, require_root, unavailable
from tests.integration.netns import cleanup_stale, scratch_dir
from tests.real import lab_binaries
from tests.real.binaries import _builder, binary
from tests.real.oci_images import File, Image, write_archive
from tests.real.sandbox_node import DEFAULT_PATH, SandboxNode

pytestmark = pytest.mark.real

HOST = "cp-1"
OPERATOR = "kha-operator"
OPERATOR_UID = 64123
PAUSE = f"registry.k8s.io/pause:{lab_binaries.PAUSE_VERSION}"
CONTAINERD_VERSION = _builder().CONTAINERD_VERSION
STEP_BOUND = 180.0
CTR_BOUND = 60.0
STOP_BOUND = 10.0

# systemd cannot run in the sandbox: this stands in for what the step asks of it (see the module's docstring).
SYSTEMCTL = r"""#!/bin/bash
# kubeadm-ha test stand-in for systemctl (systemd cannot run in this sandbox). State in @STATE@.
set -euo pipefail
state=@STATE@
units=@UNITS@
echo "$*" >>"$state/calls"
unit_file() { echo "$units/${1%.service}.service"; }
pid_of() { cat "$state/${1%.service}.pid" 2>/dev/null || true; }
alive() {
  local pid
  pid="$(pid_of "$1")"
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && ! grep -q ') [ZX] ' "/proc/$pid/stat"
}
directive() { sed -n "s/^$1=//p" "$(unit_file "$2")"; }
stop() {
  local pid i
  alive "$1" || return 0
  pid="$(pid_of "$1")"
  kill -TERM "$pid"
  for i in $(seq 100); do alive "$1" || return 0; sleep 0.1; done
  kill -KILL "$pid"
}
start() {
  local line words
  [ -f "$(unit_file "$1")" ] || { echo "Unit ${1%.service}.service not found." >&2; exit 5; }
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    read -ra words <<<"${line#-}"
    if [ "${line:0:1}" = "-" ]; then "${words[@]}" >>"$state/${1%.service}.log" 2>&1 || true; else "${words[@]}"; fi
  done < <(directive ExecStartPre "$1")
  line="$(directive ExecStart "$1" | sed '/^$/d' | tail -n 1)"
  read -ra words <<<"$line"
  setsid "${words[@]}" </dev/null >>"$state/${1%.service}.log" 2>&1 &
  echo "$!" >"$state/${1%.service}.pid"
}
case "$1" in
  daemon-reload) ;;
  enable)
    shift
    for unit in "$@"; do
      [ -f "$(unit_file "$unit")" ] || { echo "Failed to enable unit: Unit file $unit does not exist." >&2; exit 1; }
      grep -qxF "${unit%.service}" "$state/enabled" 2>/dev/null || echo "${unit%.service}" >>"$state/enabled"
    done ;;
  is-active) alive "${!#}" || exit 3 ;;
  restart) stop "$2"; start "$2" ;;
  *) echo "systemctl stand-in: '$*' is not something the bundle step should ask" >&2; exit 1 ;;
esac
"""
MODPROBE = "#!/bin/sh\n# kubeadm-ha test stand-in for modprobe (kmod is not installed here): records its call only.\n"


@dataclass(frozen=True)
class SourceBundle:
    """The bundle as assembled (a directory), its manifest and pinned digest, and a .tar of it."""

    directory: Path
    manifest: Manifest
    sha256: str
    archive: Path


def _lab_binary(name: str) -> Path:
    path = lab_binaries.cached_path(name, lab_binaries.default_version(name), Path(_builder().CACHE))
    if not path.is_file():
        unavailable(f"{name} is not built: run tests/real/build-binaries {name}")
    return path


def _digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@pytest.fixture(scope="module")
def source() -> Iterator[SourceBundle]:
    require_root()
    require_programs("tar")
    from tools.bundle import write_bundle

    version = DEFAULT_KUBERNETES
    binaries: list[tuple[str, str, Path]] = [
        ("kubeadm", version, Path(binary("kubeadm"))),
        ("kubectl", version, Path(binary("kubectl"))),
        *((name, CONTAINERD_VERSION, Path(binary(name))) for name in ("containerd", "containerd-shim-runc-v2", "ctr")),
        *((name, lab_binaries.default_version(name), _lab_binary(name)) for name in ("runc", "crictl")),
    ]
    plugins = [(name, _lab_binary(name)) for name in ("bridge", "host-local", "loopback", "portmap")]
    cleanup_stale()
    work = scratch_dir("bundle-src")
    try:
        pause = Image(PAUSE, {"/pause": File(_lab_binary("pause"))}, entrypoint=("/pause",), user="65535:65535")
        archive = write_archive(pause, work / "pause.tar")
        files = [
            *((Entry(f"bin/{name}", "", 0, "binary", name, ver), path) for name, ver, path in binaries),
            *(
                (Entry(f"cni/{name}", "", 0, "cni-plugin", name, lab_binaries.default_version(name)), path)
                for name, path in plugins
            ),
            (Entry("images/pause.tar", "", 0, "image", PAUSE, lab_binaries.PAUSE_VERSION), archive),
        ]
        directory = work / "k8s-bundle"
        sha256 = write_bundle(directory, version, files)
        manifest = parse_manifest((directory / MANIFEST).read_text())
        assert _digest(directory / MANIFEST) == sha256
        tar = work / "k8s-bundle.tar"
        # As tools.bundle's help says: `tar -C DIR -cf bundle.tar .`
        subprocess.run(["tar", "-C", str(directory), "-cf", str(tar), "."], check=True, timeout=120)
        yield SourceBundle(directory, manifest, sha256, tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class BundleNode:
    """A sandbox node with the stand-ins, the SSH user, and the bundle staged in its home."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "home" / OPERATOR
        self.home.mkdir(parents=True)
        self.bin = work / "bin"
        self.bin.mkdir()
        self.state = work / "systemd"
        self.state.mkdir()
        (self.state / "calls").touch()
        stand_in = SYSTEMCTL.replace("@STATE@", str(self.state)).replace("@UNITS@", UNIT_DIR)
        (self.bin / "systemctl").write_text(stand_in)
        (self.bin / "systemctl").chmod(0o755)
        if shutil.which("modprobe", path=DEFAULT_PATH) is None:
            (self.bin / "modprobe").write_text(MODPROBE + f'echo "$*" >>{self.state}/modprobe.calls\n')
            (self.bin / "modprobe").chmod(0o755)
        passwd = f"{OPERATOR}:x:{OPERATOR_UID}:{OPERATOR_UID}:kubeadm-ha operator:{self.home}:/bin/bash"
        self.node = SandboxNode(work / "node", passwd=[passwd])

    def stage_dir(self, sha256: str) -> Path:
        return self.home / STAGE_DIR / sha256

    def stage(self, bundle: Path, sha256: str) -> Path:
        """The bundle at ~/kubeadm-ha-bundle/<sha256>/<its name>, owned by the SSH user (files hard-linked)."""
        target = self.stage_dir(sha256) / bundle.name
        target.parent.mkdir(parents=True)
        if bundle.is_dir():
            shutil.copytree(bundle, target, copy_function=os.link)
        else:
            os.link(bundle, target)
        for directory, _, files in os.walk(self.home):
            os.chown(directory, OPERATOR_UID, OPERATOR_UID)
            for name in files:
                os.chown(os.path.join(directory, name), OPERATOR_UID, OPERATOR_UID)
        return target

    def run_step(self, install: BundleInstall) -> subprocess.CompletedProcess[str]:
        """The rendered step, as pulumi-command runs it (sudo bash -c), with the stand-ins first on PATH."""
        script = bundle_install_script(HOST, install)
        assert remote_command(script).startswith("sudo --non-interactive bash -c ")
        env = {"PATH": f"{self.bin}:{DEFAULT_PATH}", "SUDO_USER": OPERATOR, "HOME": "/root", "USER": "root"}
        return self.node.run(["bash", "-c", script.render(), "kubeadm-ha-bundle"], timeout=STEP_BOUND, env=env)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        ctr = ["/usr/bin/ctr", "--address", CONTAINERD_SOCKET, "--namespace", "k8s.io", *args]
        return self.node.run(ctr, timeout=CTR_BOUND)

    def calls(self) -> list[str]:
        return (self.state / "calls").read_text().splitlines()

    def containerd_pid(self) -> int | None:
        pid_file = self.state / "containerd.pid"
        return int(pid_file.read_text()) if pid_file.is_file() else None

    def installed(self) -> dict[str, tuple[int, int, int]]:
        """Every file the step wrote outside its logs: path -> (mode, size, mtime_ns)."""
        files = {}
        for top in ("/usr", "/opt", "/etc", "/var/lib/kubeadm-ha"):
            files.update(self.node.written(top))
        return {path: facts for path, facts in files.items() if path != "/etc/passwd"}

    def logs(self) -> str:
        parts = []
        for log in sorted(self.state.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"----- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture
def node() -> Iterator[BundleNode]:
    require_root()
    require_programs("tar", "curl", "getent", "cmp", "sha256sum", "losetup", "setsid")
    cleanup_stale()
    work = scratch_dir("bundle-node")
    live = BundleNode(work)
    try:
        live.node.start()
        # A fresh node has no Kubernetes binaries; this machine may (its /usr shows through the overlay).
        gone = live.node.run(["rm", "-f", *(BINARIES[name] for name in ("kubeadm", "kubelet", "kubectl"))])
        assert gone.returncode == 0, gone.stderr
        yield live
    finally:
        live.node.close()
        shutil.rmtree(work, ignore_errors=True)


def install(source: SourceBundle, *, archive: bool = False, sha256: str | None = None) -> BundleInstall:
    name = source.archive.name if archive else source.directory.name
    return BundleInstall(source.manifest, sha256 or source.sha256, name, archive, "cp")


def assert_installed(node: BundleNode, source: SourceBundle, ran: subprocess.CompletedProcess[str]) -> None:
    """Everything the manifest lists is in place, containerd runs from it and holds the image."""
    output = f"exit {ran.returncode}\n{ran.stdout}{ran.stderr}\n{node.logs()}"
    assert ran.returncode == 0, output
    assert f"kubeadm-ha: bundle done on {HOST}" in ran.stdout, output
    for entry in source.manifest.of_kind("binary"):
        target = node.node.path(BINARIES[entry.name])
        assert target.is_file(), f"{BINARIES[entry.name]} was not installed"
        assert stat.S_IMODE(target.stat().st_mode) == 0o755, f"{BINARIES[entry.name]}: {oct(target.stat().st_mode)}"
        assert _digest(target) == entry.sha256, f"{BINARIES[entry.name]} is not the bundle's {entry.path}"
    for entry in source.manifest.of_kind("cni-plugin"):
        target = node.node.path(f"{CNI_PLUGIN_DIR}/{entry.name}")
        assert stat.S_IMODE(target.stat().st_mode) == 0o755 and _digest(target) == entry.sha256, entry.name
    units = {
        f"{UNIT_DIR}/containerd.service": CONTAINERD_SERVICE,
        f"{UNIT_DIR}/kubelet.service": KUBELET_SERVICE,
        f"{UNIT_DIR}/kubelet.service.d/10-kubeadm.conf": KUBEADM_DROP_IN,
    }
    for path, content in units.items():
        assert node.node.path(path).read_text() == content, path
        assert stat.S_IMODE(node.node.path(path).stat().st_mode) == 0o644, path
    assert node.node.path(INSTALLED_MARKER).read_text() == f"{source.sha256}\n"
    assert (node.state / "enabled").read_text().split() == ["containerd", "kubelet"]
    # containerd runs from the installed binary, started as the unit says.
    pid = node.containerd_pid()
    assert pid is not None, node.calls()
    assert os.readlink(f"/proc/{pid}/exe").endswith("/usr/bin/containerd"), os.readlink(f"/proc/{pid}/exe")
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [b"/usr/bin/containerd"]
    version = node.ctr("version")
    server = version.stdout.partition("Server:")[2].split()
    assert server[:2] == ["Version:", f"{CONTAINERD_VERSION}+unknown"], version.stdout + version.stderr
    listed = node.ctr("images", "ls", "-q")
    assert listed.returncode == 0, listed.stderr
    # The CRI (on in containerd's default configuration) adds a sha256:<config digest> reference for each image.
    names = [name for name in listed.stdout.split() if not name.startswith("sha256:")]
    assert names == [entry.name for entry in source.manifest.of_kind("image")], listed.stdout


def assert_nothing_installed(node: BundleNode, source: SourceBundle) -> None:
    installed = node.installed()
    assert not [path for path in installed if not path.startswith("/var/lib/kubeadm-ha/bundle/.incoming/")], installed
    assert not node.node.path(f"/var/lib/kubeadm-ha/bundle/{source.sha256}").exists()
    assert node.calls() == [], "the step asked systemd for something"
    assert node.containerd_pid() is None
    assert node.node.pids() == [], "a process was left running"


# ----------------------------------------------------------------------------- tests


def test_a_good_bundle_installs_and_a_second_run_changes_nothing(node: BundleNode, source: SourceBundle) -> None:
    node.stage(source.directory, source.sha256)
    started = time.monotonic()
    ran = node.run_step(install(source))
    assert_installed(node, source, ran)
    print(f"[bundle] installed from a directory in {time.monotonic() - started:.1f} s")
    assert not node.stage_dir(source.sha256).exists(), "the staged copy was left in the SSH user's home"
    assert stat.S_IMODE(node.node.path("/var/lib/kubeadm-ha/bundle").stat().st_mode) == 0o700
    # A new containerd binary: restarted without asking whether it ran.
    assert node.calls() == ["daemon-reload", "enable containerd kubelet", "restart containerd"]
    before = node.installed()
    calls, pid = node.calls(), node.containerd_pid()

    # (2) A second run: the guard says it happened, nothing changes.
    again = node.run_step(install(source))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"kubeadm-ha: bundle already done on {HOST}; nothing to do" in again.stdout, again.stdout
    assert node.installed() == before
    assert (node.calls(), node.containerd_pid()) == (calls, pid)

    # A run whose marker is gone (a step that died after installing): no binary is written again, containerd is
    # neither restarted nor stopped, and the image is still there under its name.
    # Through the node: the overlay does not see a change made to its upper layer behind its back.
    assert node.node.run(["rm", INSTALLED_MARKER]).returncode == 0
    rerun = node.run_step(install(source))
    assert_installed(node, source, rerun)
    after = node.installed()
    for entry in source.manifest.of_kind("binary"):
        assert after[BINARIES[entry.name]] == before[BINARIES[entry.name]], f"{entry.name} was written again"
    assert node.containerd_pid() == pid
    assert "restart containerd" not in node.calls()[len(calls) :], node.calls()


def test_a_changed_byte_stops_the_step_naming_the_host_and_the_file(node: BundleNode, source: SourceBundle) -> None:
    staged = node.stage(source.directory, source.sha256)
    damaged = staged / "bin" / "crictl"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.unlink()  # a hard link to the source bundle: replaced, not written through
    damaged.write_bytes(bytes(data))
    ran = node.run_step(install(source))
    assert ran.returncode != 0, ran.stdout + ran.stderr
    got = hashlib.sha256(data).hexdigest()
    want = source.manifest.named("binary", "crictl").sha256  # type: ignore[union-attr]
    assert (
        f"kubeadm-ha: bundle on {HOST}: bin/crictl: wrong digest (sha256 {got}, the manifest pins {want})" in ran.stderr
    ), ran.stderr
    assert "python -m tools.bundle check" in ran.stderr, ran.stderr
    assert_nothing_installed(node, source)
    assert damaged.is_file(), "the staged copy is gone: the operator cannot look at it"


def test_a_missing_file_stops_the_step_naming_the_host_and_the_file(node: BundleNode, source: SourceBundle) -> None:
    staged = node.stage(source.directory, source.sha256)
    (staged / "cni" / "portmap").unlink()
    ran = node.run_step(install(source))
    assert ran.returncode != 0, ran.stdout + ran.stderr
    assert (
        f"kubeadm-ha: bundle on {HOST}: cni/portmap: missing from the copied bundle (its manifest lists it)"
        in ran.stderr
    ), ran.stderr
    assert_nothing_installed(node, source)


def test_another_manifest_than_the_pinned_one_stops_the_step(node: BundleNode, source: SourceBundle) -> None:
    staged = node.stage(source.directory, source.sha256)
    manifest = staged / MANIFEST
    text = manifest.read_text()
    manifest.unlink()
    manifest.write_text(text + "\n")  # the same files, another manifest: another digest
    found = hashlib.sha256((text + "\n").encode()).hexdigest()
    ran = node.run_step(install(source))
    assert ran.returncode != 0, ran.stdout + ran.stderr
    assert (
        f"kubeadm-ha: bundle on {HOST}: manifest.json: sha256 {found}, the stack pins {source.sha256} "
        "(artifacts.bundle.sha256)" in ran.stderr
    ), ran.stderr
    assert_nothing_installed(node, source)


def test_a_bundle_not_copied_stops_the_step(node: BundleNode, source: SourceBundle) -> None:
    ran = node.run_step(install(source))
    assert ran.returncode != 0, ran.stdout + ran.stderr
    where = node.stage_dir(source.sha256)
    assert f"kubeadm-ha: bundle on {HOST}: the bundle copied by pulumi up is not at {where}" in ran.stderr, ran.stderr
    assert_nothing_installed(node, source)


def test_a_tar_bundle_installs(node: BundleNode, source: SourceBundle) -> None:
    node.stage(source.archive, source.sha256)
    started = time.monotonic()
    ran = node.run_step(install(source, archive=True))
    assert_installed(node, source, ran)
    print(f"[bundle] installed from a .tar in {time.monotonic() - started:.1f} s")
    assert not node.stage_dir(source.sha256).exists(), "the staged archive was left in the SSH user's home"
    # The verified copy is root's, whatever the archive said about owners.
    verified = node.node.path(f"/var/lib/kubeadm-ha/bundle/{source.sha256}")
    owners = {(path.stat().st_uid, path.stat().st_gid) for path in verified.rglob("*")}
    assert owners == {(0, 0)}, owners


def test_a_running_nodes_kubectl_of_another_version_is_left_to_the_upgrade_step(
    node: BundleNode, source: SourceBundle
) -> None:
    """A running node given a bundle for the next version (an upgrade): its kubectl stays until the upgrade step
    replaces it in kubeadm's order (render/lifecycle.py); the rest of the bundle installs."""
    older = "#!/bin/sh\necho 'Client Version: v1.36.3'\necho 'Kustomize Version: v5.7.1'\n"
    placed = node.node.run(
        ["sh", "-c", f"printf '%s' {shlex.quote(older)} >/usr/bin/kubectl && chmod 0755 /usr/bin/kubectl"]
    )
    assert placed.returncode == 0, placed.stderr
    node.stage(source.directory, source.sha256)
    ran = node.run_step(install(source))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "/usr/bin/kubectl is another version than v1.37.2: the upgrade step replaces it" in ran.stdout
    assert node.node.path("/usr/bin/kubectl").read_text() == older
    assert node.node.path("/usr/bin/kubeadm").read_bytes() == (source.directory / "bin" / "kubeadm").read_bytes()
