"""A lab runner re-executed as the first process of a PID namespace of its own (tests/real/kube_bench.py).

Why: the real lab's nodes share one PID namespace, and tools that read the process table (kube-bench's audits
run `ps -ef | grep kube-apiserver`) would also see every other lab running on the machine. Inside
`unshare --pid --fork --mount-proc` the process table holds the runner and what it starts, nothing else.

The outer process (`run_inside`) keeps what the machine's view is needed for: it removes a killed earlier run's
leftovers first (inside, every other process is invisible, and `cleanup_stale()` would take other labs' for
stale, so it must not run there), passes an interrupt or its bound on as SIGINT (the inner run then tears its
lab down), kills the namespace if that takes longer than STOP_BOUND (the kernel kills everything in a PID
namespace whose first process ends), and removes the network namespace files the inner lab left behind: they are
named after the inner pid (1), which the machine's `cleanup_stale()` cannot tell from a live owner, so the inner
run names its Lab with the outer pid in the tag (`lab_tag`) and records the prefix (`record`).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.netns import NETNS_DIR, Lab, cleanup_stale, scratch_dir

SCRATCH = "KUBEADM_HA_PID_NAMESPACE_SCRATCH"  # set inside: the outer process's scratch directory
OWNER = "KUBEADM_HA_PID_NAMESPACE_OWNER"  # set inside: the outer process's pid
STOP_BOUND = 60.0
PR_SET_PDEATHSIG = 1


def inside() -> bool:
    return bool(os.environ.get(SCRATCH))


def scratch() -> Path:
    return Path(os.environ[SCRATCH])


def lab_tag(tag: str) -> str:
    return f"{tag}{os.environ[OWNER]}"


def record(lab: Lab) -> None:
    (scratch() / "lab-prefix").write_text(lab.prefix)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _delete_netns(names: list[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30, capture_output=True)


def run_inside(module: str, argv: list[str], *, bound: float) -> int:
    """`python -m module argv` as the first process of a new PID namespace; its exit status (124: stopped)."""
    cleanup_stale()
    leftovers = [path.name for path in NETNS_DIR.glob("kha-1-*")] if NETNS_DIR.is_dir() else []
    owners = {name: re.match(r"kha-1-\d+[a-z]+(\d+)-", name) for name in leftovers}
    _delete_netns([name for name, owner in owners.items() if owner and not Path(f"/proc/{owner[1]}").exists()])
    directory = scratch_dir("pidns")
    process = subprocess.Popen(  # a session of its own, so that a Ctrl-C reaches it once, from here
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m", module, *argv],
        env={**os.environ, SCRATCH: str(directory), OWNER: str(os.getpid())},
        start_new_session=True,
        preexec_fn=_die_with_parent,  # if this process is killed, unshare goes, and with it (--kill-child) the rest
    )
    wait, stopping = bound, False
    try:
        while True:
            try:
                return process.wait(timeout=wait)
            except (KeyboardInterrupt, subprocess.TimeoutExpired) as reason:
                if stopping:
                    process.kill()
                    process.wait(timeout=30)
                    return 124
                print(f"{type(reason).__name__}: stopping (at most {STOP_BOUND:.0f} s)", flush=True)
                children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
                for pid in children.read_text().split() if children.exists() else []:
                    os.kill(int(pid), signal.SIGINT)  # the namespace's pid 1: only a handled signal reaches it
                wait, stopping = STOP_BOUND, True
    finally:
        prefix = directory / "lab-prefix"
        if prefix.is_file() and NETNS_DIR.is_dir():
            _delete_netns([path.name for path in NETNS_DIR.glob(prefix.read_text().strip() + "*")])
        subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=False, timeout=120)
