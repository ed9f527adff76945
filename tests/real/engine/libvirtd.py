"""A libvirtd of the lab's own, started by hand (no system service), and removed with everything it made.

libvirtd runs as root (it must create bridges and run QEMU) with its own libvirtd.conf and socket
directory; virtlogd, which the QEMU driver hands guest consoles to, runs next to it. On exit every
domain, network and pool the lab defined is destroyed and undefined, then both daemons are stopped by
PID. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 20


@dataclass(frozen=True)
class Libvirtd:
    uri: str
    directory: Path

    def virsh(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def names(self, kind: str) -> list[str]:
        listing = {"domain": ["list", "--all", "--name"], "network": ["net-list", "--all", "--name"]}[kind]
        out = self.virsh(*listing).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

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
            for volume in self.virsh("vol-list", pool, "--name", check=False).stdout.split():
                self.virsh("vol-delete", volume, "--pool", pool, check=False)
                removed.append(f"volume {pool}/{volume}")
            self.virsh("pool-destroy", pool, check=False)
            self.virsh("pool-undefine", pool, check=False)
            removed.append(f"pool {pool}")
        return removed


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


@contextlib.contextmanager
def running_libvirtd(directory: Path) -> Iterator[Libvirtd]:
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
    logs = (directory / "daemons.log").open("ab")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # virtlogd has one socket path for the system daemon; start ours only when none is running.
        if not Path("/run/libvirt/virtlogd-sock").exists():
            virtlogd = subprocess.Popen(["virtlogd"], stdout=logs, stderr=logs, start_new_session=True)
            processes.append(virtlogd)
            _wait_for(Path("/run/libvirt/virtlogd-sock"), virtlogd, "virtlogd")
        libvirtd = subprocess.Popen(
            ["libvirtd", "--config", str(config), "--pid-file", str(directory / "libvirtd.pid")],
            stdout=logs,
            stderr=logs,
            start_new_session=True,
        )
        processes.append(libvirtd)
        _wait_for(sockets / "libvirt-sock", libvirtd, "libvirtd")
        daemon = Libvirtd(f"qemu:///system?socket={sockets}/libvirt-sock", directory)
        try:
            yield daemon
        finally:
            daemon.remove_everything()
    finally:
        for process in reversed(processes):
            _stop(process)
        logs.close()
