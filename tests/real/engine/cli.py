"""Run the real Pulumi CLI the way the README tells a user to: a copy of the project, a fresh home.

Pulumi resolves `~` (Pulumi.yaml's `file://~/.pulumi-kubeadm-ha`) and its default PULUMI_HOME from the
user database, not from $HOME, so a fresh HOME variable isolates nothing. Every command therefore runs in
a private mount namespace where a temporary directory is bind-mounted over the user's real home
directory: `~`, ~/.pulumi and the backend all land in it, and the real home is never touched.
Every command is bounded; the caller removes the temporary directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.real.engine import toolchain

ROOT = toolchain.ROOT
# What a user has after cloning: the program, its stack files and its requirements.
PROJECT_FILES = ("Pulumi.yaml", "__main__.py", "requirements.txt")
PROJECT_GLOBS = ("Pulumi.*.yaml", "components/*.py")
# Only for the test: the secrets passphrase a user would type at `pulumi stack init`'s prompt.
PASSPHRASE = "engine-lab-passphrase"
REAL_HOME = pwd.getpwuid(os.geteuid()).pw_dir
_IN_FRESH_HOME = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "--",
    "sh",
    "-c",
    f'mount --bind "$FRESH_HOME" {REAL_HOME} && exec "$@"',
    "in-fresh-home",
]


def stack_files() -> list[str]:
    return sorted(path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in ROOT.glob("Pulumi.*.yaml"))


def require_tool(name: str) -> Path:
    """The built tool, or a failure naming the command that builds it (the lab never skips)."""
    path = toolchain.cached(name)
    if not path.is_file():
        pytest.fail(
            f"{name} {toolchain.default_version(name)} is not built: run tests/real/build-binaries {name}",
            pytrace=False,
        )
    return path


@dataclass
class Run:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"$ {' '.join(self.argv)}  (exit {self.returncode}, {self.seconds:.1f} s)\n{self.output[-6000:]}"


@dataclass
class UserSession:
    """A user on a fresh machine: an empty HOME, the project checked out, the CLI on PATH."""

    base: Path
    cli: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def project(self) -> Path:
        return self.base / "kubeadm-ha"

    @property
    def bin(self) -> Path:
        return self.base / "bin"

    def tool(self, path: Path) -> Path:
        """A copy outside the real home (hidden in the namespace), e.g. for `plugin install --file`."""
        self.bin.mkdir(exist_ok=True)
        copy = self.bin / path.name
        if not copy.exists():
            shutil.copy2(path, copy)
        return copy

    def setup(self) -> UserSession:
        self.cli = self.tool(self.cli)
        self.home.mkdir(parents=True)
        self.project.mkdir(parents=True)
        for name in PROJECT_FILES:
            shutil.copy2(ROOT / name, self.project / name)
        for pattern in PROJECT_GLOBS:
            for path in ROOT.glob(pattern):
                target = self.project / path.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        return self

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.bin), "/usr/sbin", "/usr/bin", "/bin"])
        return {
            "HOME": REAL_HOME,  # inside the namespace: the fresh directory
            "FRESH_HOME": str(self.home),
            "PATH": path,
            "LANG": "C.UTF-8",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK": "true",
        }

    def shell(self, script: str, timeout: float = 120) -> Run:
        """A user's shell running `script` in the project directory, with no secrets passphrase preset."""
        env = {key: value for key, value in self.env().items() if key != "PULUMI_CONFIG_PASSPHRASE"}
        return self._run(["bash", "-euo", "pipefail", "-c", script], env, timeout)

    def pulumi(self, *args: str, timeout: float = 120) -> Run:
        return self._run(["pulumi", *args, "--non-interactive"], self.env(), timeout)

    def _run(self, argv: list[str], env: dict[str, str], timeout: float) -> Run:
        started = time.monotonic()
        try:
            done = subprocess.run(
                [*_IN_FRESH_HOME, *argv],
                cwd=self.project,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            run = Run(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
            run = Run(argv, -1, out, err + f"\n(timed out after {timeout} s)", time.monotonic() - started)
        self.runs.append(run)
        return run
