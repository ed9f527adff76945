"""A throwaway Pulumi project run by the real CLI, language host and plugins, measured and bounded.

For the engine tests that need a program of their own (pulumi-tls renewal, the trivial program the performance
test compares against): a directory with Pulumi.yaml and __main__.py, the suite's virtualenv (made from
requirements-dev.txt, so the SDKs are the pinned ones), a file backend and a PULUMI_HOME of its own with every
plugin installed from its built file (plugins.install_into: downloads disabled, so an attempt fails the run).

Every command runs in a session of its own (its process group is the CLI, the language host, the Python
program and the provider plugins), bounded: on a timeout, and in any case when it returns, whatever is left of
the group is killed by its id. While it runs, the resident memory of every process in that session is summed
every SAMPLE_SECONDS (from /proc/PID/statm); the peak of that sum is `peak_tree_rss_mib`. The command runs
under GNU time (`/usr/bin/time -f`), whose maximum RSS is getrusage(RUSAGE_CHILDREN).ru_maxrss: on Linux that
is the largest single process of the tree, not the tree's sum (getrusage(2)), kept as `peak_process_rss_mib`;
its user + system CPU time is the whole tree's (every descendant that was waited for), kept as `cpu_seconds`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.release import program_files
from tests.real.engine import plugins
from tests.real.engine.libvirtd import in_private_mounts
from tests.real.engine.toolchain import ROOT

PASSPHRASE = "engine-lab-passphrase"  # only for the test's own throwaway stacks
SAMPLE_SECONDS = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measured:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_tree_rss_mib: float  # the peak of the summed RSS of the session's processes (sampled)
    peak_process_rss_mib: float  # GNU time's %M: the largest single process (getrusage RUSAGE_CHILDREN)
    cpu_seconds: float  # GNU time's %U + %S: user and system CPU of every process of the tree that was waited for

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"$ {' '.join(self.argv)}  (exit {self.returncode}, {self.seconds:.1f} s)\n{self.output[-6000:]}"


def _session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(entry)) == session:
                members.append(int(entry))
    return members


def _tree_rss_bytes(session: int) -> int:
    total = 0
    for pid in _session_members(session):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def _kill_session(session: int) -> None:
    """Kill, by id, every process left in the session the command was started in."""
    for pid in _session_members(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_measured(
    argv: list[str], cwd: Path, env: Mapping[str, str], timeout: float, prefix: Sequence[str] = ()
) -> Measured:
    """Run `argv` under GNU time in a new session, sampling the session's summed RSS; bounded by `timeout`.

    `prefix` (a namespace wrapper that execs its arguments) keeps the PID, so the session is the same.
    """
    report = cwd / f".time-{os.getpid()}-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [*prefix, "/usr/bin/time", "-o", str(report), "-f", "%M %U %S", *argv],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(process.pid))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        try:
            out, err = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            _kill_session(process.pid)
            out, err = process.communicate(timeout=30)
            err += f"\n(timed out after {timeout} s)"
            code = -1
        seconds = time.monotonic() - started
    finally:
        done.set()
        sampler.join(timeout=10)
        _kill_session(process.pid)  # plugins the CLI left behind, if any
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    largest = cpu = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        # The last line (GNU time writes "Command exited with non-zero status N" first when it fails).
        kib, user, system = report.read_text().splitlines()[-1].split()
        largest, cpu = int(kib) / 1024, float(user) + float(system)
    report.unlink(missing_ok=True)
    return Measured(argv, code, out, err, seconds, peak / 2**20, largest, cpu)


@dataclass
class ScratchProject:
    """`base`/project (the program), `base`/state (the file backend), `base`/pulumi-home (PULUMI_HOME)."""

    base: Path
    name: str = "scratch"
    extra_env: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # set by setup(): the engine's environment
    binds: dict[Path, Path] = field(default_factory=dict)  # target -> source, inside the commands' namespace
    runs: list[Measured] = field(default_factory=list)

    @property
    def project(self) -> Path:
        return self.base / "project"

    def setup(self, program: str | None = None) -> ScratchProject:
        """`program` as __main__.py with a Pulumi.yaml of its own, or (None) the product as a user has it."""
        self.project.mkdir(parents=True)
        (self.base / "state").mkdir()
        if program is None:
            for name in program_files(ROOT):  # Pulumi.yaml (`virtualenv: venv`), __main__.py, the packages
                target = self.project / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target)
            (self.project / "venv").symlink_to(sys.prefix)
        else:
            (self.project / "Pulumi.yaml").write_text(
                f"name: {self.name}\n"
                f"runtime:\n  name: python\n  options:\n    toolchain: pip\n    virtualenv: {sys.prefix}\n"
            )
            (self.project / "__main__.py").write_text(program)
        self.env = {
            **plugins.install_into(self.base / "pulumi-home"),
            # Beats Pulumi.yaml's backend.url (the product's `file://~/...`): nothing lands in the real home.
            "PULUMI_BACKEND_URL": f"file://{self.base / 'state'}",
            "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            **self.extra_env,
        }
        return self

    def prefix(self) -> list[str]:
        """A private mount namespace with each of `binds` (target: source) mounted, e.g. a libvirtd's sockets."""
        if not self.binds:
            return []
        mounts = [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}" for dst, src in self.binds.items()]
        return in_private_mounts(" && ".join([*mounts, 'exec "$@"']), "scratch")

    def remove(self) -> None:
        """The project, its state and its PULUMI_HOME (with its plugin copies): gone, whatever happened."""
        shutil.rmtree(self.base, ignore_errors=True)

    def pulumi(self, *args: str, timeout: float = 300) -> Measured:
        argv = ["pulumi", *args, "--non-interactive"]
        run = run_measured(argv, self.project, self.env, timeout, prefix=self.prefix())
        self.runs.append(run)
        return run

    def must(self, *args: str, timeout: float = 300) -> Measured:
        run = self.pulumi(*args, timeout=timeout)
        assert run.returncode == 0, run.describe()
        return run
