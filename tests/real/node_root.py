"""Run real kubeadm (or any program) as root without changing the host: a private mount namespace in
which /etc and /var are overlays whose upper layers live in a test directory.

Files placed before the run appear at their absolute paths (/etc/kubernetes/pki/ca.crt ...), and what
the program writes lands in the upper layers, where the test reads it back. Nothing outside the test
directory changes; the namespace and its mounts end with the process. Every run is bounded, and its
output is passed through the plan's masking (keys and bootstrap tokens never reach a test report).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import require_root, unavailable
from tools.plan import mask

OVERLAID = ("etc", "var")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    returncode: int
    stdout: str  # masked
    stderr: str  # masked

    @property
    def output(self) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.stdout}{self.stderr}"


class NodeRoot:
    """One node's /etc and /var, as overlays over the host's, kept under `directory`."""

    def __init__(self, directory: Path) -> None:
        require_root()
        if shutil.which("unshare") is None:
            unavailable("`unshare` (util-linux) is not installed")
        self.directory = directory
        self.holder: int | None = None
        for name in OVERLAID:
            (directory / "upper" / name).mkdir(parents=True, exist_ok=True)
            (directory / "work" / name).mkdir(parents=True, exist_ok=True)

    def path(self, absolute: str) -> Path:
        """Where the node's `absolute` path (under /etc or /var) lives on the host."""
        relative = Path(absolute).relative_to("/")
        if relative.parts[0] not in OVERLAID:
            raise ValueError(f"{absolute} is not under /etc or /var")
        return self.directory / "upper" / relative

    def place(self, files: Mapping[str, tuple[int, str]]) -> None:
        for absolute, (mode, content) in files.items():
            target = self.path(absolute)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            target.chmod(mode)

    def read(self, absolute: str) -> str:
        return self.path(absolute).read_text()

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).is_file()

    def _unshare(self, argv: Sequence[str]) -> list[str]:
        mounts = " && ".join(
            f"mount -t overlay overlay -o lowerdir=/{name},upperdir={self.directory / 'upper' / name},"
            f"workdir={self.directory / 'work' / name} /{name}"
            for name in OVERLAID
        )
        return ["unshare", "--mount", "--propagation", "private", "bash", "-c", f'{mounts} && exec "$@"', "node", *argv]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` on this node: in the holder's mount namespace once `hold()` was called (so every process of
        the node sees one /etc and one /var, and flock, caches and writes behave as on one machine), else in a
        new private mount namespace of its own (exec, so the pid is the program's)."""
        if self.holder is not None:
            return ["nsenter", f"--target={self.holder}", "--mount", "--", *argv]
        return self._unshare(argv)

    def holder_argv(self) -> list[str]:
        """A process that mounts the overlays once and keeps the mount namespace alive (pass its pid to hold)."""
        return self._unshare(["sleep", "infinity"])

    def hold(self, pid: int, *, timeout: float = 10) -> None:
        """Use the mount namespace of `pid` (started from holder_argv) for every later run, once mounted."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                mounts = Path(f"/proc/{pid}/mountinfo").read_text()
                if all(f" /{name} " in mounts and "overlay" in mounts for name in OVERLAID):
                    self.holder = pid
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the mount namespace of {self.directory.name} was not ready in {timeout}s")
            time.sleep(0.05)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
        netns: str | None = None,
        stdin: str | None = None,
    ) -> Ran:
        """Run `argv` on this node (in network namespace `netns` if given), bounded; output masked."""
        environment = {"PATH": DEFAULT_PATH, **(env or {})}
        wrapped = self.wrap(argv)
        if netns is not None:
            wrapped = ["ip", "netns", "exec", netns, *wrapped]
        result = subprocess.run(
            wrapped,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=environment,
            cwd=os.fspath(self.directory),
        )
        return Ran(tuple(argv), result.returncode, mask(result.stdout), mask(result.stderr))
