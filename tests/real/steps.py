"""A program step's own script run on a lab node as pulumi-command runs it: `bash -c SCRIPT NAME` as root, in the
node's network and mount namespaces, its stdin bundle (if any) on stdin, with the real kubeadm and kubectl and the
`crictl`/`pgrep` stand-ins of tests/real/kubelet.py on PATH. The script and bundle come unmodified from the
evaluated program (`tools.plan.script_of`, the step's `stdin` input).

`start_node_step` runs one in the background in a process group of its own, so that `kill_group` can end all of it
at once, as a dropped SSH session or a killed `pulumi up` ends a step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.real.control_plane_lab import ControlPlaneLab, Node
from tests.real.kubelet import node_tools
from tests.real.node_root import DEFAULT_PATH, Ran

STEP_BOUND = 900.0


def step_path(lab: ControlPlaneLab) -> str:
    links: dict[str, str] = {name: lab.binaries[name] for name in ("kubeadm", "kubectl") if name in lab.binaries}
    return f"{node_tools(lab.work / 'step-bin', links)}:{DEFAULT_PATH}"


def run_node_step(
    lab: ControlPlaneLab, node: Node, script: str, *, name: str, stdin: str | None = None, timeout: float = STEP_BOUND
) -> tuple[Ran, float]:
    """The step, bounded; its (masked) output and the seconds it took."""
    started = time.monotonic()
    ran = node.root.run(
        ["bash", "-c", script, f"kubeadm-ha-{name}"],
        netns=node.namespace.name,
        timeout=timeout,
        env={"PATH": step_path(lab)},
        stdin=stdin,
    )
    return ran, time.monotonic() - started


def start_node_step(
    lab: ControlPlaneLab, node: Node, script: str, log: Path, *, name: str, stdin: str | None = None
) -> subprocess.Popen[bytes]:
    """The step as `run_node_step` runs it, in the background, its output in `log`."""
    with log.open("wb") as out:
        process = subprocess.Popen(  # the program's own step script, unmodified
            ["ip", "netns", "exec", node.namespace.name,
             *node.root.wrap(["bash", "-c", script, f"kubeadm-ha-{name}"])],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": step_path(lab)},
            cwd=node.root.directory,
            start_new_session=True,
        )  # fmt: skip
    if stdin is not None:
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
