"""A program step run on a lab node as pulumi-command runs it (bash -c, as root, its bundle on stdin), in the
node's network and mount namespaces with the real kubeadm and the `crictl`/`pgrep` stand-ins
(tests/real/kubelet.py); in the foreground or, to be killed halfway, in a process group of its own. Shared by the
certificate renewal (tests/real/renewal.py) and the settings step (tests/real/test_settings_live.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.real.control_plane_lab import ControlPlaneLab, Node
from tests.real.kubelet import node_tools
from tests.real.node_root import DEFAULT_PATH, Ran

STEP_BOUND = 900.0
_GUARD = re.compile(r'^if .+; then\n  echo "kubeadm-ha: \$\{KUBEADM_HA_STEP\} already done', re.M)


def functions_of(script: str) -> str:
    """A rendered step's prologue and functions: all before its idempotency guard, to run one of them alone."""
    found = _GUARD.search(script)
    assert found is not None, "the rendered step has no idempotency guard"
    return script[: found.start()]


def step_tools(lab: ControlPlaneLab) -> Path:
    """The directory at the front of a step's PATH: the stand-ins, the real kubeadm and kubectl."""
    links = {name: lab.binaries[name] for name in ("kubeadm", "kubectl") if name in lab.binaries}
    return node_tools(lab.work / "step-bin", links)


def run_node_step(
    lab: ControlPlaneLab, node: Node, script: str, *, name: str, stdin: str = "", timeout: float = STEP_BOUND
) -> tuple[Ran, float]:
    """Run the step to its end (bounded); returns what it printed and the seconds it took."""
    started = time.monotonic()
    ran = node.root.run(
        ["bash", "-c", script, name],
        netns=node.namespace.name,
        timeout=timeout,
        env={"PATH": f"{step_tools(lab)}:{DEFAULT_PATH}"},
        stdin=stdin,
    )
    return ran, time.monotonic() - started


def start_node_step(
    lab: ControlPlaneLab, node: Node, script: str, log: Path, *, name: str, stdin: str = ""
) -> subprocess.Popen[bytes]:
    """The step as `run_node_step` runs it, in the background, output to `log` (its own process group, so the
    test can kill all of it at once, as a dropped SSH session or a killed `pulumi up` ends it)."""
    with log.open("wb") as out:
        process = subprocess.Popen(  # the program's own step script, unmodified
            ["ip", "netns", "exec", node.namespace.name, *node.root.wrap(["bash", "-c", script, name])],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": f"{step_tools(lab)}:{DEFAULT_PATH}"},
            cwd=node.root.directory,
            start_new_session=True,
        )
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        process.stdin.write(stdin.encode())
    process.stdin.close()
    return process


def kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def on_node(node: Node, *argv: str) -> None:
    ran = node.root.run(list(argv), netns=node.namespace.name, timeout=30)
    assert ran.returncode == 0, ran.output


def write_on_node(node: Node, path: str, content: bytes) -> None:
    """Write a file as a process of the node does (inside its mount namespace), keeping the file's mode."""
    ran = node.root.run(
        ["bash", "-c", 'cat >"$1"', "write", path], netns=node.namespace.name, timeout=30, stdin=content.decode()
    )
    assert ran.returncode == 0, ran.output
