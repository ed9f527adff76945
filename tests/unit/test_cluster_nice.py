"""The cluster lab's CPU priority (tests/real/cluster_nice.py) on real processes that look like QEMU to it: an
argv[0] of qemu-system-x86_64 and libvirt's `-name guest=NAME,debug-threads=on`, with a second thread as QEMU
has for each vCPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.real import cluster_nice

FAKE_QEMU = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
# The guests' names are this run's own: a real cluster lab on the host (guests `lab-*`) is never matched, nor
# reniced by the test.
PREFIX = f"test{os.getpid()}-"
SCOPE = f"{PREFIX}lab-"
FAVOURED = f"{SCOPE}cp-"


@pytest.fixture
def guests() -> Iterator[dict[str, int]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("lab-lb-1", "lab-cp-1", "lab-worker-2", "other-lb-1"):
            argv = ["bash", "-c", 'exec -a qemu-system-x86_64 "$@"', "bash", sys.executable, "-c", FAKE_QEMU]
            started[name] = subprocess.Popen([*argv, "-name", f"guest={PREFIX}{name},debug-threads=on"])
        for process in started.values():
            deadline = time.monotonic() + 10
            while len(os.listdir(f"/proc/{process.pid}/task")) < 2:
                assert time.monotonic() < deadline, "the fake QEMU never started its second thread"
                time.sleep(0.05)
        yield {name: process.pid for name, process in started.items()}
    finally:
        for process in started.values():
            process.kill()
            process.wait(timeout=10)


def _nice_values(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_every_thread_of_the_lab_s_lbs_and_workers_is_niced_and_nothing_else(guests: dict[str, int]) -> None:
    favour = cluster_nice.Favour(scope=SCOPE, favoured=FAVOURED, nice=10)
    favour.once()
    assert {name: _nice_values(pid) for name, pid in guests.items()} == {
        "lab-lb-1": {10},
        "lab-cp-1": {0},
        "lab-worker-2": {10},
        "other-lb-1": {0},
    }
    lb, worker = f"{SCOPE}lb-1", f"{SCOPE}worker-2"
    assert favour.niced == {lb: 2, worker: 2}
    favour.once()  # a second pass finds nothing to change
    assert favour.niced == {lb: 2, worker: 2}
    assert str(favour) == f"nice 10 for {lb} (2 tasks), {worker} (2 tasks)"


def test_the_poller_finds_the_guests_and_stops_with_its_block(guests: dict[str, int]) -> None:
    with cluster_nice.favour(SCOPE, FAVOURED, 7) as favour:
        deadline = time.monotonic() + 2 * cluster_nice.POLL_SECONDS
        while set(favour.niced) != {f"{SCOPE}lb-1", f"{SCOPE}worker-2"}:
            assert time.monotonic() < deadline, favour.niced
            time.sleep(0.1)
    assert _nice_values(guests["lab-lb-1"]) == {7}
    assert not any(thread.name == "cluster-nice" for thread in threading.enumerate())
