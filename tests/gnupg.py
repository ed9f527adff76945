"""A throwaway GnuPG home for tests that make real OpenPGP keys.

gpg starts a gpg-agent for its home on first use, and the agent outlives gpg: without `gpgconf --kill` every
test module that made keys left one running after the suite (found after a CI run: two agents under
/tmp/pytest-of-root, homes `gnupg0` and `signer0`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def agents_of(home: Path) -> list[int]:
    """PIDs of the gpg-agent processes serving `home` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"gpg-agent") and str(home).encode() in argv:
            found.append(int(proc.name))
    return found


@contextmanager
def gnupg_home(home: Path) -> Iterator[list[str]]:
    """The gpg command for a new home at `home` (0700, batch, no passphrase); its agent is stopped on exit."""
    home.chmod(0o700)
    try:
        yield ["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--pinentry-mode", "loopback"]
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, timeout=30, check=False
        )
