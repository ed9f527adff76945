"""Issue 18, defect 2: what bounds an etcd snapshot, and what `tools.etcd_backup` says about snapshots' ages.

The behaviour against a real etcd, containerd and a throttled link is proven in tests/real/test_backup_slow_stream.py;
here, quickly and without root: the timer's script, run by bash with a `ctr` stand-in that records its command line
(`ctr` cannot run here), asks etcdctl for `snapshot save` without `--command-timeout` (etcdctl applies that flag
to the snapshot whenever it is given) while every other request keeps it; the bounds nest (the script's own
bounds end before the unit's TimeoutStartSec, which ends before the tool's wait for `--now`); and the tool's
report of each member's newest snapshot, through a transport stand-in that answers the listing script the way a
member's shell does.
"""

from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path
from typing import IO

import pytest

from render.backup import (
    BACKUP_DIR,
    KILL_AFTER_SECONDS,
    SNAPSHOT_TIMEOUT_SECONDS,
    TOOL_TIMEOUT_SECONDS,
    BackupPolicy,
    backup_script,
    etcd_tool_functions,
    service_unit,
)
from render.etcd import MANIFEST_PATH
from render.scripts import LOG_DIR, STATE_DIR, Script
from tools import etcd_backup
from tools.access import Node, StackAccess, ToolError
from tools.etcd_backup import age_text, backup, newest_snapshots

IMAGE = "registry.k8s.io/etcd:3.7.0-0"
# Records every `ctr` command line; `snapshot save` fails (as etcdctl does when the member cannot be reached).
RECORDING_CTR = '#!/bin/sh\necho "$*" >>"$CTR_LOG"\ncase "$*" in *" snapshot save "*) exit 5 ;; esac\n'


def run_backup_script(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    text = backup_script("prod-etcd-1", BackupPolicy(60, 4)).render()
    for original, moved in {
        BACKUP_DIR: "backups",
        LOG_DIR: "log",
        STATE_DIR: "state",
        MANIFEST_PATH: "etcd.yaml",
    }.items():
        text = text.replace(original, str(tmp_path / moved))
    (tmp_path / "etcd.yaml").write_text(f"spec:\n  containers:\n  - image: {IMAGE}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ctr").write_text(RECORDING_CTR)
    (bin_dir / "ctr").chmod(0o755)
    log = tmp_path / "ctr.log"
    ran = subprocess.run(
        ["bash", "-c", text], capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "CTR_LOG": str(log)},
    )  # fmt: skip
    return ran, log.read_text().splitlines() if log.exists() else []


def test_snapshot_save_is_not_bounded_by_command_timeout_and_a_failure_fails_the_run(tmp_path: Path) -> None:
    ran, calls = run_backup_script(tmp_path)
    saves = [call for call in calls if " snapshot save " in call]
    assert len(saves) == 1, calls
    assert "--command-timeout" not in saves[0], saves[0]
    assert f" {IMAGE} " in saves[0] and "--dial-timeout=3s" in saves[0]
    # The unit's command fails with etcdctl's status, names the host, keeps nothing.
    assert ran.returncode == 5, ran.stderr
    assert "etcdctl snapshot save failed on prod-etcd-1; kept nothing (exit 5)" in ran.stderr
    assert "the newest good snapshot on prod-etcd-1 is none" in ran.stderr
    assert sorted(path.name for path in (tmp_path / "backups").iterdir()) == []


def test_other_etcdctl_requests_keep_their_ten_second_bound(tmp_path: Path) -> None:
    script = "\n".join(["set -euo pipefail", "KUBEADM_HA_HOST=etcd-1", *etcd_tool_functions(writable=())])
    script = script.replace(MANIFEST_PATH, str(tmp_path / "etcd.yaml")) + "\nkha_etcdctl endpoint status\n"
    (tmp_path / "etcd.yaml").write_text(f"spec:\n  containers:\n  - image: {IMAGE}\n")
    (tmp_path / "ctr").write_text(RECORDING_CTR)
    (tmp_path / "ctr").chmod(0o755)
    ran = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "CTR_LOG": str(tmp_path / "ctr.log")},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (call,) = (tmp_path / "ctr.log").read_text().splitlines()
    assert call.endswith("--dial-timeout=3s --command-timeout=10s endpoint status"), call


def test_the_bounds_nest_script_then_unit_then_tool() -> None:
    found = re.search(r"^TimeoutStartSec=(\d+)$", service_unit("prod-etcd-1"), re.MULTILINE)
    assert found
    unit = int(found.group(1))
    # The snapshot's bound, then etcdutl's check, each with the grace `timeout` gives before its KILL.
    assert unit > SNAPSHOT_TIMEOUT_SECONDS + TOOL_TIMEOUT_SECONDS + 2 * KILL_AFTER_SECONDS
    assert unit < etcd_backup.SNAPSHOT_TIMEOUT
    assert f"within {SNAPSHOT_TIMEOUT_SECONDS} s" in backup_script("prod-etcd-1", BackupPolicy(60, 4)).render()


# ----------------------------------------------------------------------------- the tool's age report

NOW = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
DIGEST = "ab" * 32


def name(host: str, minutes_ago: int) -> str:
    return f"etcd-{host}-{(NOW - datetime.timedelta(minutes=minutes_ago)):%Y%m%dT%H%M%SZ}.db"


class ListingTransport:
    """Answers the listing script with each member's `NAME DIGEST` lines; `--now` fails everywhere."""

    def __init__(self, listings: dict[str, list[str]]) -> None:
        self.listings = listings

    def run(
        self,
        node: Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]:
        if script.step == "etcd-backup-list":
            text = "".join(f"{entry} {DIGEST}\n" for entry in self.listings[node.hostname])
            return subprocess.CompletedProcess([], 0, text.encode(), b"")
        assert script.step == "etcd-backup-now", script.step
        return subprocess.CompletedProcess([], 124, b"", b"kubeadm-ha: etcdctl snapshot save ... did not finish\n")


ACCESS = StackAccess(
    stack="prod", nodes={f"prod-etcd-{i}": Node(f"prod-etcd-{i}", f"10.0.0.{i}", "etcd") for i in (1, 2, 3)},
    ssh_user="u", ssh_private_key="", host_keys={}, etcd_topology="external", backup_directory=BACKUP_DIR,
)  # fmt: skip
LISTINGS = {
    "prod-etcd-1": [name("prod-etcd-1", 95), name("prod-etcd-1", 35)],
    "prod-etcd-2": [name("prod-etcd-2", 2 * 60 + 5 + 24 * 60 * 3)],
    "prod-etcd-3": [],
}


@pytest.mark.parametrize(
    ("seconds", "text"), [(59, "0m"), (61, "1m"), (3600, "1h00m"), (3 * 3600 + 5 * 60, "3h05m"), (50 * 3600, "2d02h")]
)
def test_age_text(seconds: float, text: str) -> None:
    assert age_text(seconds) == text


def test_each_members_newest_snapshot_is_reported_with_its_age_and_overdue_ones_are_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = newest_snapshots(ACCESS, ListingTransport(LISTINGS), now=NOW, interval_minutes=60)
    said = capsys.readouterr().out
    assert found[0].name == name("prod-etcd-1", 35)
    assert f"prod-etcd-1: 2 snapshot(s), newest {name('prod-etcd-1', 35)}, taken 35m ago" in said
    assert f"prod-etcd-2: 1 snapshot(s), newest {name('prod-etcd-2', 4445)}, taken 3d02h ago" in said
    assert "prod-etcd-3: no snapshot" in said
    assert "OVERDUE: no new snapshot on prod-etcd-1" not in said
    assert "OVERDUE: no new snapshot on prod-etcd-2 for 3d02h (the timer runs every 60 min)" in said
    assert "OVERDUE: no new snapshot on prod-etcd-3 at all" in said


def test_now_failing_everywhere_names_the_newest_good_snapshot_and_copies_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ToolError) as failure:
        backup(
            ACCESS, ListingTransport(LISTINGS), tmp_path / "out", now=True, etcdutl=None, interval_minutes=60,
            clock=lambda: NOW,
        )  # fmt: skip
    newest = name("prod-etcd-1", 35)
    assert str(failure.value) == (
        f"no member could take a snapshot; the newest good snapshot is {newest} on prod-etcd-1, taken 35m ago;"
        " nothing copied"
    )
    assert capsys.readouterr().out.count("  failed: etcd-backup-now failed on prod-etcd-") == 3
    assert list((tmp_path / "out").iterdir()) == []
