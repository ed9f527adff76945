"""Issue 18, defect 5: whatever ends the drill, what it stopped is started again, and it says so.

A model cluster (tests/unit/test_drill.py's `Model`) fails at each point after a stop: an SSH error outside a
wait, a Ctrl-C inside one, a failing start on the way back, a stop that failed half way. Then real signals
(SIGINT, SIGTERM, SIGHUP) to a child Python process running the drill, whose model keeps one file per stopped
host, so what is left stopped is seen from outside the process. A restore that fails or hangs is reported
with what is still stopped and the command that brings it back; that command is run with the real `sh`.
The real control plane (held static pod manifests put back, its API server serving again) is in
tests/real/test_drill_live.py.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from render.backup import HELD_MANIFEST_DIR
from render.node_prep import STATIC_POD_DIR
from tests.sandbox import unavailable
from tests.unit.test_drill import Model
from tools import drill as drill_tool
from tools.access import Node, StackAccess, ToolError
from tools.drill import drill

ROOT = Path(__file__).resolve().parents[2]
CHILD_BOUND = 60.0


class Failing(Model):
    """The model, failing once at `point` (after the first stop): `error` is raised there."""

    def __init__(self, point: str, error: BaseException, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.point, self.error = point, error
        self.failed = False

    def _fail(self, point: str) -> None:
        if point == self.point and not self.failed and (self.down or self.lb_down or point.startswith("stop")):
            self.failed = True
            raise self.error

    def api_ready(self) -> bool:
        self._fail("api_ready")
        return super().api_ready()

    def etcd_leader(self) -> str | None:
        self._fail("etcd_leader")
        return super().etcd_leader()

    def vip_holder(self) -> str | None:
        self._fail("vip_holder")
        return super().vip_holder()

    def stop_control_plane(self, host: str) -> None:
        super().stop_control_plane(host)
        self._fail("stop_control_plane")  # the hold moved the manifests, then timed out waiting

    def start_control_plane(self, host: str) -> None:
        self._fail("start_control_plane")  # SSH refused on the way back
        super().start_control_plane(host)


CASES = {
    "Ctrl-C in the API wait": ("api_ready", KeyboardInterrupt(), {}, "control plane dev-cp-1"),
    "SSH error outside a wait, past its retries": (
        "etcd_leader", ToolError("drill-etcd failed on dev-etcd-1 (exit 255)"), {"stacked": False},
        "control plane dev-cp-1",
    ),
    "the stop itself failed half way": (
        "stop_control_plane", ToolError("etcd-restore-hold on dev-cp-1 did not finish within 300 s"), {},
        "control plane dev-cp-1",
    ),
    "the start on the way back failed": (
        "start_control_plane", ToolError("ssh: connect to host dev-cp-1: Connection timed out"), {},
        "control plane dev-cp-1",
    ),
    "Ctrl-C in the VIP wait": ("vip_holder", KeyboardInterrupt(), {}, "load balancer dev-lb-1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_every_stop_is_undone_however_the_drill_ends(
    case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "tools.drill_checks.READ_BOUND", 0.0
    )  # a read's error is final at once (retries: test_drill.py)
    point, error, shape, restored = CASES[case]
    model = Failing(point, error, **shape)
    with pytest.raises(type(error)) as raised:
        drill(model, yes=True)
    assert raised.value is error or raised.value.__cause__ is error or str(error) in str(raised.value)
    assert model.down == set() and model.lb_down == set(), f"left stopped: {model.down | model.lb_down}"
    out = capsys.readouterr().out
    assert f"restored {restored}" in out, out
    # Only what was still stopped is started again: a control plane back before the VIP wait is left alone.
    starts = [call for call in model.calls if call.startswith("start")]
    assert starts.count("start dev-cp-1") == 1
    assert starts.count("start dev-lb-1") == (1 if "lb" in restored else 0)


def test_a_restore_that_fails_names_what_is_still_stopped_and_how_to_start_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Unreachable(Failing):
        def start_load_balancer(self, host: str) -> None:
            self.calls.append(f"start {host}")
            raise ToolError(f"drill-lb-start failed on {host} (exit 255):\n  ssh: No route to host")

    model = Unreachable("vip_holder", KeyboardInterrupt())
    with pytest.raises((ToolError, KeyboardInterrupt)) as raised:  # a bare Ctrl-C would end the whole run
        drill(model, yes=True)
    message = str(raised.value)
    assert isinstance(raised.value, ToolError), f"{raised.value!r} instead of what is still stopped"
    assert "STILL STOPPED" in message and "load balancer dev-lb-1" in message, message
    assert "keepalived and HAProxy" in message and "No route to host" in message, message
    assert "model: start load-balancer dev-lb-1" in message, message
    assert isinstance(raised.value.__cause__, KeyboardInterrupt)


def test_a_restore_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that hangs (SSH half open) does not hold the drill: after RESTORE_BOUND it is reported."""
    release = threading.Event()

    class Hanging(Failing):
        def start_control_plane(self, host: str) -> None:
            release.wait(30)

    monkeypatch.setattr(drill_tool, "RESTORE_BOUND", 0.5)
    model = Hanging("api_ready", KeyboardInterrupt())
    started = time.monotonic()
    try:
        with pytest.raises((ToolError, KeyboardInterrupt)) as raised:
            drill(model, yes=True)
    finally:
        release.set()
    assert isinstance(raised.value, ToolError), f"{raised.value!r} instead of what is still stopped"
    assert re.search(r"STILL STOPPED(.|\n)*control plane dev-cp-1(.|\n)*within 0\.5 s", str(raised.value))
    assert time.monotonic() - started < 10


def test_main_exits_128_plus_the_signal_after_restoring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m tools.drill` itself: the production wiring with the model in place of SSH."""

    class Signalled(Model):
        def api_ready(self) -> bool:
            if self.down:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs in this (the main) thread before this returns
            return super().api_ready()

    model = Signalled()
    seen: list[int] = []
    # The test's own handler, so a SIGTERM the drill does not handle is recorded rather than ending pytest.
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    monkeypatch.setattr(drill_tool, "read_stack_outputs", lambda *args: {})
    monkeypatch.setattr(drill_tool, "access_from_outputs", lambda *args: None)
    monkeypatch.setattr(drill_tool, "SshTransport", lambda *args: None)
    monkeypatch.setattr(drill_tool, "StackTarget", lambda *args: model)
    ours = signal.getsignal(signal.SIGTERM)
    try:
        status = drill_tool.main(["--stack", "model", "--yes"])
        assert signal.getsignal(signal.SIGTERM) is ours  # the drill's handlers are gone once it ends
    finally:
        signal.signal(signal.SIGTERM, before)
    assert model.down == set(), f"left stopped: {model.down} (signals the drill did not handle: {seen})"
    captured = capsys.readouterr()
    assert "restored control plane dev-cp-1" in captured.out
    assert "SIGTERM" in captured.err
    assert status == 128 + signal.SIGTERM


CHILD = r"""
import subprocess, sys
from pathlib import Path
from tests.sandbox import unavailable
from tests.unit.test_drill import Model
from tools.drill import drill

state, victim = Path(sys.argv[1]), sys.argv[2]

class Files(Model):
    # One file per stopped host, so the parent sees from outside what the drill left stopped.
    def stop_control_plane(self, host):
        super().stop_control_plane(host)
        self._stopped(host)

    def stop_load_balancer(self, host):
        super().stop_load_balancer(host)
        if host == victim:
            self.vip = host  # the VIP never moves: the drill waits (bounded) for it
        self._stopped(host)

    def _stopped(self, host):
        (state / host).touch()
        print("STOPPED", host, flush=True)

    def api_ready(self):
        return victim not in self.down and super().api_ready()

    def start_control_plane(self, host):
        self._start(host)
        super().start_control_plane(host)

    def start_load_balancer(self, host):
        self._start(host)
        super().start_load_balancer(host)

    def _start(self, host):
        # The victim's start runs a child process, as SSH is in production, that is still running when the
        # line below tells the parent to send the next signal.
        ssh = subprocess.Popen(["sleep", "1.5" if host == victim else "0"])
        print("STARTING", host, flush=True)
        if ssh.wait(timeout=30) != 0:
            raise RuntimeError(f"the start's child process ended with {ssh.returncode}")
        (state / host).unlink(missing_ok=True)

drill(Files(), yes=True)
"""


def run_child(tmp_path: Path, victim: str, signals: list[signal.Signals]) -> tuple[int, str]:
    """The drill in a child Python process; `signals[0]` once `victim` is stopped, each later one once the
    restore of `victim` has begun, each to the child's whole process group as a terminal sends Ctrl-C.
    Returns (exit status, output)."""
    state = tmp_path / "stopped"
    state.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(  # the drill in its own process: the signal goes to it, not to pytest
        [sys.executable, str(script), str(state), victim],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,  # read straight from the pipe: a buffered reader would hide lines from select()
        start_new_session=True,  # its own process group, which a terminal's Ctrl-C signals as a whole
    )
    assert child.stdout is not None
    output = ""
    pending = list(signals)
    triggers = [f"STOPPED {victim}"] + [f"STARTING {victim}"] * (len(signals) - 1)
    deadline = time.monotonic() + CHILD_BOUND
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=1):
                    continue
                chunk = os.read(child.stdout.fileno(), 65536).decode(errors="replace")
                if not chunk:
                    break
                output += chunk
                # Each trigger once, in order: the n-th signal goes once the n-th trigger line has appeared.
                sent = len(signals) - len(pending)
                if pending and output.count(triggers[sent] + "\n") > triggers[:sent].count(triggers[sent]):
                    os.killpg(child.pid, pending.pop(0))  # the whole group: the drill and its children
        status = child.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        child.stdout.close()
    left = sorted(path.name for path in state.iterdir())
    assert not pending, f"the drill never reached the point to signal at:\n{output}"
    assert left == [], f"left stopped after the drill ended: {left}\n{output}"
    return status, output


@pytest.mark.parametrize(
    ("victim", "signals"),
    [
        ("dev-cp-1", [signal.SIGINT]),
        ("dev-cp-1", [signal.SIGHUP]),
        ("dev-lb-1", [signal.SIGTERM]),
        ("dev-cp-1", [signal.SIGINT, signal.SIGINT]),  # a second Ctrl-C while restoring does not cut it short
    ],
    ids=["SIGINT-control-plane", "SIGHUP-control-plane", "SIGTERM-load-balancer", "SIGINT-twice"],
)
def test_a_signal_to_the_drill_process_restores_what_it_stopped(
    tmp_path: Path, victim: str, signals: list[signal.Signals]
) -> None:
    status, output = run_child(tmp_path, victim, signals)
    kind = "control plane" if "cp" in victim else "load balancer"
    assert f"restored {kind} {victim}" in output, output
    if len(signals) > 1:
        assert "(SIGINT while restoring: it went on to its end)" in output, output
    assert status != 0, output


def test_the_manual_command_puts_the_held_manifests_back(tmp_path: Path) -> None:
    """The command printed when a restore fails, run with the real `sh` (its absolute paths moved under
    tmp_path); the SSH and sudo words are checked as words."""
    from tools.drill_stack import manual_start  # here: without it (before the fix) the other tests still run

    access = StackAccess(
        stack="prod", nodes={"prod-cp-1": Node("prod-cp-1", "10.20.0.11", "cp"),
                             "prod-lb-1": Node("prod-lb-1", "10.20.0.5", "lb")},
        ssh_user="ubuntu", ssh_private_key="", host_keys={}, etcd_topology="stacked", backup_directory="/b",
    )  # fmt: skip
    words = shlex.split(manual_start(access, "prod-cp-1", "control-plane"))
    assert words[:4] == ["ssh", "-l", "ubuntu", "10.20.0.11"] and len(words) == 5
    remote = shlex.split(words[4])
    assert remote[:3] == ["sudo", "sh", "-c"] and len(remote) == 4
    held, manifests = tmp_path / "held", tmp_path / "manifests"
    held.mkdir()
    manifests.mkdir()
    for name in ("etcd.yaml", "kube-apiserver.yaml", "kube-scheduler.yaml"):  # the controller manager's not held
        (held / name).write_text(name)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck is not installed (Debian package `shellcheck`)")
    checked = subprocess.run(
        [shellcheck, "--severity=style", "--shell=sh", "-"], input=remote[3], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    inner = remote[3].replace(HELD_MANIFEST_DIR, str(held)).replace(STATIC_POD_DIR, str(manifests))
    for _ in range(2):  # idempotent: a second run finds nothing held and succeeds
        ran = subprocess.run(["sh", "-c", inner], capture_output=True, text=True, timeout=10, check=False)
        assert ran.returncode == 0, ran.stderr
    assert sorted(path.name for path in manifests.iterdir()) == ["etcd.yaml", "kube-apiserver.yaml",
                                                                 "kube-scheduler.yaml"]  # fmt: skip
    assert list(held.iterdir()) == []
    lb = shlex.split(manual_start(access, "prod-lb-1", "load-balancer"))
    assert lb[:4] == ["ssh", "-l", "ubuntu", "10.20.0.5"] and shlex.split(lb[4]) == [
        "sudo", "systemctl", "start", "haproxy", "keepalived",
    ]  # fmt: skip
