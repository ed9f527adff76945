"""systemd itself reads the etcd timers' units (snapshots, and maintenance): `systemd-analyze verify` in a root
holding exactly what the install step writes (the units, and the script as the service's ExecStart), on top of
the machine's own unit directory (for timers.target and the default dependencies).

systemd-analyze reports unknown keys and bad values as warnings and still exits 0, so any output fails.
Debian package: systemd.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from render import etcd_maintenance
from render.backup import SERVICE, TIMER, BackupPolicy, backup_files
from tests.integration.conftest import require_programs, unavailable

pytestmark = pytest.mark.integration

SYSTEM_UNITS = Path("/usr/lib/systemd/system")


@pytest.mark.parametrize("policy", [BackupPolicy(60, 24), BackupPolicy(5, 1), BackupPolicy(1440, 1000)])
def test_systemd_accepts_the_timer_and_service(tmp_path: Path, policy: BackupPolicy) -> None:
    analyze = require_programs("systemd-analyze")["systemd-analyze"]
    if not (SYSTEM_UNITS / "timers.target").is_file():
        unavailable(f"no systemd unit directory at {SYSTEM_UNITS}")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    for path, (content, mode) in backup_files("dev-cp-1", policy).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", SERVICE, TIMER], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.parametrize(("index", "interval_hours"), [(1, 24), (7, 1), (3, 720)])
def test_systemd_accepts_the_maintenance_timer_and_service(tmp_path: Path, index: int, interval_hours: int) -> None:
    analyze = require_programs("systemd-analyze")["systemd-analyze"]
    if not (SYSTEM_UNITS / "timers.target").is_file():
        unavailable(f"no systemd unit directory at {SYSTEM_UNITS}")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    for path, (content, mode) in etcd_maintenance.maintenance_files("prod-etcd-1", index, interval_hours).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
    units = [etcd_maintenance.SERVICE, etcd_maintenance.TIMER]
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    minute = etcd_maintenance.tick_minute(index)
    calendar = subprocess.run(
        [analyze, "calendar", f"*-*-* *:{minute:02d}:00 UTC"], capture_output=True, text=True, timeout=60, check=False
    )
    assert calendar.returncode == 0 and f"Normalized form: *-*-* *:{minute:02d}:00 UTC" in calendar.stdout


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported."""
    analyze = require_programs("systemd-analyze")["systemd-analyze"]
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    for path, (content, mode) in backup_files("dev-cp-1", BackupPolicy(60, 24)).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content.replace("Type=oneshot", "Type=oneshoot"))
        target.chmod(mode)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", SERVICE], capture_output=True, text=True, timeout=60, check=False
    )
    assert "oneshoot" in result.stdout + result.stderr
