"""What a real HAProxy's log says about client sessions and server state changes.

The format is the rendered haproxy.cfg's: `log stdout format short` (a `<PRI>` prefix) and `option tcplog`,
whose line is `%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq` (HAProxy 2.6
doc/configuration.txt, "8.2.2. TCP log format"). `%ts` is the termination state: "--" a normal end; first
character "D" a session HAProxy killed because its server was marked DOWN (`on-marked-down shutdown-sessions`).
"""

from __future__ import annotations

import dataclasses
import re

_SESSION = re.compile(
    r"^<\d+>\S+ \[[^\]]+\] \S+ [^/\s]+/(?P<server>\S+) "
    r"-?\d+/-?\d+/-?\d+ \d+ (?P<state>\S\S) \d+/\d+/\d+/\d+/\+?\d+ \d+/\d+$"
)
# "Server kube-apiserver/staging-cp-2 is DOWN, reason: ... 1 sessions active, 0 requeued, ..."
_DOWN = re.compile(r"^<\d+>Server (?P<backend>[^/\s]+)/(?P<server>\S+) is DOWN\b.* (?P<active>\d+) sessions active")


@dataclasses.dataclass(frozen=True)
class Session:
    """A logged session: the server it ended on and its termination state (what a failed assertion shows)."""

    server: str
    state: str

    @property
    def killed_at_mark_down(self) -> bool:
        return self.state.startswith("D")


def sessions(log: str) -> list[Session]:
    """Every client session HAProxy logged, in order."""
    return [Session(match["server"], match["state"]) for line in log.splitlines() if (match := _SESSION.match(line))]


def active_at_mark_down(log: str, backend: str, server: str) -> list[int]:
    """For each time `backend/server` was marked DOWN, how many sessions it still had (those it then cut)."""
    return [
        int(match["active"])
        for line in log.splitlines()
        if (match := _DOWN.match(line)) and (match["backend"], match["server"]) == (backend, server)
    ]
