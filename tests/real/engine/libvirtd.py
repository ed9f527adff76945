"""A libvirtd of the lab's own, started by hand (no system service), and removed with everything it made.

libvirtd runs as root (it must create bridges and run QEMU) with its own libvirtd.conf and socket directory,
in a mount namespace of its own where /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt are directories of the lab: no definition, lease or state of the machine's (or of another
test's) libvirtd is seen or touched, and nothing it writes outlives the lab. Its qemu.conf sends QEMU's
output to a file, so no virtlogd is needed. Given a network namespace, libvirtd runs in it: its bridges,
dnsmasq, NAT rules and guests live there, and the namespace has no interface to the outside, so a guest's
traffic cannot leave this machine whatever the network's mode. On exit every domain, network and pool is
destroyed and undefined, the daemon is stopped by PID, any process left in the namespace (QEMU, dnsmasq:
started by this daemon) is killed by PID, and the namespace is deleted. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 20
# The directories libvirtd and its drivers keep state in (Debian's libvirt-daemon-system layout).
PRIVATE = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
# stdio_handler "file": QEMU's stdout/stderr go to /var/log/libvirt/qemu/NAME.log, not through virtlogd.
# security_driver "none": no AppArmor profile to generate for disks in the lab's own directories.
# namespaces []: QEMU shares libvirtd's mount namespace; libvirt's own per-guest /dev would try to recreate the
# /dev/kvm stand-in below as a device and fails ("Unable to move /run/libvirt/qemu/N-NAME.kvm mount to
# /dev/kvm: Invalid argument", measured with libvirt 9.0).
QEMU_CONF = 'stdio_handler = "file"\nsecurity_driver = "none"\nnamespaces = []\n'


@dataclass(frozen=True)
class Libvirtd:
    uri: str
    directory: Path
    netns: str | None = None

    def prefix(self) -> list[str]:
        """argv prefix that runs a command where the guests are reachable (the lab's network namespace)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def virsh(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def names(self, kind: str) -> list[str]:
        listing = {
            "domain": ["list", "--all", "--name"],
            "network": ["net-list", "--all", "--name"],
            "pool": ["pool-list", "--all", "--name"],
        }[kind]
        out = self.virsh(*listing).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def volumes(self, pool: str) -> list[str]:
        """Volume names (virsh 9.0's vol-list has no --name: its table is `Name  Path`, a rule, then rows)."""
        listed = self.virsh("vol-list", pool, check=False)
        rows = listed.stdout.splitlines()[2:] if listed.returncode == 0 else []
        return [row.split()[0] for row in rows if row.strip()]

    def remove_everything(self) -> list[str]:
        """Destroy and undefine every domain, network and pool (with its volumes); what was removed."""
        removed = []
        for domain in self.names("domain"):
            self.virsh("destroy", domain, check=False)
            self.virsh("undefine", domain, "--nvram", check=False)
            removed.append(f"domain {domain}")
        for network in self.names("network"):
            self.virsh("net-destroy", network, check=False)
            self.virsh("net-undefine", network, check=False)
            removed.append(f"network {network}")
        pools = self.virsh("pool-list", "--all", "--name", check=False).stdout.split()
        for pool in pools:
            for volume in self.volumes(pool):
                self.virsh("vol-delete", volume, "--pool", pool, check=False)
                removed.append(f"volume {pool}/{volume}")
            self.virsh("pool-destroy", pool, check=False)
            self.virsh("pool-undefine", pool, check=False)
            removed.append(f"pool {pool}")
        return removed


def in_private_mounts(script: str, name: str) -> list[str]:
    """argv prefix running `script` (sh) in a private mount namespace: its mounts stay there, the host sees none.

    `name` is the script's $0; arguments appended to the prefix are its $1, $2, ...
    """
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, name]


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path} within {START_TIMEOUT_SECONDS} s")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


def _private_state(directory: Path) -> str:
    """The lab's own libvirt directories, and the shell that mounts them over the system's."""
    mounts = []
    for name, target in PRIVATE.items():
        own = directory / "state" / name
        own.mkdir(parents=True, exist_ok=True)
        own.chmod(0o755)
        # The target may be missing (/run/libvirt when no system libvirtd ever ran): an empty directory.
        mounts.append(f"mkdir -p {target} && mount --bind {own} {target}")
    etc = directory / "state" / "etc"
    (etc / "qemu.conf").write_text(QEMU_CONF)
    for conf in ("libvirt.conf", "network.conf", "virtlogd.conf"):
        if (Path(PRIVATE["etc"]) / conf).is_file():
            (etc / conf).write_text((Path(PRIVATE["etc"]) / conf).read_text())
    # /dev/kvm is root-only here (0600) and hangs when opened: libvirt then judges KVM unusable for its QEMU user
    # while its capability probe still records KVM, so the cache never validates (libvirt 9.0
    # src/qemu/qemu_capabilities.c virQEMUCapsIsValid: "KVM was not enabled when probing ..., but it should be")
    # and every API call that needs capabilities re-probes QEMU (45 s each, measured). The lab runs TCG only, so
    # its libvirtd sees a /dev/kvm that nobody can use: a root-only empty file over the device.
    if Path("/dev/kvm").exists():
        no_kvm = directory / "state" / "no-kvm"
        no_kvm.touch(mode=0o600)
        mounts.append(f"mount --bind {no_kvm} /dev/kvm")
    return " && ".join(mounts)


def _kill_left_in(netns: str) -> list[int]:
    """Kill (by PID) what this daemon started and left in its namespace: QEMU and dnsmasq."""
    listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=20, check=False)
    pids = [int(pid) for pid in listed.stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def network_namespace(name: str) -> Iterator[str]:
    """A network namespace with only its loopback up; deleted (with anything left in it killed) on exit."""
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=20)
        yield name
    finally:
        _kill_left_in(name)
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=20)


@contextlib.contextmanager
def running_libvirtd(directory: Path, netns: str | None = None) -> Iterator[Libvirtd]:
    if os.geteuid() != 0:
        raise RuntimeError("libvirtd must run as root to create bridges and guests")
    directory.mkdir(parents=True, exist_ok=True)
    sockets = directory / "run"
    sockets.mkdir(exist_ok=True)
    config = directory / "libvirtd.conf"
    config.write_text(
        f'unix_sock_dir = "{sockets}"\nunix_sock_group = "root"\nunix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlog_outputs = "3:stderr"\n'
    )
    mounts = _private_state(directory)
    logs = (directory / "daemons.log").open("ab")
    in_netns = ["ip", "netns", "exec", netns] if netns else []
    # `ip netns exec` and `unshare` exec (no fork), as does the shell: the PID is libvirtd's.
    libvirtd = subprocess.Popen(
        [
            *in_netns,
            *in_private_mounts(f'{mounts} && exec libvirtd --config "$1" --pid-file "$2"', "lab-libvirtd"),
            str(config),
            str(directory / "libvirtd.pid"),
        ],
        stdout=logs,
        stderr=logs,
        start_new_session=True,
    )
    try:
        _wait_for(sockets / "libvirt-sock", libvirtd, "libvirtd")
        daemon = Libvirtd(f"qemu:///system?socket={sockets}/libvirt-sock", directory, netns)
        try:
            yield daemon
        finally:
            daemon.remove_everything()
    finally:
        _stop(libvirtd)
        if netns:
            _kill_left_in(netns)
        logs.close()


@contextlib.contextmanager
def scratch_libvirtd(prefix: str) -> Iterator[Libvirtd]:
    """A libvirtd of the test's own in a new directory under /var/tmp (named from `prefix`), removed with it.

    The caller's commands reach it at the system path by binding its socket directory (`directory / "run"`) over
    /run/libvirt in their own mount namespace.
    """
    # The mount point of the socket directory (in the callers' namespaces and in running_libvirtd's): a fresh
    # machine whose package scripts were kept from starting libvirtd has none yet (it lives on the /run tmpfs).
    Path("/run/libvirt").mkdir(mode=0o755, exist_ok=True)
    # A short path: the socket's must fit a sockaddr_un (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        with running_libvirtd(directory) as daemon:
            yield daemon
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def isolated_libvirtd(prefix: str, netns_name: str) -> Iterator[tuple[Path, Libvirtd]]:
    """A libvirtd in a network namespace of its own (loopback only: the guests' NAT network has no route out),
    and the scratch directory it lives in under /var/tmp, removed with it: (directory, daemon)."""
    # QEMU runs as libvirt-qemu: a pool under the directory must be reachable by it, so not under
    # /tmp/pytest-of-root (0700).
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    directory.chmod(0o755)
    try:
        with network_namespace(netns_name) as netns, running_libvirtd(directory / "libvirtd", netns) as daemon:
            yield directory, daemon
    finally:
        shutil.rmtree(directory, ignore_errors=True)
