"""An etcd restore under a real Kubernetes control plane: the objects created before the snapshot are served
through the VIP after the restore, the one created after it is not, and the API takes writes.

The lab is tests/real/control_plane_lab.py with prod (external etcd: three etcd 3.7 members, three
kube-apiservers, controller managers and schedulers from kubeadm's manifests, behind the program's HAProxy
and keepalived). Each member's manifest is put in /etc/kubernetes/manifests as its `etcd-member` step does
(install the staged manifest under a dot name, then mv), and from then on tests/real/kubelet.py plays kubelet
for every etcd member and control-plane component: each runs exactly while its manifest is there, with the
manifest's command. The timer's snapshot script (render/backup.py) and every script of tools.etcd_restore
and tools.etcd_backup run unmodified, at their own absolute paths, in the node's network and mount namespaces
(`NodeTransport`, standing where SSH is in production), with the real etcdctl/etcdutl behind the `ctr`
stand-in of tests/integration/lab_nodes.py (which checks the `ctr run` command line and the manifest's image)
and `pgrep` limited to the node.

Proven, and measured: ConfigMaps created with kubectl through the VIP before the snapshot are served after
the restore with their data; the one created after the snapshot is gone; kubectl creates a new one. The
restore holds the API servers itself and puts them back last, so they start on the restored data: no
further restart is needed. Every wait is bounded; everything is torn down after a failure too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.control_plane_lab import ControlPlaneLab
from tests.real.kubelet import Kubelet
from tests.real.restore import RestoreLab, restore_and_prove
from tests.real.test_control_plane_live import cp_lab

pytestmark = pytest.mark.real
__all__ = ["cp_lab"]


@pytest.fixture
def restore_lab(cp_lab: ControlPlaneLab) -> Iterator[tuple[RestoreLab, Kubelet]]:
    live = RestoreLab(cp_lab)
    live.place_etcd_manifests()
    kubelet = live.kubelet()
    with kubelet:
        yield live, kubelet
    assert kubelet.error is None, f"the kubelet stand-in failed: {kubelet.error!r}"


def test_objects_created_before_the_snapshot_are_served_after_the_restore(
    restore_lab: tuple[RestoreLab, Kubelet], tmp_path: Path
) -> None:
    restore_and_prove(*restore_lab, tmp_path)
