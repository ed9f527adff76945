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
    r"^<\d+>(?P<client>\S+) \[[^\]]+\] (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) "
    r"-?\d+/-?\d+/-?\d+ (?P<bytes>\d+) (?P<state>\S\S) \d+/\d+/\d+/\d+/(?P<retries>\+?\d+) \d+/\d+$"
)
# "Server kube-apiserver/staging-cp-2 is DOWN, reason: ... 1 sessions active, 0 requeued, ..."
_DOWN = re.compile(r"^<\d+>Server (?P<backend>[^/\s]+)/(?P<server>\S+) is DOWN\b.* (?P<active>\d+) sessions active")


@dataclasses.dataclass(frozen=True)
class Session:
    backend: str
    server: str
    bytes_read: int
    state: str
    redispatched: bool

    @property
    def killed_at_mark_down(self) -> bool:
        return self.state.startswith("D")


def sessions(log: str) -> list[Session]:
    """Every client session HAProxy logged, in order."""
    found = []
    for line in log.splitlines():
        if match := _SESSION.match(line):
            found.append(
                Session(
                    backend=match["backend"],
                    server=match["server"],
                    bytes_read=int(match["bytes"]),
                    state=match["state"],
                    redispatched=match["retries"].startswith("+"),
                )
            )
    return found


def active_at_mark_down(log: str, backend: str, server: str) -> list[int]:
    """For each time `backend/server` was marked DOWN, how many sessions it still had (those it then cut)."""
    return [
        int(match["active"])
        for line in log.splitlines()
        if (match := _DOWN.match(line)) and (match["backend"], match["server"]) == (backend, server)
    ]
