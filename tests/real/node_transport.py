"""The operator tools' transport over lab nodes, standing where SSH is in production (tools.access.SshTransport,
proven against the real sshd in tests/integration/test_ssh_transport_live.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO

from render.scripts import Script
from tests.real.control_plane_lab import ControlPlaneLab
from tools import access as tool_access


class NodeTransport:
    """tools.access.SshTransport's interface over lab nodes: a script runs as root in the node's namespaces."""

    def __init__(self, lab: ControlPlaneLab, tools: dict[str, Path]) -> None:
        self.lab, self.tools = lab, tools
        self.ran: list[tuple[str, str]] = []

    def run(
        self,
        node: tool_access.Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]:
        lab_node = self.lab.nodes[node.hostname]
        self.ran.append((node.hostname, script.step))
        env = ["/usr/bin/env", "-i", f"PATH={self.tools[node.hostname]}:/usr/sbin:/usr/bin:/sbin:/bin"]
        argv = ["ip", "netns", "exec", lab_node.namespace.name]
        argv += lab_node.root.wrap([*env, "bash", "-c", script.render(), f"kubeadm-ha-{script.step}"])
        sink = stdout or subprocess.PIPE
        if isinstance(stdin, bytes) or stdin is None:
            return subprocess.run(argv, input=stdin or b"", stdout=sink, stderr=subprocess.PIPE, timeout=timeout)
        return subprocess.run(argv, stdin=stdin, stdout=sink, stderr=subprocess.PIPE, timeout=timeout)
