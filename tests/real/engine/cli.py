"""Run the real Pulumi CLI the way the README tells a user to: a copy of the project, a fresh home.

Pulumi resolves `~` (Pulumi.yaml's `file://~/.pulumi-kubeadm-ha`) and its default PULUMI_HOME from the
user database, not from $HOME, so a fresh HOME variable isolates nothing. Every command therefore runs in
a private mount namespace where a temporary directory is bind-mounted over the user's real home
directory: `~`, ~/.pulumi and the backend all land in it, and the real home is never touched.
Other directories can be bound the same way, only inside that namespace (`binds`): a libvirtd the test started
answers at the system socket path /run/libvirt there, so a stack file's `qemu:///system` reaches it unchanged.
Every command is bounded; the caller removes the temporary directory.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from model.release import program_files
from tests.real.engine import toolchain
from tests.real.engine.libvirtd import in_private_mounts

ROOT = toolchain.ROOT
# What a user has after cloning: the program (model.release's own selection: Pulumi.yaml, __main__.py,
# requirements.txt and components/, model/, render/ with render/templates/) and its stack files.
PROJECT_GLOBS = ("Pulumi.*.yaml",)
# Only for the test: the secrets passphrase a user would type at `pulumi stack init`'s prompt.
PASSPHRASE = "engine-lab-passphrase"
REAL_HOME = pwd.getpwuid(os.geteuid()).pw_dir


def _in_fresh_home(binds: dict[Path, Path], shown: list[str]) -> list[str]:
    """The namespace wrapper: the fresh home over the real one, then each `binds` source over its target.

    `shown` are paths inside the real home that stay visible (read-only) at their place, for a Python the
    virtualenv links to (a pyenv under ~): bound into the fresh home first, carried over by --rbind.
    """
    mounts = []
    for relative in shown:
        inside = f'"$FRESH_HOME"/{shlex.quote(relative)}'
        original = shlex.quote(f"{REAL_HOME}/{relative}")
        mounts += [f"mkdir -p {inside}", f"mount --bind {original} {inside}", f"mount -o remount,bind,ro {inside}"]
    mounts.append(f'mount --rbind "$FRESH_HOME" {shlex.quote(REAL_HOME)}')
    mounts += [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}" for dst, src in binds.items()]
    return in_private_mounts(" && ".join([*mounts, 'exec "$@"']), "in-fresh-home")


def stack_files() -> list[str]:
    return sorted(path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in ROOT.glob("Pulumi.*.yaml"))


def readme_setup_commands(stack: str) -> str:
    """The README's "Create a cluster" commands for `stack`, as written, up to (not including) `pulumi up`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Create a cluster", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("pulumi up")]
    assert any(line.startswith("pulumi stack init dev") for line in lines), block
    return "\n".join(re.sub(r"\bdev\b", stack, line) for line in lines) + "\n"


def require_tool(name: str) -> Path:
    """The built tool, or a failure naming the command that builds it (the lab never skips)."""
    path = toolchain.cached(name)
    if not path.is_file():
        pytest.fail(
            f"{name} {toolchain.default_version(name)} is not built: run tests/real/build-binaries {name}",
            pytrace=False,
        )
    return path


def run_bounded(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """`command`'s exit status, stdout and stderr (stdin closed); past `timeout`: -1 and what it printed by then."""
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        return -1, out, err + f"\n(timed out after {timeout} s)"


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
    binds: dict[Path, Path] = field(default_factory=dict)  # target -> source, inside the namespace only
    shown: list[str] = field(default_factory=list)  # paths in the real home kept visible (read-only)

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
        names = [*program_files(ROOT), *(path.name for pattern in PROJECT_GLOBS for path in ROOT.glob(pattern))]
        for name in names:
            target = self.project / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        return self

    def use_virtualenv(self, venv: Path) -> None:
        """Pulumi.yaml's `virtualenv: venv`, already made from requirements.txt (`venv`: the suite's own).

        A virtualenv links to the Python it was made from; when that lives in the real home (pyenv), it stays
        visible there. On a Debian machine it is /usr/bin/python3 and nothing is shown.
        """
        (self.project / "venv").symlink_to(venv)
        interpreter = Path(os.path.realpath(venv / "bin" / "python"))
        if interpreter.is_relative_to(REAL_HOME):
            # The interpreter's installation: the directory above its bin/.
            self.shown.append(str(interpreter.parent.parent.relative_to(REAL_HOME)))

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
        returncode, out, err = run_bounded([*_in_fresh_home(self.binds, self.shown), *argv], self.project, env, timeout)
        run = Run(argv, returncode, out, err, time.monotonic() - started)
        self.runs.append(run)
        return run
