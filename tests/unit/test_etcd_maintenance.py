"""The etcd maintenance timer's script and units (render/etcd_maintenance.py), run by bash as the unit runs them.

`ctr` cannot run here: a stand-in records every command line and answers as etcdctl would (the alarms, the
members, their health, the database size, the locked defragmentation), set per test through the environment.
The script's node paths are moved under the test's directory, nothing else. Against a real three-member etcd,
containerd and ctr: tests/real/test_etcd_maintenance_live.py.

Proven: the guard (due, forced, alarms looked at every run); an alarm fails the run with a crit line and a
status file naming it and nothing is defragmented or disarmed; an unhealthy or unstarted member skips the run
(exit 0, recorded); a healthy cluster gets exactly one defragmentation, of the local member, inside `etcdctl lock`
with a TTL, every call bounded (`timeout`, etcdctl's --command-timeout: 10 s, 300 s for the defragmentation);
failures and timeouts are recorded; the timers' minutes are apart; the unit's bound is above the script's.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import render.etcd_maintenance as maintenance
from render.backup import KILL_AFTER_SECONDS, TOOL_TIMEOUT_SECONDS
from render.etcd import MANIFEST_PATH
from render.etcd_maintenance import (
    ALARM_EXIT,
    DEFRAG_TIMEOUT_SECONDS,
    LOCK_NAME,
    LOCK_TTL_SECONDS,
    LOCKED_DEFRAG_SECONDS,
    STATUS_KEYS,
    STATUS_PATH,
    UNIT_TIMEOUT_SECONDS,
    maintenance_files,
    maintenance_script,
    service_unit,
    tick_minute,
    timer_unit,
)
from render.scripts import LOG_DIR, STATE_DIR

HOST = "prod-etcd-2"
IMAGE = "registry.k8s.io/etcd:3.7.0-0"
THREE = (
    "8e9e05c52164694d, started, prod-etcd-1, https://10.17.5.21:2380, https://10.17.5.21:2379, false\n"
    "91bc3c398fb3c146, started, prod-etcd-2, https://10.17.5.22:2380, https://10.17.5.22:2379, false\n"
    "fd422379fda50e48, started, prod-etcd-3, https://10.17.5.23:2380, https://10.17.5.23:2379, false"
)
HEALTHY = "\n".join(
    f"https://10.17.5.2{n}:2379 is healthy: successfully committed proposal: took = 2ms" for n in (1, 2, 3)
)
# Records the command line; answers by subcommand. The database is 1000 bytes before the first status, 400 after.
FAKE_CTR = r"""#!/bin/bash
echo "$*" >>"$CTR_LOG"
case "$*" in
  *" alarm list"*) [ -z "${ALARMS:-}" ] || printf '%s\n' "$ALARMS" ;;
  *" member list"*) printf '%s\n' "$MEMBERS" ;;
  *" endpoint health --cluster"*) printf '%s\n' "$HEALTH"; exit "${HEALTH_RC:-0}" ;;
  *" endpoint status"*)
    size=1000; [ -f "$CTR_LOG.status" ] && size=400; : >"$CTR_LOG.status"
    status='"Status":{"header":{"revision":9},"dbSize":%s,"dbSizeInUse":300}'
    printf "[{\"Endpoint\":\"https://127.0.0.1:2379\",$status}]\n" "$size" ;;
  *" lock "*)
    sleep "${LOCK_SLEEP:-0}"
    [ "${LOCK_RC:-0}" = 0 ] && echo "Finished defragmenting etcd member[https://127.0.0.1:2379]. took 1ms"
    exit "${LOCK_RC:-0}" ;;
  *) echo "fake ctr: unexpected $*" >&2; exit 2 ;;
esac
"""


def run(tmp_path: Path, interval_hours: int = 24, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    text = maintenance_script(HOST, interval_hours).render()
    for original, moved in {MANIFEST_PATH: "etcd.yaml", STATE_DIR: "state", LOG_DIR: "log"}.items():
        text = text.replace(original, str(tmp_path / moved))
    assert "/etc/kubernetes/manifests" not in text and "/var/" not in text
    (tmp_path / "etcd.yaml").write_text(f"spec:\n  containers:\n  - image: {IMAGE}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ctr").write_text(FAKE_CTR)
    (bin_dir / "ctr").chmod(0o755)
    log = tmp_path / "ctr.log"
    log.unlink(missing_ok=True)
    (tmp_path / "ctr.log.status").unlink(missing_ok=True)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CTR_LOG": str(log), "MEMBERS": THREE, "HEALTH": HEALTHY}
    ran = subprocess.run(
        ["bash", "-c", text], capture_output=True, text=True, timeout=60, check=False, env={**environment, **env}
    )
    return ran, log.read_text().splitlines() if log.exists() else []


def status(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "state" / os.path.basename(STATUS_PATH)
    lines = path.read_text().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == list(STATUS_KEYS)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    return dict(line.split("=", 1) for line in lines)


def etcdctl_args(call: str) -> str:
    """What follows the image and container name: the tool and its arguments."""
    return call.split(f" {IMAGE} ", 1)[1].split(" ", 1)[1]


def test_a_healthy_cluster_gets_one_locked_bounded_defragmentation_of_the_local_member(tmp_path: Path) -> None:
    ran, calls = run(tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert [etcdctl_args(call).split(" --dial-timeout=3s ")[1].split()[:2] for call in calls] == [
        ["--command-timeout=10s", "alarm"],
        ["--command-timeout=10s", "member"],
        ["--command-timeout=10s", "endpoint"],
        ["--command-timeout=10s", "endpoint"],
        ["lock", f"--ttl={LOCK_TTL_SECONDS}"],
        ["--command-timeout=10s", "endpoint"],
    ]
    (locked,) = [call for call in calls if " lock " in call]
    outer, inner = etcdctl_args(locked).split(" -- ", 1)
    assert outer.startswith("etcdctl --endpoints=https://127.0.0.1:2379 ")
    assert outer.endswith(f" lock --ttl={LOCK_TTL_SECONDS} {LOCK_NAME}") and "--command-timeout" not in outer
    # The command etcdctl runs under the lock: the local member only (no --cluster), with the long bound.
    assert inner.startswith("etcdctl --endpoints=https://127.0.0.1:2379 ")
    assert inner.endswith(f" --command-timeout={DEFRAG_TIMEOUT_SECONDS}s defrag")
    assert "--cluster" not in inner and inner.count("--endpoints=") == 1
    assert "Finished defragmenting etcd member[https://127.0.0.1:2379]" in ran.stdout
    assert "database 1000 -> 400 bytes" in ran.stdout
    found = status(tmp_path)
    assert (found["result"], found["host"], found["alarms"]) == ("defragmented", HOST, "")
    assert (found["db_size_before"], found["db_size_after"]) == ("1000", "400")
    # Every tool run is under `timeout`: the locked one with its own, longer bound.
    text = maintenance_script(HOST, 24).render()
    assert f"kha_etcd_tool {LOCKED_DEFRAG_SECONDS} etcdctl " in text
    assert re.search(r"^  timeout --kill-after=\d+ \"\$bound\" ctr ", text, re.MULTILINE)


def test_the_guard_skips_until_due_looks_at_alarms_every_run_and_a_forced_run_goes_ahead(tmp_path: Path) -> None:
    first, _ = run(tmp_path)
    assert first.returncode == 0 and status(tmp_path)["result"] == "defragmented"
    again, calls = run(tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout, again.stdout + again.stderr
    assert [etcdctl_args(call).split()[-2:] for call in calls] == [["alarm", "list"]]
    # An alarm raised since: the guard does not hold, and the run fails on it.
    alarmed, _ = run(tmp_path, ALARMS="memberID:9 alarm:NOSPACE")
    assert alarmed.returncode == ALARM_EXIT
    forced, calls = run(tmp_path, KUBEADM_HA_DEFRAG_FORCE="1")
    assert forced.returncode == 0 and any(" lock " in call for call in calls)
    # Due once the last defragmentation is older than the interval less the margin (24 h -> 1410 min).
    path = tmp_path / "state" / os.path.basename(STATUS_PATH)
    stamp = time.time() - 1411 * 60
    os.utime(path, (stamp, stamp))
    due, calls = run(tmp_path)
    assert due.returncode == 0 and any(" lock " in call for call in calls)


@pytest.mark.parametrize(
    ("alarms", "named"),
    [
        ("memberID:13803658152347727308 alarm:NOSPACE", "NOSPACE"),
        ("memberID:1 alarm:CORRUPT\nmemberID:2 alarm:NOSPACE\nmemberID:3 alarm:NOSPACE", "CORRUPT NOSPACE"),
    ],
)
def test_an_alarm_fails_the_run_loudly_and_is_neither_defragmented_nor_disarmed(
    tmp_path: Path, alarms: str, named: str
) -> None:
    ran, calls = run(tmp_path, ALARMS=alarms)
    assert ran.returncode == ALARM_EXIT, ran.stderr
    assert f"<2>kubeadm-ha: etcd ALARM {named} raised (seen from {HOST})" in ran.stderr
    assert not any(" lock " in call or "disarm" in call or " defrag" in call for call in calls), calls
    found = status(tmp_path)
    assert (found["result"], found["alarms"]) == ("alarm", named)


@pytest.mark.parametrize(
    ("members", "health", "why"),
    [
        (
            THREE,
            HEALTHY.replace(
                "https://10.17.5.23:2379 is healthy: successfully committed proposal: took = 2ms",
                "https://10.17.5.23:2379 is unhealthy: failed to commit proposal: context deadline exceeded",
            ),
            "2 of 3 members healthy (unhealthy: https://10.17.5.23:2379; unstarted: 0)",
        ),
        (
            THREE + "\n1234, unstarted, , https://10.17.5.24:2380, , false",
            HEALTHY,
            "3 of 4 members healthy (unhealthy: none; unstarted: 1)",
        ),
        # etcdctl could not even list the members' endpoints: nothing counts as healthy.
        (THREE, "Error: failed to fetch endpoints from etcd cluster member list", "0 of 3 members healthy"),
    ],
)
def test_an_unhealthy_or_unstarted_member_skips_the_run(tmp_path: Path, members: str, health: str, why: str) -> None:
    ran, calls = run(tmp_path, MEMBERS=members, HEALTH=health, HEALTH_RC="1")
    assert ran.returncode == 0, ran.stderr
    assert f"<4>kubeadm-ha: skipped defragmenting the member on {HOST}: {why}" in ran.stderr
    assert not any(" lock " in call for call in calls)
    found = status(tmp_path)
    assert found["result"] == "skipped" and found["detail"].startswith(why)


def test_a_failed_or_timed_out_defragmentation_fails_the_run_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed, _ = run(tmp_path, LOCK_RC="1")
    assert failed.returncode == 1
    assert f"<3>kubeadm-ha: etcd maintenance on {HOST}: etcdctl lock/defrag failed (exit 1)" in failed.stderr
    assert status(tmp_path)["result"] == "failed"
    # The locked run's bound cut to 1 s (the one change): `timeout` ends a lock wait that does not end.
    monkeypatch.setattr(maintenance, "LOCKED_DEFRAG_SECONDS", 1)
    monkeypatch.setattr(maintenance, "KILL_AFTER_SECONDS", 1)
    started = time.monotonic()
    timed_out, _ = run(tmp_path, LOCK_SLEEP="10")
    assert timed_out.returncode == 124 and time.monotonic() - started < 20, timed_out.stderr
    assert "no defragmentation finished within 1 s" in timed_out.stderr
    assert status(tmp_path)["result"] == "failed"


def test_an_etcd_that_does_not_answer_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ctr").write_text("#!/bin/sh\necho 'connection refused' >&2\nexit 1\n")
    text = maintenance_script(HOST, 24).render().replace(STATE_DIR, str(tmp_path / "state"))
    text = text.replace(LOG_DIR, str(tmp_path / "log")).replace(MANIFEST_PATH, str(tmp_path / "etcd.yaml"))
    (tmp_path / "etcd.yaml").write_text(f"spec:\n  containers:\n  - image: {IMAGE}\n")
    (tmp_path / "bin" / "ctr").chmod(0o755)
    ran = subprocess.run(
        ["bash", "-c", text], capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"},
    )  # fmt: skip
    assert ran.returncode == 1 and "etcdctl alarm list failed" in ran.stderr
    assert status(tmp_path)["result"] == "failed"


def test_members_tick_at_minutes_of_their_own_and_the_units_carry_the_bounds() -> None:
    minutes = [tick_minute(index) for index in range(1, 8)]
    assert minutes == [3, 11, 19, 27, 35, 43, 51]
    assert "OnCalendar=*-*-* *:19:00 UTC" in timer_unit(24, 3)
    assert "Persistent" not in timer_unit(24, 3) and "RandomizedDelaySec" not in timer_unit(24, 3)
    found = re.search(r"^TimeoutStartSec=(\d+)$", service_unit(HOST), re.MULTILINE)
    assert found and int(found.group(1)) == UNIT_TIMEOUT_SECONDS
    # Above everything the script may wait for: six queries and the locked run, each with its kill grace.
    assert UNIT_TIMEOUT_SECONDS > 6 * (TOOL_TIMEOUT_SECONDS + KILL_AFTER_SECONDS) + LOCKED_DEFRAG_SECONDS
    # The lock outlives the longest defragmentation, and a member waits out a whole one.
    assert DEFRAG_TIMEOUT_SECONDS < LOCK_TTL_SECONDS < LOCKED_DEFRAG_SECONDS - DEFRAG_TIMEOUT_SECONDS
    files = maintenance_files(HOST, 2, 24)
    assert sorted(files) == [
        "/etc/systemd/system/kubeadm-ha-etcd-maintenance.service",
        "/etc/systemd/system/kubeadm-ha-etcd-maintenance.timer",
        "/usr/local/sbin/kubeadm-ha-etcd-maintenance",
    ]
    assert files["/usr/local/sbin/kubeadm-ha-etcd-maintenance"][1] == 0o700
