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
"""

from __future__ import annotations

import pytest

from tests.real.control_plane_lab import ControlPlaneLab, report
from tests.real.drill_target import LabTarget
from tests.real.test_control_plane_live import cp_lab
from tools.drill import drill

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
