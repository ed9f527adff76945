"""Lab nodes for the operator tools: a transport into network namespaces, a kubelet stand-in, a fake `ctr`.

`NamespaceTransport` is what `SshTransport` is in production: it runs the tools' rendered scripts as
root "on a node", here inside the node's network namespace with its absolute paths moved under the
node's directory (`localise`), with stdin and stdout passed through like SSH does.

On a node etcdctl and etcdutl run from the member's etcd image through `ctr run`; `fake_ctr` checks
that command line (namespace, flags, bind mounts, the image the manifest names) and runs the real
binaries instead. `StaticPods` plays kubelet for etcd: a member runs exactly while its manifest is in
the node's manifest directory, with the manifest's command.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from render.scripts import Script
from tests.integration.netns import Lab, Namespace, Process
from tools.access import Node

# On a node `pgrep -x etcd` sees that node's processes only; lab nodes share one PID namespace.
NODE_PGREP = '#!/bin/sh\nexec /usr/bin/pgrep --ns $$ --nslist net "$@"\n'
ETCD_ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def fake_ctr(bin_dir: Path, image: str) -> str:
    """A `ctr` that accepts only `--namespace k8s.io run --rm --net-host --mount=... IMAGE ID etcdctl|etcdutl ...`."""
    return f"""#!/bin/bash
set -euo pipefail
fail() {{ echo "fake ctr: $*" >&2; exit 2; }}
[ "$#" -ge 3 ] && [ "$1" = --namespace ] && [ "$2" = k8s.io ] && [ "$3" = run ] || fail "unexpected: $*"
shift 3
seen_rm=0 seen_net=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --rm) seen_rm=1; shift ;;
    --net-host) seen_net=1; shift ;;
    --mount=type=bind,src=/*,dst=/*,options=rbind:r[ow]) shift ;;
    -*) fail "unexpected flag $1" ;;
    *) break ;;
  esac
done
[ "$seen_rm" = 1 ] && [ "$seen_net" = 1 ] || fail "needs --rm and --net-host"
[ "$#" -ge 3 ] || fail "needs IMAGE ID COMMAND"
[ "$1" = '{image}' ] || fail "image $1 is not the manifest's {image}"
shift 2
case "$1" in etcdctl|etcdutl) ;; *) fail "no $1 in the etcd image" ;; esac
tool="$1"
shift
exec {bin_dir}/"$tool" "$@"
"""


@dataclass
class LabNode:
    node: Node
    namespace: Namespace
    root: Path
    localise: Callable[[str], str]
    bin_dir: Path


class NamespaceTransport:
    """Runs a tool's scripts in lab nodes; the same interface as tools.access.SshTransport."""

    def __init__(self, nodes: Mapping[str, LabNode]) -> None:
        self.nodes = nodes
        self.ran: list[tuple[str, str]] = []

    def run(
        self,
        node: Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]:
        lab = self.nodes[node.hostname]
        self.ran.append((node.hostname, script.step))
        env = ["/usr/bin/env", "-i", f"PATH={lab.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"]
        argv = lab.namespace.exec_argv([*env, "bash", "-c", lab.localise(script.render()), f"kubeadm-ha-{script.step}"])
        sink = stdout or subprocess.PIPE
        if isinstance(stdin, bytes) or stdin is None:
            return subprocess.run(argv, input=stdin or b"", stdout=sink, stderr=subprocess.PIPE, timeout=timeout)
        return subprocess.run(argv, stdin=stdin, stdout=sink, stderr=subprocess.PIPE, timeout=timeout)


class StaticPods:
    """kubelet for each node's etcd: starts the manifest's command while the manifest exists, stops it when it goes."""

    def __init__(self, lab: Lab, etcd: str, manifests: Mapping[str, tuple[Namespace, Path]]) -> None:
        self.lab, self.etcd, self.manifests = lab, etcd, manifests
        self.processes: dict[str, Process] = {}
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> StaticPods:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for process in self.processes.values():
            process.stop(signal.SIGKILL)

    def sync(self) -> None:
        with self._lock:
            for name, (namespace, manifest) in self.manifests.items():
                process = self.processes.get(name)
                running = process is not None and process.alive()
                if manifest.exists() and not running:
                    pod = yaml.safe_load(manifest.read_text())
                    command = pod["spec"]["containers"][0]["command"]
                    assert command[0] == "etcd", command
                    self.processes[name] = self.lab.spawn(
                        namespace, [*ETCD_ENV, self.etcd, *command[1:]], name=f"etcd-{name}"
                    )
                elif not manifest.exists() and running:
                    assert process is not None
                    process.stop(signal.SIGTERM, timeout=10)

    def kill_all(self) -> None:
        """A crash of every member at once (kubelet paused, so nothing restarts them yet)."""
        with self._lock:
            for process in self.processes.values():
                process.stop(signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.paused.is_set():
                with contextlib.suppress(Exception):
                    self.sync()
            self._stop.wait(0.2)
