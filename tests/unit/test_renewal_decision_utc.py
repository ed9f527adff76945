"""Issue 18, defect 9: the program's renewal decision and the step's freshness guard agree, on the same UTC
boundary, to the second.

The program decides in `components.certificates.plan_renewals` whether a control plane is due (its step runs
again); the step's script decides in `certificates_fresh` (render/renewal.py) whether to renew. The script
compares the earliest end date with `date -u +%s` + renewBeforeDays × 86400 in whole seconds. The decision
used to compare calendar days against the local date (`datetime.date.today()`), so east of UTC a run could
find a node "due" whose step then said "already done" and printed the same expiry, and the next run did the
same again (and elsewhere a due node could wait a day).

Each case here runs the rendered `certificates_fresh` with real bash and asks the program's decision for the
same instant. Two stand-ins, both for the clock and the files only: `earliest_end` is replaced by one that
prints the recorded expiry's epoch (the real one reads certificates under /etc/kubernetes with openssl), and
`date -u +%s` prints the chosen instant (every other `date` call is the real one). The comparison itself is
the rendered one.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from components.certificates import CERTIFICATE_RENEWALS_OUTPUT, CERTIFICATES_EXPIRE_OUTPUT, plan_renewals
from render.renewal import renewal_script

UTC = datetime.UTC
DAYS = 60
EAST = datetime.timezone(datetime.timedelta(hours=10))
FAR_EAST = datetime.timezone(datetime.timedelta(hours=14))
WEST = datetime.timezone(datetime.timedelta(hours=-5))

DATE_SHIM = """#!/bin/bash
# The clock the guard reads (`date -u +%s`) is the test's; every other use of date is the real one.
if [ "$#" -eq 2 ] && [ "$1" = -u ] && [ "$2" = +%s ]; then
  echo "$KHA_TEST_NOW"
  exit 0
fi
exec /usr/bin/date "$@"
"""


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Guard = Callable[[str, datetime.datetime], bool]


@pytest.fixture
def guard(tmp_path: Path) -> Guard:
    """`fresh(recorded, now)`: the rendered `certificates_fresh`, with the earliest end `recorded` at `now`."""
    shim = tmp_path / "date"
    shim.write_text(DATE_SHIM)
    shim.chmod(0o755)
    script = renewal_script("prod-cp-1", DAYS, stacked_etcd=False, cluster_config="kind: ClusterConfiguration\n")
    body = "\n".join(
        [
            "set -euo pipefail",
            *script.functions,
            'earliest_end() { date -u -d "$KHA_TEST_EARLIEST" +%s; }',
            "if certificates_fresh; then echo fresh; else echo stale; fi",
        ]
    )

    def fresh(recorded: str, now: datetime.datetime) -> bool:
        env = {
            "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "KHA_TEST_EARLIEST": recorded,
            "KHA_TEST_NOW": str(int(now.timestamp())),
        }
        ran = subprocess.run(["bash", "-c", body], capture_output=True, text=True, env=env, timeout=30, check=False)
        assert ran.returncode == 0, ran.stderr
        assert f"certificates-expire: {recorded}" in ran.stdout, ran.stdout
        return ran.stdout.splitlines()[-1] == "fresh"

    return fresh


def _due(recorded: str, now: datetime.datetime) -> bool:
    previous = {CERTIFICATES_EXPIRE_OUTPUT: {"cp": recorded}, CERTIFICATE_RENEWALS_OUTPUT: {"cp": 4}}
    plan = plan_renewals(["cp"], previous, DAYS, now)["cp"]
    assert plan.generation == (5 if plan.due else 4)
    return plan.due


# (what the case is, the recorded expiry, the instant of the run)
DISAGREED = [
    # 08:00 on 2 January at UTC+10 is 22:00 on 1 January UTC: 60 days on is 2 March 22:00Z, before the expiry, so
    # the step finds the certificates fresh; by the local date 2 January they were 59 days away, "due".
    ("east of UTC", "2027-03-02T23:00:00Z", datetime.datetime(2027, 1, 2, 8, 0, tzinfo=EAST)),
    # 06:00 on 3 January at UTC+14 is 16:00 on 2 January UTC: the same, a day further on.
    ("far east of UTC", "2027-03-03T17:00:00Z", datetime.datetime(2027, 1, 3, 6, 0, tzinfo=FAR_EAST)),
    # 20:00 on 1 January at UTC-5 is 01:00 on 2 January UTC: the expiry is inside the window, the step renews;
    # by the local date it was 61 days away, not due (a day late).
    ("west of UTC", "2027-03-03T00:30:00Z", datetime.datetime(2027, 1, 1, 20, 0, tzinfo=WEST)),
    # At UTC too: one hour inside the window is due to the script, 60 calendar days to the day count.
    ("UTC, an hour inside", "2027-03-02T11:00:00Z", datetime.datetime(2027, 1, 1, 12, 0, tzinfo=UTC)),
]


@pytest.mark.parametrize(("case", "recorded", "now"), DISAGREED, ids=[case for case, _, _ in DISAGREED])
def test_the_decision_is_the_guards_where_calendar_days_and_seconds_disagree(
    guard: Guard, case: str, recorded: str, now: datetime.datetime
) -> None:
    assert _due(recorded, now) is not guard(recorded, now), case


def test_the_decision_is_the_guards_on_the_boundary_to_the_second(guard: Guard) -> None:
    """The window ends exactly renewBeforeDays × 86400 s after the run, in whole seconds as `date +%s` counts:
    an expiry on that second is due (the guard requires it strictly later), one second later is not."""
    for now in (
        datetime.datetime(2027, 1, 1, 12, 0, 0, 999_000, tzinfo=UTC),
        datetime.datetime(2027, 1, 2, 7, 59, 59, tzinfo=EAST),
        datetime.datetime(2026, 12, 31, 23, 59, 59, tzinfo=WEST),
    ):
        edge = datetime.datetime.fromtimestamp(int(now.timestamp()), UTC) + datetime.timedelta(days=DAYS)
        for offset, due in ((-86_400, True), (-1, True), (0, True), (1, False), (3_600, False)):
            recorded = _stamp(edge + datetime.timedelta(seconds=offset))
            assert (_due(recorded, now), guard(recorded, now)) == (due, not due), (now, offset)


def test_a_run_time_without_a_time_zone_is_refused() -> None:
    """A naive time would be read as local time: the defect itself."""
    with pytest.raises(ValueError, match="UTC"):
        plan_renewals(["cp"], {}, DAYS, datetime.datetime(2027, 1, 1, 12, 0))
