"""A node's root for real programs that install software and run containerd, without changing the host.

A process (`holder`) holds a private mount namespace in which /etc, /var, /usr and /opt are overlays whose upper
layers live in a test directory, /run is an empty tmpfs, and /var/lib/containerd is a plain directory of the test's
(containerd's overlayfs snapshotter cannot put its layers on an overlay). Its network namespace is a new, empty one
(only `lo`), or a given one. Every program of the node runs in both namespaces (`nsenter --target HOLDER --mount
--net`), so the bundle step, the containerd it starts and the test's own ctr/crictl see one filesystem, as on one
machine; what they write lands under the test directory, where the test reads it (`path`). The namespace ends with
its last process: `close` stops every process in it (bounded), the holder last.

Unlike tests/real/node_root.py (which overlays /etc and /var only, for kubeadm), this one also takes /usr and /opt,
where the bundle installs binaries, CNI plugins and units, and gives /run to the node alone (containerd's socket,
state and NRI socket).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from stat import S_ISCHR

from tests.integration.conftest import require_programs, require_root

OVERLAID = ("etc", "var", "usr", "opt")
CONTAINERD_ROOT = "/var/lib/containerd"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_BOUND = 10.0
STOP_BOUND = 10.0


class SandboxNode:
    """One node's filesystem and network namespace, kept under `directory` until `close`."""

    def __init__(self, directory: Path, *, netns: Path | None = None, passwd: Sequence[str] = ()) -> None:
        require_root()
        self.programs = require_programs("unshare", "nsenter", "mount", "bash")
        self.directory = directory
        self.netns = netns
        self.holder: subprocess.Popen[bytes] | None = None
        self.mount_namespace = ""
        for name in OVERLAID:
            (directory / "upper" / name).mkdir(parents=True, exist_ok=True)
            (directory / "work" / name).mkdir(parents=True, exist_ok=True)
        (directory / "containerd-root").mkdir(mode=0o711, exist_ok=True)
        if passwd:
            # Users the node has (the SSH user the bundle is staged for): the host's file with them appended.
            target = directory / "upper" / "etc" / "passwd"
            target.write_text(Path("/etc/passwd").read_text() + "".join(f"{line}\n" for line in passwd))
            target.chmod(0o644)

    def __enter__(self) -> SandboxNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        ready = self.directory / "holder.ready"
        mounts = [
            *(
                f"mount -t overlay overlay -o lowerdir=/{name},upperdir={self.directory / 'upper' / name},"
                f"workdir={self.directory / 'work' / name} /{name}"
                for name in OVERLAID
            ),
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            f"mkdir -p {CONTAINERD_ROOT}",
            f"mount --bind {self.directory / 'containerd-root'} {CONTAINERD_ROOT}",
            *(["ip link set lo up"] if self.netns is None else []),
            f"touch {ready}",
            "exec sleep infinity",
        ]
        argv = ["unshare", "--mount", "--propagation", "private"]
        argv += ["--net"] if self.netns is None else []
        argv += ["bash", "-euc", " && ".join(mounts)]
        if self.netns is not None:
            # nsenter joins the network namespace only (`ip netns exec` would remount /sys as well).
            argv = [self.programs["nsenter"], f"--net={self.netns}", "--", *argv]
        with open(self.directory / "holder.log", "ab") as log:
            self.holder = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_BOUND
        while not ready.exists():
            if self.holder.poll() is not None:
                log_text = (self.directory / "holder.log").read_text(errors="replace")
                raise AssertionError(f"the node's namespace holder exited {self.holder.returncode}: {log_text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the node's namespaces were not ready in {START_BOUND}s")
            time.sleep(0.05)
        self.mount_namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` on this node (its mount and network namespaces)."""
        assert self.holder is not None, "start() first"
        return [self.programs["nsenter"], f"--target={self.holder.pid}", "--mount", "--net", "--", *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`argv` on this node, bounded, with only `env` (and a plain PATH) in its environment."""
        environment = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", **(env or {})}
        return subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, env=environment, cwd="/",
        )  # fmt: skip

    def path(self, absolute: str) -> Path:
        """Where the node's `absolute` path lives on the host (what the node wrote there)."""
        if absolute == CONTAINERD_ROOT or absolute.startswith(CONTAINERD_ROOT + "/"):
            return self.directory / "containerd-root" / os.path.relpath(absolute, CONTAINERD_ROOT)
        relative = Path(absolute).relative_to("/")
        if relative.parts[0] not in OVERLAID:
            raise ValueError(f"{absolute} is not kept on the host (only {', '.join(OVERLAID)} are overlaid)")
        return self.directory / "upper" / relative

    def written(self, top: str) -> dict[str, tuple[int, int, int]]:
        """Every file the node wrote below `top` (its upper layer): path -> (mode, size, mtime_ns)."""
        root = self.path(top)
        found = {}
        for directory, _, files in os.walk(root):
            for name in files:
                stat = os.lstat(os.path.join(directory, name))
                if S_ISCHR(stat.st_mode) and stat.st_rdev == 0:
                    continue  # an overlayfs whiteout: a file of the lower layer removed, nothing written
                absolute = "/" + os.path.relpath(os.path.join(directory, name), self.directory / "upper")
                found[absolute] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
        return found

    def pids(self) -> list[int]:
        """Every process in this node's mount namespace but the holder."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or (self.holder is not None and int(entry.name) == self.holder.pid):
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == self.mount_namespace:
                    found.append(int(entry.name))
        return found

    def close(self) -> None:
        """Stop every process of the node (TERM, then KILL after STOP_BOUND), the holder last."""
        if self.holder is None:
            return
        if self.mount_namespace:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
                deadline = time.monotonic() + STOP_BOUND
                while self.pids() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not self.pids():
                    break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.holder.wait(timeout=STOP_BOUND)
        self.holder = None
