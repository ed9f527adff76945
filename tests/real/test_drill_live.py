"""tools.drill against a real control plane: prod's etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (from kubeadm's manifests) behind the program's HAProxy and keepalived, in network namespaces
(tests/real/control_plane_lab.py; the same lab as test_control_plane_live.py).

`LabTarget` (tests/real/drill_target.py) is the drill's view of that lab: what SSH and the VIP's HTTPS are
in production, processes and the client namespace are here. The stacked case is in
test_stacked_control_plane_live.py.

Proven, and measured: with the controller manager's lease holder down, the API through the VIP answers and
takes writes, both leases end up on running control planes, the stopped node comes back ready; with the VIP
holder's keepalived and HAProxy down, the VIP moves and the API answers through it. Every wait is bounded
by the drill itself.

And (issue 18, defect 5) a drill ended by SIGINT right after its stop puts the control plane back: with
production's stop and start (`HeldManifestsTarget`: StackTarget's hold and release scripts on the node, the
`Kubelet` stand-in acting on the manifests), the held static pod manifests are back in
/etc/kubernetes/manifests, nothing is left held, the API server answers again and HAProxy marks it UP.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from render.backup import HELD_MANIFEST_DIR
from tests.integration.netns import poll_until
from tests.real.control_plane_lab import APISERVER_BOUND, COMPONENTS, MANIFESTS, ControlPlaneLab, report
from tests.real.drill_target import HeldManifestsTarget, LabTarget
from tests.real.kubelet import STOP_GRACE, Kubelet
from tests.real.test_control_plane_live import cp_lab
from tools.drill import choose_control_plane, drill

pytestmark = pytest.mark.integration

__all__ = ["cp_lab"]


def test_the_drill_holds_on_a_real_control_plane(cp_lab: ControlPlaneLab) -> None:
    target = LabTarget(cp_lab)
    dry = drill(target, yes=False)
    assert dry.rows == []
    result = drill(target, yes=True)
    for row in result.rows:
        report(f"drill: {row.check}: {row.before} -> {row.after}, {'held' if row.held else 'NO'}, {row.seconds}")
    assert result.passed, result.table()
    checks = {row.check for row in result.rows}
    assert "kube-controller-manager lease moved" in checks and "VIP moved" in checks


def test_the_load_balancer_drill_alone_moves_the_vip_and_leaves_the_control_planes_running(
    cp_lab: ControlPlaneLab,
) -> None:
    # `--only load-balancer`: what a cluster with one control plane can drill (the cluster lab's shape on VMs).
    target = LabTarget(cp_lab)
    planes = {name: node for name, node in cp_lab.nodes.items() if "kube-apiserver" in node.processes}
    before = {name: node.processes["kube-apiserver"] for name, node in planes.items()}
    assert len(before) == 3, sorted(cp_lab.nodes)
    result = drill(target, yes=True, only="load-balancer")
    for row in result.rows:
        report(f"drill --only load-balancer: {row.check}: {row.before} -> {row.after}, {row.seconds}")
    assert result.passed, result.table()
    assert [row.check for row in result.rows] == [
        "VIP moved",
        "API through the moved VIP",
        "VIP held after the LB returned",
    ]
    # No control plane was stopped: every API server is the process it was, and still alive.
    assert all(node.processes["kube-apiserver"] is before[name] for name, node in planes.items())
    assert all(process.alive() for process in before.values())


class SignalledAfterStop(HeldManifestsTarget):
    """Sends SIGINT to this very process (the one running the drill) at the drill's first probe after its
    stop, as Ctrl-C in the operator's terminal would: the drill's handler (or, unfixed, Python's) raises in
    the main thread while the drill waits for the API."""

    def __init__(self, lab: ControlPlaneLab, workdir: Path, host: str) -> None:
        super().__init__(lab, workdir)
        self.host = host
        self.signalled_at: float | None = None
        self.apiserver_was_stopped = False

    def api_ready(self) -> bool:
        if self.signalled_at is None:
            self.apiserver_was_stopped = not self.lab.nodes[self.host].processes["kube-apiserver"].alive()
            self.signalled_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs in this thread within this sleep
        return super().api_ready()


def test_a_drill_interrupted_after_its_stop_puts_the_static_pods_back(
    cp_lab: ControlPlaneLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "drill-target"
    workdir.mkdir(mode=0o700)
    host = choose_control_plane(LabTarget(cp_lab))
    node = cp_lab.nodes[host]
    pods = tuple(component for component in COMPONENTS if component in node.processes)
    target = SignalledAfterStop(cp_lab, workdir, host)
    with Kubelet(cp_lab, {host: pods}) as kubelet:
        try:
            with pytest.raises(KeyboardInterrupt):  # the drill's Interrupted is one; unfixed, Python's own
                drill(target, yes=True)
            ended = time.monotonic()
            missing = [name for name in pods if not node.root.exists(f"{MANIFESTS}/{name}.yaml")]
            held = [name for name in pods if node.root.exists(f"{HELD_MANIFEST_DIR}/{name}.yaml")]
        finally:
            target.stack.start_control_plane(host)  # the lab is shared: whatever is held goes back, fixed or not
        output = capsys.readouterr().out
        assert target.apiserver_was_stopped, "the drill's stop did not stop the API server"
        assert missing == [] and held == [], f"left held on {host}: {held} (missing: {missing})\n{output}"
        assert f"restored control plane {host}: static pods" in output, output
        poll_until(
            lambda: node.processes["kube-apiserver"].alive() and cp_lab.apiserver_ready(host),
            timeout=STOP_GRACE + APISERVER_BOUND,
            interval=1,
            message=f"{host}'s API server answering again",
        )
        back = time.monotonic() - ended
        cp_lab.wait_backends({host: "UP"}, timeout=30)
    assert kubelet.error is None, f"the kubelet stand-in failed: {kubelet.error!r}"
    assert target.signalled_at is not None
    report(f"drill interrupted by SIGINT after stopping {host}: manifests back, /readyz answers {back:.1f}s later")
