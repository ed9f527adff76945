"""Stand-ins for what a control-plane lab node lacks: kubelet's static pods, `crictl`, a node-local `pgrep`.

The lab (tests/real/control_plane_lab.py) has no kubelet and no container runtime; the program's day-2 steps
(certificate renewal, the etcd restore) stop and start static pods by moving their manifests out of
/etc/kubernetes/manifests and back, and ask the runtime or `pgrep` whether a process is gone. The smallest
faithful stand-ins:

* `Kubelet`: per node, a loop that stops a component (SIGTERM, as kubelet's container stop, SIGKILL after the
  grace period) once its manifest leaves /etc/kubernetes/manifests, and starts it again with the command of
  the manifest then in place (through `ControlPlaneLab.start_component`, or `start_stacked_etcd` for etcd, as
  the lab starts every static pod) once it is back. A manifest whose content changes while its component runs
  (`kubeadm upgrade` writes the new one over the old) is a new pod to kubelet: the old process is stopped the
  same way, then the new one started. The stand-in compares the whole file (kubelet hashes the pod it
  decodes from it); a process it did not start itself (the lab's, or one a test restarted) is taken to run
  the manifest in place when the loop first sees it;
* `crictl`: accepts only `ps --quiet --name ^NAME$` and prints the pids of NAME's binary running in the
  node's network namespace (each lab node is one network namespace; they share one PID namespace);
* `pgrep`: the real one, limited to the node's network namespace for the same reason.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.real.control_plane_lab import MANIFESTS, ControlPlaneLab, Node

STOP_GRACE = 30.0  # kubelet's default terminationGracePeriodSeconds for a static pod

FAKE_CRICTL = r"""#!/bin/bash
set -euo pipefail
[ "$#" -eq 4 ] && [ "$1" = ps ] && [ "$2" = --quiet ] && [ "$3" = --name ] || { echo "fake crictl: $*" >&2; exit 2; }
name="${4#^}"
name="${name%\$}"
/usr/bin/pgrep --ns $$ --nslist net -f "^[^ ]*/${name}( |\$)" || true
"""
NODE_PGREP = '#!/bin/sh\nexec /usr/bin/pgrep --ns $$ --nslist net "$@"\n'


def node_tools(directory: Path, links: Mapping[str, str]) -> Path:
    """A directory for the front of a step's PATH: `crictl`, `pgrep`, and symlinks to `links` (name -> binary)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("crictl", FAKE_CRICTL), ("pgrep", NODE_PGREP)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    for name, target in links.items():
        if not (directory / name).exists():
            (directory / name).symlink_to(target)
    return directory


class Kubelet:
    """Plays kubelet for the static pods `pods` names (node name -> components) on lab nodes."""

    def __init__(
        self,
        lab: ControlPlaneLab,
        pods: Mapping[str, tuple[str, ...]],
        *,
        before_stop: Callable[[Node, str], None] | None = None,
    ) -> None:
        """`before_stop(node, component)` runs as the stand-in is about to stop a component (a test's probe)."""
        self.lab, self.pods, self.before_stop = lab, dict(pods), before_stop
        self.events: list[str] = []
        self.timeline: list[tuple[float, str]] = []  # (time.monotonic(), event): what each stop and start took
        self.error: BaseException | None = None
        self.paused = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # (node, component) -> (pid, digest of the manifest that process was started from)
        self._started_from: dict[tuple[str, str], tuple[int, str]] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kubelet-stand-in")

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_GRACE + 15)

    def sync(self) -> None:
        with self._lock:
            for name, components in self.pods.items():
                node = self.lab.nodes[name]
                for component in components:
                    self._sync_one(node, component)

    def _sync_one(self, node: Node, component: str) -> None:
        name, key = node.name, (node.name, component)
        try:
            text: str | None = node.root.path(f"{MANIFESTS}/{component}.yaml").read_text()
        except FileNotFoundError:
            text = None
        process = node.processes.get(component)
        running = process is not None and process.alive()
        if text == "":
            return  # being written: kubelet would fail to decode it and look again at its next sync
        wanted = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
        if running:
            assert process is not None
            pid, started_from = self._started_from.get(key, (None, None))
            if pid != process.pid and wanted is not None:
                # Not started by this loop: it runs what is in place now.
                self._started_from[key] = (process.pid, wanted)
                started_from = wanted
            if wanted is not None and wanted == started_from:
                return
            changed = wanted is not None  # else the manifest is gone
            if self.before_stop is not None:
                self.before_stop(node, component)
            self._note(f"stopping {component} on {name}")
            process.stop(signal.SIGTERM, timeout=STOP_GRACE)
            self._note(f"stopped {component} on {name}")
            self._started_from.pop(key, None)
            if not changed:
                return
        if wanted is None:
            return
        if component == "etcd":
            process = self.lab.start_stacked_etcd(node)
        else:
            process = self.lab.start_component(node, component)
        self._started_from[key] = (process.pid, wanted)
        self._note(f"started {component} on {name}")

    def _note(self, event: str) -> None:
        if not event.startswith("stopping"):
            self.events.append(event)
        self.timeline.append((time.monotonic(), event))

    def stop_seconds(self) -> dict[str, float]:
        """How long each stop took (SIGTERM until the process was gone), by "component on node"."""
        began: dict[str, float] = {}
        took = {}
        for moment, event in self.timeline:
            verb, what = event.split(" ", 1)
            if verb == "stopping":
                began[what] = moment
            elif verb == "stopped" and what in began:
                took[what] = moment - began.pop(what)
        return took

    def kill(self, component: str) -> None:
        """A crash of `component` on every node at once (pause first, or it comes straight back)."""
        with self._lock:
            for name, components in self.pods.items():
                process = self.lab.nodes[name].processes.get(component)
                if component in components and process is not None:
                    process.stop(signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.paused.is_set():
                try:
                    self.sync()
                except BaseException as error:  # reported by the test, which fails on it
                    self.error = error
                    return
            self._stop.wait(0.2)
