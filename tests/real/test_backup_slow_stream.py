"""Issue 18, defect 2: an etcd snapshot whose stream outlasts etcdctl's `--command-timeout` (10 s) is still taken,
and a backup that does fail is visible: the timer's command exits non-zero and keeps nothing, and
`tools.etcd_backup` says how old the newest good snapshot of each member is.

etcdctl bounds `snapshot save` by `--command-timeout` whenever the flag is given (etcd v3.6/v3.7
etcdctl/ctlv3/command/snapshot_command.go `snapshotSaveCommandFunc`, `isCommandTimeoutFlagSet` in util.go), so
the timer's script used to cancel every snapshot that took longer than 10 s to stream with DeadlineExceeded.

Real: the lab of tests/real/test_ctr_etcd_tools.py (containerd 2.2, ctr, the runc shim, runc, etcd 3.7 with TLS
client-certificate auth, etcdctl/etcdutl inside the container, all in one network namespace); the timer's script
(`backup_script`, what the unit's ExecStart runs) and the tool (`tools.etcd_backup.backup --now`), rendered by
the program and run by bash; a keyspace of some tens of MiB written through etcd; the kernel's token bucket
filter (`tc qdisc ... tbf`) on the namespace's loopback, which is the link between etcdctl and etcd there, set
so that the snapshot takes about STREAM_SECONDS to stream.
Stand-ins, as in that module: the image (built locally around the real etcdctl/etcdutl), the certificates, the
paths (moved under the test's directory). Here also: `CtrTransport` runs the tool's scripts in the namespace
where production uses SSH; the "cut off" test renders the script with a 3 s snapshot bound (monkeypatched
`SNAPSHOT_TIMEOUT_SECONDS`) so that the bound's end, not a minutes-long wait, is what stops the stream; and the
age report reads a clock 3 hours ahead, as an operator would run the tool 3 hours after backups stopped.

Runs as root; needs what tests/real/test_ctr_etcd_tools.py needs, and `tc` (iproute2) with the kernel's tbf.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

import render.backup as backup_module
from render.backup import BACKUP_SCRIPT_PATH, BackupPolicy, backup_script
from render.scripts import Script
from tests.integration.conftest import require_programs, unavailable
from tests.integration.netns import Namespace, poll_until
from tests.real import test_ctr_etcd_tools as ctr_lab
from tests.real.test_ctr_etcd_tools import CtrNode
from tools.access import Node, StackAccess, ToolError
from tools.etcd_backup import backup

pytestmark = pytest.mark.real

# The module-scoped lab (containerd, ctr, etcd in one namespace) of tests/real/test_ctr_etcd_tools.py.
node = ctr_lab.node

POLICY = BackupPolicy(interval_minutes=60, keep=4)
# etcdctl's old --command-timeout; the throttled stream must take clearly longer.
OLD_LIMIT_SECONDS = 10.0
STREAM_SECONDS = 16.0
# 24 values of 1 MiB: a bbolt file of some 25 MiB, written in a few seconds.
VALUES = 24
VALUE_BYTES = 1 << 20
CUT_OFF_SECONDS = 3
# The db size etcd reports counts the last values within its backend's commit interval (100 ms); this is ample.
COMMITTED_BOUND = 10.0


def report(message: str) -> None:
    print(f"[backup-slow-stream] {message}")


def etcdctl_argv(node: CtrNode, *args: str) -> list[str]:
    """The host's etcdctl against the lab's member (no container): the test's own writes and reads."""
    return node.namespace.exec_argv(
        [
            node.etcdctl, "--endpoints=https://127.0.0.1:2379", f"--cacert={node.pki['ca']}",
            f"--cert={node.pki['client-cert']}", f"--key={node.pki['client-key']}", "--dial-timeout=3s",
            "--command-timeout=30s", *args,
        ]
    )  # fmt: skip


def db_size(node: CtrNode) -> int:
    status = node.etcd("endpoint", "status", "-w", "json")
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)[0]["Status"]["dbSize"])


@pytest.fixture(scope="module")
def keyspace(node: CtrNode, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Fill the member with VALUES keys of 1 MiB each (etcdctl reads a value from stdin); the database's size."""
    value = tmp_path_factory.mktemp("value") / "value"
    value.write_bytes(base64.b64encode(os.urandom(VALUE_BYTES * 3 // 4)))
    started = time.monotonic()
    for index in range(VALUES):
        with open(value, "rb") as stdin:
            put = subprocess.run(
                etcdctl_argv(node, "put", f"kubeadm-ha/slow-stream/{index:03d}"),
                stdin=stdin, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        assert put.returncode == 0 and put.stdout.strip() == "OK", put.stdout + put.stderr
    written = time.monotonic()
    # etcd reports the bbolt size as of its backend's last commit (v3.7.0 server/storage/backend/backend.go:
    # `begin` stores `tx.Size()` after each commit, which runs every `defaultBatchInterval`, 100 ms), not of
    # writes it has acknowledged since. The clean-clone CI run of b0fc5b8 read 20 MiB right after the 24th put.
    seen: list[int] = []

    def committed() -> int | None:
        seen.append(db_size(node))
        return seen[-1] if seen[-1] >= VALUES * VALUE_BYTES else None

    size = poll_until(committed, timeout=COMMITTED_BOUND, message=f"etcd's db size to reach {VALUES * VALUE_BYTES}")
    report(
        f"{VALUES} values of {VALUE_BYTES >> 20} MiB written in {written - started:.1f}s; db {size >> 20} MiB"
        f" after {time.monotonic() - written:.2f}s more (first read {seen[0] >> 20} MiB, {len(seen)} reads)"
    )
    return size


@contextlib.contextmanager
def throttled(namespace: Namespace, bits_per_second: int) -> Iterator[None]:
    """A token bucket filter on the namespace's loopback (etcdctl <-> etcd), removed however the block ends."""
    tc = require_programs("tc")["tc"]
    # burst: one 64 KiB loopback packet (GSO) plus room, or tbf drops it; latency: a queue of about a second.
    add = namespace.run(
        tc, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{bits_per_second}bit", "burst", "128kb",
        "latency", "1s", check=False,
    )  # fmt: skip
    if add.returncode != 0:
        unavailable(f"tc cannot add a tbf qdisc here: {add.stderr.strip()}")
    try:
        yield
    finally:
        namespace.run(tc, "qdisc", "del", "dev", "lo", "root", check=False)


def stream_rate(size: int) -> int:
    """Bits per second at which a database of `size` bytes streams in about STREAM_SECONDS."""
    return int(size * 8 / STREAM_SECONDS)


def snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("etcd-*.db"))


def leftovers(directory: Path) -> list[str]:
    """Anything in the backup directory besides complete snapshots and their digests (partial files)."""
    return sorted(
        path.name
        for path in directory.iterdir()
        if not (path.name.startswith("etcd-") and path.suffix in (".db", ".sha256"))
    )


# ----------------------------------------------------------------------------- the tool's transport


class CtrTransport:
    """Where tools.access.SshTransport stands in production: a tool's script run as root by bash in the node's
    namespace, its paths moved as the lab moves them, the installed backup script under `root`/sbin."""

    def __init__(self, node: CtrNode, root: Path) -> None:
        self.node, self.root = node, root
        self.ran: list[str] = []

    def run(
        self,
        node: Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]:
        assert node.hostname == self.node.host, node
        self.ran.append(script.step)
        text = script.render().replace(BACKUP_SCRIPT_PATH, str(self.root / "sbin" / "backup"))
        env = [
            "/usr/bin/env", "-i", f"PATH={os.path.dirname(self.node.ctr)}:/usr/sbin:/usr/bin:/sbin:/bin",
            f"CONTAINERD_ADDRESS={self.node.socket}",
        ]  # fmt: skip
        argv = self.node.namespace.exec_argv([*env, "bash", "-c", self.node.localise(text, self.root), script.step])
        data = stdin if isinstance(stdin, bytes) else b""
        return subprocess.run(
            argv, input=data, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout
        )


def install_backup_script(node: CtrNode, root: Path) -> None:
    """What the install step writes at BACKUP_SCRIPT_PATH, rendered now (so with any patched bound)."""
    path = root / "sbin" / "backup"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(node.localise(backup_script(node.host, POLICY).render(), root))
    path.chmod(0o700)


def stamp_of(snapshot: Path) -> datetime.datetime:
    stamp = snapshot.name.rsplit("-", 1)[1].removesuffix(".db")
    return datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)


# ----------------------------------------------------------------------------- tests


def test_a_snapshot_that_streams_longer_than_the_old_ten_seconds_is_kept(
    node: CtrNode, keyspace: int, tmp_path: Path
) -> None:
    rate = stream_rate(keyspace)
    with throttled(node.namespace, rate):
        started = time.monotonic()
        ran = node.run(backup_script(node.host, POLICY), tmp_path)
        took = time.monotonic() - started
    report(f"timer script with loopback at {rate / 1e6:.1f} Mbit/s: exit {ran.returncode} after {took:.1f}s")
    assert ran.returncode == 0, ran.output
    # Otherwise the throttle did not bite and this test would prove nothing about the old limit.
    assert took > OLD_LIMIT_SECONDS + 2, f"the snapshot streamed in {took:.1f}s, within the old limit"
    backups = tmp_path / "backups"
    taken = snapshots(backups)
    assert len(taken) == 1 and not leftovers(backups), ran.output
    snapshot = taken[0]
    assert snapshot.stat().st_size >= VALUES * VALUE_BYTES
    digest = Path(f"{snapshot}.sha256").read_text().split()
    assert digest == [hashlib.sha256(snapshot.read_bytes()).hexdigest(), snapshot.name]
    # etcdutl's status, which the script prints last (after any warning of ctr's, which it captured too).
    found = re.search(r'\{"hash":[^{}]*\}', ran.stdout)
    assert found, ran.output
    status = json.loads(found.group(0))
    assert status["totalKey"] >= VALUES, status


def test_a_failed_backup_exits_non_zero_keeps_nothing_and_the_tool_reports_the_newest_good_age(
    node: CtrNode, keyspace: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backups = tmp_path / "backups"
    # A good snapshot first, at full speed.
    good_run = node.run(backup_script(node.host, POLICY), tmp_path)
    assert good_run.returncode == 0, good_run.output
    (good,) = snapshots(backups)
    good_digest = Path(f"{good}.sha256").read_text()

    # Then every run is cut off: the stream takes ~16 s, the (patched) bound ends it after 3 s.
    monkeypatch.setattr(backup_module, "SNAPSHOT_TIMEOUT_SECONDS", CUT_OFF_SECONDS)
    install_backup_script(node, tmp_path)
    time.sleep(1.1)  # a new name: names carry the second
    rate = stream_rate(keyspace)
    with throttled(node.namespace, rate):
        # The unit's command (its ExecStart, as the timer runs it): a non-zero exit is a failed unit.
        started = time.monotonic()
        env = ["/usr/bin/env", "-i", f"PATH={os.path.dirname(node.ctr)}:/usr/sbin:/usr/bin:/sbin:/bin"]
        env += [f"CONTAINERD_ADDRESS={node.socket}", "KUBEADM_HA_BACKUP_FORCE=1"]
        unit = subprocess.run(
            node.namespace.exec_argv([*env, str(tmp_path / "sbin" / "backup")]),
            capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.monotonic() - started
        cut_off = f"cut-off run: exit {unit.returncode} after {took:.1f}s; stderr ends:\n{unit.stderr.strip()[-400:]}"
        report(cut_off)
        assert unit.returncode != 0, unit.stdout + unit.stderr
        said = unit.stderr
        assert f"etcdctl snapshot save on {node.host} did not finish within {CUT_OFF_SECONDS} s; kept nothing" in said
        assert f"the newest good snapshot on {node.host} is {good.name}\n" in said
        assert took < OLD_LIMIT_SECONDS, f"the cut-off run took {took:.1f}s"
        assert snapshots(backups) == [good] and not leftovers(backups), sorted(p.name for p in backups.iterdir())
        assert node.containers() == [], "the cut-off run left its container behind"

        # tools.etcd_backup --now, three hours after the good snapshot: the fresh snapshot fails, and the tool
        # says how old the newest good one is on that member, and that backups have stopped there.
        access = StackAccess(
            stack="lab", nodes={node.host: Node(node.host, "127.0.0.1", "etcd")}, ssh_user="unused",
            ssh_private_key="", host_keys={}, etcd_topology="external", backup_directory=backup_module.BACKUP_DIR,
        )  # fmt: skip
        transport = CtrTransport(node, tmp_path)
        later = stamp_of(good) + datetime.timedelta(hours=3)
        capsys.readouterr()
        with pytest.raises(ToolError) as failure:
            backup(
                access, transport, tmp_path / "copied", now=True, etcdutl=None,
                interval_minutes=POLICY.interval_minutes, clock=lambda: later,
            )  # fmt: skip
    said = capsys.readouterr().out
    report(cut_off)
    report(f"tools.etcd_backup --now said:\n{said}{failure.value}")
    assert transport.ran[0] == "etcd-backup-now" and "etcd-backup-list" in transport.ran
    assert f"{node.host}: 1 snapshot(s), newest {good.name}, taken 3h00m ago" in said
    assert f"OVERDUE: no new snapshot on {node.host} for 3h00m" in said
    assert f"newest good snapshot is {good.name} on {node.host}, taken 3h00m ago" in str(failure.value)
    assert not (tmp_path / "copied" / good.name).exists(), "a stale snapshot was copied as if it were fresh"
    assert snapshots(backups) == [good] and not leftovers(backups)
    assert Path(f"{good}.sha256").read_text() == good_digest
    assert node.containers() == []
