"""The cluster lab's CPU priority: the first control plane's QEMU before the load balancers' and workers'.

Lab run 15 (2 LBs, 1 CP, 1 worker on 2 host cores under TCG) lost its day-2 stages to kube-apiserver on cp-1
crash-looping: its `start-service-ip-repair-controllers` post-start hook must finish within a fixed minute
(kube-apiserver v1.37.2 pkg/registry/core/rest/storage_core.go), and cp-1's QEMU got 84-118 % of a core while
the LBs' took 22-58 % between them. On hardware each VM has its own cores; here they share two. So the lab can
give every QEMU but the control planes' a higher nice value: when they compete, the control planes win, and
an idle LB or worker costs nothing either way.

Linux keeps a nice value per thread (setpriority(2), "BUGS"), and QEMU's vCPU threads are its own tasks, so
every task of the process is set, and processes that start later (an added worker) are found by polling.
Lab-only: the product never changes a hypervisor's scheduling.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 5.0


def _guest_name(pid: str) -> str | None:
    """The libvirt domain a QEMU process runs (`-name guest=NAME,...`), or None for any other process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system"):
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name":
            for part in value.decode(errors="replace").split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
    return None


@dataclass
class Favour:
    """Gives QEMU processes of domains named `scope`... but not `favoured`... the nice value `nice`."""

    scope: str
    favoured: str
    nice: int
    niced: dict[str, int] = field(default_factory=dict)  # domain -> tasks set so far

    def once(self) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            name = _guest_name(pid)
            if name is None or not name.startswith(self.scope) or name.startswith(self.favoured):
                continue
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    if os.getpriority(os.PRIO_PROCESS, int(tid)) != self.nice:
                        os.setpriority(os.PRIO_PROCESS, int(tid), self.nice)
                        self.niced[name] = self.niced.get(name, 0) + 1
                except (ProcessLookupError, PermissionError):
                    continue

    def __str__(self) -> str:
        if not self.niced:
            return f"nice {self.nice}: no QEMU task set"
        return f"nice {self.nice} for " + ", ".join(f"{name} ({n} tasks)" for name, n in sorted(self.niced.items()))


@contextmanager
def favour(scope: str, favoured: str, nice: int) -> Iterator[Favour]:
    """Poll every POLL_SECONDS until the block ends; with `nice` 0 do nothing."""
    state = Favour(scope, favoured, nice)
    if nice == 0:
        yield state
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            state.once()
            stop.wait(POLL_SECONDS)

    poller = threading.Thread(target=loop, name="cluster-nice", daemon=True)
    poller.start()
    try:
        yield state
    finally:
        stop.set()
        poller.join(timeout=2 * POLL_SECONDS)
