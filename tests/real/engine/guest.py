"""Reaching a lab node the way the program's steps reach it: the operator key, only the pinned host key trusted,
from the lab's network namespace (where the guests' network is). Used by the test to look at what `pulumi up`
did on a node; every call is bounded.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from components.remote import PER_DIAL_TIMEOUT_SECONDS, STEP_DIAL_ERROR_LIMIT

# As the program's steps dial (components/remote.py): 10 s per dial, up to 10 failed dials per step.
SSH_CONNECT_TIMEOUT_SECONDS = PER_DIAL_TIMEOUT_SECONDS
DIAL_ATTEMPTS = STEP_DIAL_ERROR_LIMIT


@dataclass(frozen=True)
class Ssh:
    hostname: str
    address: str
    user: str
    key: Path
    known_hosts: Path
    prefix: tuple[str, ...]  # e.g. `ip netns exec NAME`

    @classmethod
    def pinned(
        cls, hostname: str, address: str, user: str, key: Path, host_key: str, directory: Path, prefix: list[str]
    ) -> Ssh:
        digest = hashlib.sha256(host_key.encode()).hexdigest()[:12]
        known = directory / f"{hostname}.known_hosts.{digest}"
        known.write_text(f"{address} {host_key.strip()}\n")
        return cls(hostname, address, user, key, known, tuple(prefix))

    def argv(self) -> list[str]:
        options = {
            "IdentitiesOnly": "yes",
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "ConnectTimeout": str(SSH_CONNECT_TIMEOUT_SECONDS),
        }
        flags = [word for key, value in options.items() for word in ("-o", f"{key}={value}")]
        return [*self.prefix, "ssh", "-F", "/dev/null", "-i", str(self.key), *flags, f"{self.user}@{self.address}"]

    def run(
        self, command: str, *, timeout: float = 120, attempts: int = DIAL_ATTEMPTS
    ) -> subprocess.CompletedProcess[str]:
        """Failed dials (exit 255: a timeout or a refused connection) are retried like the steps' dials."""
        for _ in range(attempts):
            done = subprocess.run(
                [*self.argv(), command], input="", capture_output=True, text=True, timeout=timeout, check=False
            )
            dial_failed = done.returncode == 255 and ("timed out" in done.stderr or "refused" in done.stderr)
            if not dial_failed:
                return done
            time.sleep(2)
        return done


def tcp_open(prefix: list[str], address: str, port: int) -> bool:
    """A TCP connection to address:port from the lab's namespace succeeds (bounded to a few seconds)."""
    if not prefix:
        try:
            with socket.create_connection((address, port), timeout=2):
                return True
        except OSError:
            return False
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2)"
    done = subprocess.run([*prefix, "python3", "-c", probe], capture_output=True, timeout=20, check=False)
    return done.returncode == 0
