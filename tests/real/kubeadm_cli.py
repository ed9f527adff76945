"""Small wrappers around the real kubeadm binary; every call bounded, every output masked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tools.plan import mask

VALIDATE_TIMEOUT = 60
# Without a ClusterConfiguration (the token document) `config validate` defaults kubernetesVersion to
# "stable-1" and looks it up on dl.k8s.io, then falls back to its own version. `kubeadm token create`, which
# reads that document on the nodes, sets the version itself and never looks it up (cmd/token.go), so these
# two lines say nothing about the document.
_VERSION_LOOKUP = re.compile(
    r"^W\d{4} [\d:.]+\s+\d+ version\.go:\d+\] "
    r"(could not fetch a Kubernetes version from the internet: .*|falling back to the local client version: .*)$"
)


def validate(kubeadm: str, documents: str, path: Path) -> str:
    """`kubeadm config validate` of `documents`; "" when accepted without a word on stderr, else the problem."""
    path.write_text(documents)
    path.chmod(0o600)
    argv = [kubeadm, "config", "validate", "--config", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT, check=False)
    lines = mask(result.stderr).strip().splitlines()
    if "kind: ClusterConfiguration" not in documents:
        lines = [line for line in lines if not _VERSION_LOOKUP.match(line)]
    if result.returncode == 0 and not lines:
        return ""
    stderr = "\n".join(lines)
    return f"kubeadm config validate exited {result.returncode}:\n{mask(result.stdout).strip()}\n{stderr}".strip()
