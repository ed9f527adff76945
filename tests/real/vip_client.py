"""Clients of the API through the VIP while a control plane restarts something, and what HAProxy did for them:
shared by the certificate renewal proof (tests/real/renewal.py) and the settings proofs
(tests/real/test_settings_live.py)."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field

from render import lb_config
from tests.integration.netns import haproxy_servers
from tests.real.control_plane_lab import ControlPlaneLab

KUBEADM_CONFIG = ("/api/v1/namespaces/kube-system/configmaps/kubeadm-config", '"ClusterConfiguration"')
CLIENT_ATTEMPTS = 3
CLIENT_BACKOFF = 0.5
# Per load balancer: (sessions, retries, redispatches) of one server.
Counters = dict[str, tuple[int, int, int]]


@dataclass
class VipClient:
    """GETs through the VIP in a loop: each request bounded, retried as client-go would; counts what failed.

    `requests` counts requests (a retried one once), `retried` the retries they needed, `attempt_errors` what
    every failed attempt got (retried or not), `failures` what the requests that failed for good got."""

    lab: ControlPlaneLab
    # (path, text the answer must hold), taken in turn.
    reads: tuple[tuple[str, str], ...] = (KUBEADM_CONFIG,)
    requests: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    attempt_errors: list[str] = field(default_factory=list)
    workers: int = 4
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, number: int = 0) -> None:
        path, expected = self.reads[number % len(self.reads)]
        last = ""
        for attempt in range(CLIENT_ATTEMPTS):
            if attempt:
                with self._lock:
                    self.retried += 1
                time.sleep(CLIENT_BACKOFF * attempt)
            try:
                response = self.lab.request("GET", path)
            except (OSError, http.client.HTTPException) as error:
                last = repr(error)
                self.attempt_errors.append(last)
                continue
            if response.status == 200 and expected in response.body:
                return
            last = f"HTTP {response.status}: {response.body[:200]}"
            self.attempt_errors.append(last)
            if response.status < 500 and response.status != 429:
                break
        self.failures.append(last)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.requests += 1
                number = self.requests
            self.one(number)
            self._stop.wait(0.02)

    def __enter__(self) -> VipClient:
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"vip-client-{n}") for n in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def summary(self) -> str:
        text = f"{self.requests} requests, {len(self.failures)} failed, {self.retried} retries"
        if self.failures:
            text += f"; failures: {sorted(set(self.failures))[:3]}"
        if self.retried:
            text += f"; attempts that failed: {sorted(set(self.attempt_errors))[:3]}"
        return text


def haproxy_retries(lab: ControlPlaneLab, server: str) -> Counters:
    """Per load balancer: HAProxy's (sessions, retries, redispatches) for `server` in the API backend."""
    found = {}
    for plan in lab.plan.load_balancers:
        namespace = lab.nodes[plan.hostname].namespace
        servers = haproxy_servers(
            namespace, lb_config.HAPROXY_HEALTH_PORT, lb_config.HAPROXY_STATS_URI, lb_config.HAPROXY_BACKEND
        )
        row = servers.get(server)
        if row is not None:
            found[plan.hostname] = (int(row["stot"] or 0), int(row["wretr"] or 0), int(row["wredis"] or 0))
    return found


def haproxy_since(lab: ControlPlaneLab, server: str, before: Counters) -> dict[str, tuple[int, ...]]:
    """What `haproxy_retries` counted for `server` since `before` was read."""
    return {
        lb: tuple(now - then for now, then in zip(values, before[lb], strict=True))
        for lb, values in haproxy_retries(lab, server).items()
    }
