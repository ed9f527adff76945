"""systemd itself reads the kubelet-serving approver's units: `systemd-analyze verify` in a root holding exactly
what the install step writes (the units, and the approver as the service's ExecStart), on top of the machine's
own unit directory (for timers.target and the default dependencies).

systemd-analyze reports unknown keys and bad values as warnings and still exits 0, so any output fails.
Debian package: systemd.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model.addressing import plan_addresses
from render.csr_approval import SERVICE, TIMER, approver_files, serving_plan
from tests.integration.conftest import require_programs, unavailable
from tests.stacks import stack_config

pytestmark = pytest.mark.integration

SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _root(tmp_path: Path, edit: tuple[str, str] = ("", "")) -> Path:
    if not (SYSTEM_UNITS / "timers.target").is_file():
        unavailable(f"no systemd unit directory at {SYSTEM_UNITS}")
    plan = plan_addresses(stack_config("prod"))
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    for path, (content, mode) in approver_files("prod-cp-1", serving_plan(plan.control_planes)).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content.replace(*edit) if edit[0] else content)
        target.chmod(mode)
    return root


def _verify(root: Path, *units: str) -> str:
    analyze = require_programs("systemd-analyze")["systemd-analyze"]
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", *units], capture_output=True, text=True, timeout=60, check=False
    )
    return (
        f"exit {result.returncode}\n{result.stdout}{result.stderr}"
        if result.returncode
        else result.stdout + result.stderr
    )


def test_systemd_accepts_the_timer_and_service(tmp_path: Path) -> None:
    assert not _verify(_root(tmp_path), SERVICE, TIMER).strip()


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported."""
    assert "2minn" in _verify(_root(tmp_path, ("OnUnitActiveSec=2min", "OnUnitActiveSec=2minn")), TIMER)
