"""A stacked-etcd control-plane lab of staging, set up as the program sets it up: the module fixture of
tests/real/test_stacked_control_plane_live.py (which says what it proves) and tests/real/test_encryption_live.py.

The first control plane from kubeadm's init phases (`etcd local` included) on the program's `init.yaml` and the
files beside it; the others join one after another with kubeadm's `join phase control-plane-prepare all` and
`etcd-join` on their own join bundles; the test plays kubelet for them (tests/real/control_plane_lab.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from model.versions import DEFAULT_KUBERNETES
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, cleanup_stale
from tests.real.binaries import binary
from tests.real.control_plane_lab import BundleFilter, ControlPlaneLab, report
from tools.offline import Evaluation
from tools.plan import mask

STACK = "staging"
VERSION = DEFAULT_KUBERNETES
COMPONENTS = ("kube-apiserver", "kube-controller-manager")
REQUIRED = (
    "kubeadm", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "etcdctl"
)  # fmt: skip


@contextlib.contextmanager
def stacked_lab(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prefix: str,
    *,
    evaluation: Evaluation | None = None,
    bundle_filter: BundleFilter | None = None,
) -> Iterator[ControlPlaneLab]:
    """staging's three control planes running (see the module), torn down however the test ends; the labs'
    logs are printed (masked) when it failed."""
    require_root()
    programs = require_programs("ip", "haproxy", "keepalived", "curl", "unshare", "nsenter")
    binaries = {name: binary(name, VERSION) for name in REQUIRED}
    cleanup_stale()
    work = tmp_path_factory.mktemp(f"{prefix}-lab")
    lab = Lab(prefix, log_dir=work / "logs")
    live: ControlPlaneLab | None = None
    failed = False
    try:
        live = ControlPlaneLab(
            lab, work, STACK, VERSION, binaries, programs, evaluation=evaluation, bundle_filter=bundle_filter
        )
        assert live.etcd_spec is None, f"{STACK} is expected to use stacked etcd"
        live.prepare_control_planes(only_first=True)
        first = live.nodes[live.plan.control_planes[0].hostname]
        live.start_stacked_etcd(first)
        live.start_control_planes(COMPONENTS, only=[first.name])
        live.start_load_balancers()
        live.wait_backends({first.name: "UP"}, timeout=30)
        for phase in (["upload-config", "all"], ["bootstrap-token"]):
            ran = live.kubeadm(first, "init", "phase", *phase, "--config", "/etc/kubernetes/kubeadm-ha/init.yaml")
            assert ran.returncode == 0, ran.output
        live.mirror_pod(first, "etcd")  # as admin: kubeadm bound the program's admin group to cluster-admin by now
        # The other control planes join strictly one after another, as the program orders them.
        for plan in live.plan.control_planes[1:]:
            took = live.join_stacked_control_plane(plan, COMPONENTS)
            report(f"{plan.hostname} joined (etcd member added, API server ready) in {took:.1f}s")
        yield live
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request):
            print(f"\n===== logs of lab {lab.prefix} =====\n{mask(lab.logs(tail=30))}")
        lab.close()
        if live is not None:
            live.close()
