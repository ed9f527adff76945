"""A sandbox that runs a rendered node script, unmodified, as root without touching the host.

The script runs with bash as root (directly or through passwordless `sudo -n`) in a private mount
namespace (`unshare --mount`) where /etc and /var are overlayfs mounts whose upper layers live in the
test's temp dir, so every absolute path the script writes lands in the sandbox.

Programs the script must not really run are *stubs*, first on PATH. Each stub records its call (one
tab-separated line in `calls.log`) and then runs the bash snippet the test gave for it, with the call's
arguments in "$@" (a `Stub(snippet, reads_stdin=True)` reads its whole input before recording, so that
in `curl | gpg` curl's call is always logged first). Snippets may keep state in files under `$STATE`
(the sandbox's `state/` directory, outside the overlays, so it survives between runs and stands for
anything outside the node: the cluster's API, the package repositories). Helpers for a snippet:

* `$name`: the program's name; `$STATE`: the state directory;
* `opt FLAG "$@"`: prints the value given after FLAG (exit 1 if FLAG is absent);
* `has FLAG "$@"`: true if FLAG is one of the arguments.

`STUB_FAIL=<name>` in the run's environment makes every call of that stub fail with exit 42.

Without root/sudo or mount-namespace support `require_sandbox` skips the test, or fails it under
CI=true (the suite's policy, as in tests/integration/conftest.py).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from render.scripts import Script

OVERLAID = ("etc", "var")
# A stub that only records its call.
RECORD_ONLY = ""


@dataclass(frozen=True)
class Stub:
    """A stub's bash snippet; `reads_stdin` for one at the end of a pipe (it records its call once the pipe is done)."""

    snippet: str
    reads_stdin: bool = False


_PRELUDE = r"""#!/bin/bash
set -eu
name="${0##*/}"
export STATE="$STUB_STATE"
reads_stdin=@READS_STDIN@
if [ "$reads_stdin" = yes ]; then
  # Read the whole input before recording: in `a | stub`, a's call is then always logged first.
  input="$(mktemp)"
  cat >"$input"
  exec <"$input"
  rm -f "$input"
fi
record="$name"
for arg in "$@"; do record+=$'\t'"$arg"; done
printf '%s\n' "$record" >>"$STUB_LOG"  # one write: lines of concurrent stubs do not interleave
if [ "${STUB_FAIL:-}" = "$name" ]; then echo "stub $name: injected failure" >&2; exit 42; fi
opt() {
  local flag="$1"
  shift
  while [ "$#" -gt 0 ]; do
    if [ "$1" = "$flag" ]; then printf '%s' "${2-}"; return 0; fi
    shift
  done
  return 1
}
has() {
  local flag="$1"
  shift
  local arg
  for arg in "$@"; do [ "$arg" = "$flag" ] && return 0; done
  return 1
}
"""


def unavailable(reason: str) -> NoReturn:
    """The suite's policy (as in tests/integration/conftest.py): skip locally, fail under CI=true."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def privilege() -> list[str] | None:
    """How to become root for `unshare --mount`: directly, or through passwordless sudo; None if neither.

    A user namespace (`unshare --map-root-user`) is not enough: its root cannot write into the overlay's
    root-owned lower directories (/etc, /var/log), because their owner is not mapped into the namespace.
    """
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0
    ):
        return ["sudo", "-n", "--"]
    return None


def _namespaced(privilege: list[str], environment: Mapping[str, str], inner: str, *args: str) -> list[str]:
    # `env` after sudo: sudo would otherwise reset PATH (secure_path) and drop the stub variables.
    assignments = [f"{key}={value}" for key, value in sorted(environment.items())]
    return [*privilege, "env", "-i", *assignments, "unshare", "--mount", "--propagation", "private",
            "bash", "-c", inner, "sandbox", *args]  # fmt: skip


def require_sandbox(scratch: Path) -> None:
    """Skip (or fail under CI=true) unless an overlay can be mounted in a private mount namespace.

    `scratch` is an empty directory for the probe.
    """
    if shutil.which("unshare") is None:
        unavailable("`unshare` (util-linux) is not installed")
    become = privilege()
    if become is None:
        unavailable("the sandbox needs root or passwordless sudo for `unshare --mount` and overlay mounts")
    if str(scratch.resolve()).startswith(tuple(f"/{name}/" for name in OVERLAID)):
        unavailable(f"the temp dir {scratch} is inside an overlaid directory; set --basetemp elsewhere")
    for part in ("upper", "work"):
        (scratch / part).mkdir()
    mount = f"mount -t overlay overlay -o lowerdir=/etc,upperdir={scratch / 'upper'},workdir={scratch / 'work'} /etc"
    result = subprocess.run(
        _namespaced(become or [], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, f"{mount} && touch /etc/probe"),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not (scratch / "upper" / "probe").exists():
        unavailable(f"cannot mount an overlay in a private mount namespace: {result.stderr.strip()}")


class Sandbox:
    """One fake node: overlay upper layers, stub programs, their call log and their state."""

    def __init__(self, root: Path, stubs: Mapping[str, str | Stub]):
        self.root = root
        self.stubs = root / "stubs"
        self.state = root / "state"
        self.calls = root / "calls.log"
        self.stubs.mkdir(parents=True)
        self.state.mkdir()
        for name, given in stubs.items():
            if "/" in name or not name:
                raise ValueError(f"bad stub name {name!r}")
            spec = given if isinstance(given, Stub) else Stub(given)
            reads_stdin = "yes" if spec.reads_stdin else "no"
            stub = self.stubs / name
            stub.write_text(_PRELUDE.replace("@READS_STDIN@", reads_stdin, 1) + spec.snippet + "\n")
            stub.chmod(0o755)
        for name in OVERLAID:
            (root / "upper" / name).mkdir(parents=True)
            (root / "work" / name).mkdir(parents=True)
        self.calls.touch()

    def run(
        self,
        script_text: str,
        *,
        setup: str = "",
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the script with bash; `setup` is shell run first inside the namespace (as root, stubs not on PATH)."""
        become = privilege()
        assert become is not None
        script = self.root / "script.sh"
        script.write_text(script_text)
        mounts = "\n".join(
            f"mount -t overlay overlay -o lowerdir=/{name},"
            f"upperdir={shlex.quote(str(self.root / 'upper' / name))},"
            f"workdir={shlex.quote(str(self.root / 'work' / name))} /{name}"
            for name in OVERLAID
        )
        # The layers are handed back to the test's user, so that it can read what a run under sudo wrote.
        inner = (
            f'set -eu\n{mounts}\n{setup}\nrc=0; PATH="$4:$PATH" bash "$1" || rc=$?\nchown -R "$2" "$3"\nexit "$rc"\n'
        )
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "STUB_LOG": str(self.calls),
            "STUB_STATE": str(self.state),
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        owner = f"{os.getuid()}:{os.getgid()}"
        return subprocess.run(
            _namespaced(become, environment, inner, str(script), owner, str(self.root), str(self.stubs)),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def run_concurrently(
        self, script_text: str, copies: int, *, stdin: str = "", env: Mapping[str, str] | None = None
    ) -> list[tuple[int, str]]:
        """Start `copies` runs of the script at once on this one node; each run's exit status and output.

        One namespace holds them all (separate overlay mounts of the same layers would not see each
        other's writes), as concurrent steps on one real node would share its files.
        """
        runs = self.root / "concurrent"
        runs.mkdir(exist_ok=True)
        (runs / "script.sh").write_text(script_text)
        (runs / "stdin").write_text(stdin)
        script, quoted_stdin = shlex.quote(str(runs / "script.sh")), shlex.quote(str(runs / "stdin"))
        driver = "\n".join(
            [
                "pids=()",
                f"for i in $(seq {copies}); do",
                f"  bash {script} <{quoted_stdin} >{shlex.quote(str(runs))}/out.$i 2>&1 &",
                '  pids+=("$!")',
                "done",
                'for i in "${!pids[@]}"; do',
                '  rc=0; wait "${pids[$i]}" || rc=$?',
                f'  echo "$rc" >{shlex.quote(str(runs))}/rc.$((i + 1))',
                "done",
            ]
        )
        result = self.run(driver + "\n", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return [(int((runs / f"rc.{i}").read_text()), (runs / f"out.{i}").read_text()) for i in range(1, copies + 1)]

    def call_lines(self) -> list[list[str]]:
        return [line.split("\t") for line in self.calls.read_text().splitlines()]

    def calls_of(self, program: str) -> list[list[str]]:
        """The arguments of each recorded call of the stub `program`, in order."""
        return [call[1:] for call in self.call_lines() if call[0] == program]

    def file(self, path: str) -> Path:
        """Where the node's `path` is in the upper layer (only what the runs or the test wrote is there)."""
        return self.root / "upper" / path.lstrip("/")

    def exists(self, path: str) -> bool:
        """Whether the node has `path` in its upper layer (an overlay whiteout means deleted)."""
        try:
            info = os.lstat(self.file(path))
        except FileNotFoundError:
            return False
        return not (stat.S_ISCHR(info.st_mode) and info.st_rdev == 0)

    def put(self, path: str, content: str, mode: int = 0o600) -> None:
        """Give the node a file before a run (written into the upper layer)."""
        target = self.file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)

    def put_state(self, relative: str, content: str = "") -> None:
        target = self.state / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)

    def snapshot(self, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
        """Every entry of the upper layers and the stub state: path -> (mode, content digest or link target).

        Node paths are absolute (`/etc/...`); state paths are `state/...`.
        """
        entries = {}
        bases = [(self.root / "upper", self.root / "upper" / name) for name in OVERLAID]
        bases.append((self.root, self.state))
        for base, top in bases:
            for directory, _, files in os.walk(top):
                for entry in [directory, *(os.path.join(directory, f) for f in files)]:
                    relative = os.path.relpath(entry, base)
                    if base != self.root:
                        relative = "/" + relative
                    if relative.startswith(skip):
                        continue
                    info = os.lstat(entry)
                    if stat.S_ISREG(info.st_mode):
                        content = hashlib.sha256(Path(entry).read_bytes()).hexdigest()
                    elif stat.S_ISLNK(info.st_mode):
                        content = os.readlink(entry)
                    else:
                        content = ""
                    entries[relative] = (info.st_mode, content)
        return entries

    def run_first(
        self,
        script: Script,
        *,
        setup: str = "",
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> list[list[str]]:
        """Run a rendered step expecting it to do its work; the calls it made."""
        before = len(self.call_lines())
        result = self.run(script.render(), setup=setup, env=env, stdin=stdin)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"kubeadm-ha: {script.step} done on {script.host}\n" in result.stdout
        assert "already done" not in result.stdout
        return self.call_lines()[before:]

    def run_again(
        self,
        script: Script,
        read_only: Callable[[list[str]], bool],
        *,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> list[list[str]]:
        """Run a step again: it must say so, make only `read_only` calls and change no file; the calls it made."""
        before_files = self.snapshot()
        before = len(self.call_lines())
        result = self.run(script.render(), env=env, stdin=stdin)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == f"kubeadm-ha: {script.step} already done on {script.host}; nothing to do\n"
        calls = self.call_lines()[before:]
        assert all(read_only(call) for call in calls), calls
        assert self.snapshot() == before_files
        return calls
