"""The cluster lab's view of its load balancers (tests/real/cluster_lab.py, issue 21): what each HAProxy saw of
the API servers over the run, read from its own statistics (the local `stats;csv` page the product renders).

Measurement, not a verdict: how often each control plane was marked DOWN and for how long, and how many client
connections the fail-open backend carried while none was UP (render/lb_config.py). Run 7 showed a starved API
server failing HAProxy's checks while it still answered; this says how much of that the run met.
"""

from __future__ import annotations

import dataclasses

from render.lb_config import HAPROXY_BACKEND, HAPROXY_FALLBACK_BACKEND, HAPROXY_HEALTH_PORT, HAPROXY_STATS_URI
from render.scripts import Script, command
from tests.integration.netns import backend_servers, haproxy_stats_rows
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


@dataclasses.dataclass(frozen=True)
class LbView:
    """One LB's HAProxy counters since it last started: per checked API server its status, DOWN transitions and
    seconds DOWN; the sessions of the checked and of the fail-open backend."""

    host: str
    servers: dict[str, tuple[str, int, int]]
    checked_sessions: int
    fail_open_sessions: int

    def __str__(self) -> str:
        checked = ", ".join(
            f"{name} {status} ({downs}x DOWN, {seconds} s down)"
            for name, (status, downs, seconds) in self.servers.items()
        )
        return f"{self.host}: {checked}; sessions checked {self.checked_sessions}, fail-open {self.fail_open_sessions}"


def parse(host: str, text: str) -> LbView:
    """`text`: HAProxy's stats CSV as its stats page serves it."""
    rows = haproxy_stats_rows(text)
    servers = backend_servers(rows, HAPROXY_BACKEND)
    totals = {row["pxname"]: int(row["stot"] or 0) for row in rows if row["svname"] == "BACKEND"}
    if not servers or HAPROXY_FALLBACK_BACKEND not in totals:
        raise RuntimeError(f"{host}: HAProxy's statistics lack the API backends: {sorted(totals)}")
    return LbView(
        host=host,
        servers={
            name: (row["status"], int(row["chkdown"] or 0), int(row["downtime"] or 0)) for name, row in servers.items()
        },
        checked_sessions=totals[HAPROXY_BACKEND],
        fail_open_sessions=totals[HAPROXY_FALLBACK_BACKEND],
    )


def lb_view(transport: SshTransport, lbs: list[Node]) -> str:
    return "; ".join(
        str(parse(lb.hostname, run_checked(transport, lb, stats_script(lb.hostname), timeout=STATS_TIMEOUT_SECONDS)))
        for lb in lbs
    )
