"""`etcd.timing` against the real etcd: the stack refuses exactly the heartbeat and election timeout etcd refuses.

Each pair is given to the program's config model and to the etcd the suite builds (`tests/real/build-binaries
etcd`), started on the flags `render/hardening.etcd_args` renders, as a single new member in a network namespace
of its own (loopback only; `unshare --net`). etcd validates its flags before it opens anything; a pair it accepts
gets as far as its "starting an etcd server" line, which names the timing it runs with, and is then stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from model.config import EtcdMaintenanceConfig
from model.rules import ConfigError
from model.stack import parse_config
from model.timing import EtcdTimingConfig
from render.hardening import etcd_args
from tests.real.binaries import binary

pytestmark = pytest.mark.real

# Bounds etcd's start up to the line that names its timing (a few hundred ms here).
START_BOUND = 30.0
STARTED = "starting an etcd server"


def etcd_verdict(heartbeat: int, election: int, data_dir: Path) -> tuple[bool, str]:
    """(accepted, what etcd said): accepted once it logs that it starts, refused when it exits first."""
    # Rendered without the model's checks, so etcd also gets the pairs the model refuses.
    timing = EtcdTimingConfig.model_construct(heartbeat_interval_ms=heartbeat, election_timeout_ms=election)
    flags = [f"--{name}={value}" for name, value in etcd_args(EtcdMaintenanceConfig(), timing)]
    assert flags[-2:] == [f"--heartbeat-interval={heartbeat}", f"--election-timeout={election}"], flags
    script = 'ip link set lo up && exec "$@"'
    argv = ["unshare", "--net", "--", "bash", "-c", script, "etcd-timing", binary("etcd"), "--name=timing"]
    argv += [f"--data-dir={data_dir}", *flags]
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            said = log.read_text(errors="replace")
            if STARTED in said:
                return True, said
            if process.poll() is not None:
                return False, log.read_text(errors="replace")
            time.sleep(0.05)
        pytest.fail(f"etcd neither started nor exited within {START_BOUND:.0f} s:\n{log.read_text()[-2000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def model_verdict(heartbeat: int, election: int) -> tuple[bool, str]:
    raw = {"etcd": {"timing": {"heartbeatIntervalMs": heartbeat, "electionTimeoutMs": election}}}
    try:
        parse_config({"network": {"cidr": "10.17.5.0/24"}, **raw}, stack="t")
    except ConfigError as error:
        return False, str(error)
    return True, ""


def go_duration(ms: int) -> str:
    """Go's time.Duration.String() for whole milliseconds below a minute, as etcd logs it."""
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


@pytest.mark.parametrize(
    ("heartbeat", "election"),
    [(100, 1000), (100, 500), (100, 499), (500, 5000), (10000, 50000), (10000, 50001), (0, 1000), (100, 0)],
)
def test_the_stack_refuses_exactly_what_etcd_refuses(heartbeat: int, election: int, tmp_path: Path) -> None:
    accepted, said = etcd_verdict(heartbeat, election, tmp_path / "data")
    ours, why = model_verdict(heartbeat, election)
    verdict = "accepted" if accepted else "refused"
    assert ours == accepted, f"etcd {verdict} {heartbeat}/{election}:\n{said[-800:]}\nthe stack: {why or 'accepted'}"
    if accepted:
        # etcd's own account of the timing it runs with (v3.7.0 embed/etcd.go).
        assert f'"heartbeat-interval":"{go_duration(heartbeat)}"' in said, said[-1500:]
        assert f'"election-timeout":"{go_duration(election)}"' in said, said[-1500:]
    else:
        assert "--election-timeout" in said or "--heartbeat-interval" in said, said[-800:]
