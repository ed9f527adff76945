"""The cluster lab's view of its load balancers (tests/real/cluster_lab.py, issue 21): what each HAProxy saw of
the API servers over the run, read from its own statistics (the local `stats;csv` page the product renders).

Measurement, not a verdict: how often each control plane was marked DOWN and for how long, and how many client
connections the fail-open backend carried while none was UP (render/lb_config.py). Run 7 showed a starved API
server failing HAProxy's checks while it still answered; this says how much of that the run met.
"""

from __future__ import annotations

import csv
import io

from render.lb_config import HAPROXY_BACKEND, HAPROXY_FALLBACK_BACKEND, HAPROXY_HEALTH_PORT, HAPROXY_STATS_URI
from render.scripts import Script, command
from tools.access import Node, SshTransport, run_checked

STATS_TIMEOUT_SECONDS = 60


def stats_script(host: str) -> Script:
    url = f"http://127.0.0.1:{HAPROXY_HEALTH_PORT}{HAPROXY_STATS_URI};csv"
    return Script(
        step="lab-haproxy-stats",
        host=host,
        done_when="false",
        body=(command("curl", "--silent", "--show-error", "--fail", "--max-time", "10", url),),
    )


def summary(host: str, text: str) -> str:
    """One LB's account: per checked server its state, DOWN transitions and seconds DOWN; the sessions of each
    backend (HAProxy's counters since it last started)."""
    rows = list(csv.DictReader(io.StringIO(text.removeprefix("# "))))
    servers = [row for row in rows if row["pxname"] == HAPROXY_BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")]
    totals = {row["pxname"]: row["stot"] for row in rows if row["svname"] == "BACKEND"}
    if not servers or HAPROXY_FALLBACK_BACKEND not in totals:
        raise RuntimeError(f"{host}: HAProxy's statistics lack the API backends: {sorted(totals)}")
    checked = ", ".join(
        f"{row['svname']} {row['status']} ({row['chkdown'] or 0}x DOWN, {row['downtime'] or 0} s down)"
        for row in servers
    )
    return (
        f"{host}: {checked}; sessions checked {totals[HAPROXY_BACKEND]}, fail-open {totals[HAPROXY_FALLBACK_BACKEND]}"
    )


def lb_view(transport: SshTransport, lbs: list[Node]) -> str:
    return "; ".join(
        summary(lb.hostname, run_checked(transport, lb, stats_script(lb.hostname), timeout=STATS_TIMEOUT_SECONDS))
        for lb in lbs
    )
