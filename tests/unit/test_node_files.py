"""render/node_files.py under real bash, chmod, stat and useradd in the mount-namespace sandbox (tests/sandbox.py):
the kubelet's files as kubeadm and the packages leave them (0644) end up 0600, etcd's data directory owned by the
`etcd` system user, 0700; a second run finds nothing to do. Which files kube-bench reads, and that it then passes,
is tests/real/kube-bench's part."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from render.node_files import node_files_script
from tests.sandbox import Sandbox

# The paths the sandbox overlays (/etc and /var): the ones under /usr/lib are the host's own, left alone here.
KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
FLAGS = "/var/lib/kubelet/kubeadm-flags.env"
DROP_IN = "/etc/systemd/system/kubelet.service.d/10-kubeadm.conf"
STANDALONE = "/etc/kubernetes/kubelet-standalone.yaml"


@pytest.fixture
def sandbox(sandbox_support: None, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, {})


def mode(sandbox: Sandbox, path: str) -> int:
    return stat.S_IMODE(sandbox.file(path).stat().st_mode)


@pytest.mark.parametrize("etcd_member", [True, False])
def test_kubelet_files_become_0600_and_etcd_data_belongs_to_etcd(sandbox: Sandbox, etcd_member: bool) -> None:
    for path in (KUBELET_CONFIG, FLAGS, DROP_IN, STANDALONE):
        sandbox.put(path, "kind: Whatever\n", 0o644)
    # A data directory as kubeadm makes it (the machine's own, if any, hidden by the overlay's copy).
    setup = "rm -rf /var/lib/etcd && mkdir -p /var/lib/etcd/member && chown root:root /var/lib/etcd"
    setup += " && chmod 0755 /var/lib/etcd"
    script = node_files_script("dev-cp-1", etcd_member=etcd_member, version="1.37.2")
    # The guard itself says whether the node is done, inside the run (the sandbox hands files back to the test's
    # user afterwards, owners included).
    ran = sandbox.run(
        script.render() + "if files_hardened; then echo HARDENED; fi\nstat -c %U:%G:%a /var/lib/etcd\n", setup=setup
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "node-files done on dev-cp-1" in ran.stdout and "HARDENED" in ran.stdout
    for path in (KUBELET_CONFIG, FLAGS, DROP_IN):
        assert mode(sandbox, path) == 0o600, path
    if etcd_member:
        assert mode(sandbox, STANDALONE) == 0o600
        assert ran.stdout.strip().endswith("etcd:etcd:700")  # the user made by the script, or the machine's
    else:
        assert mode(sandbox, STANDALONE) == 0o644  # not a kubelet file of a node without etcd
        assert ran.stdout.strip().endswith("root:root:755")


def test_a_file_back_at_0644_after_an_upgrade_is_fixed_and_a_hardened_node_is_left_alone(sandbox: Sandbox) -> None:
    sandbox.put(KUBELET_CONFIG, "kind: Whatever\n", 0o600)
    script = node_files_script("dev-worker-1", etcd_member=False, version="1.37.2")
    again = sandbox.run(script.render())
    assert again.stdout == "kubeadm-ha: node-files already done on dev-worker-1; nothing to do\n", again.stderr
    sandbox.put(KUBELET_CONFIG, "kind: Rewritten\n", 0o644)  # what `kubeadm upgrade node` leaves
    fixed = sandbox.run(script.render())
    assert fixed.returncode == 0 and "node-files done" in fixed.stdout, fixed.stderr
    assert mode(sandbox, KUBELET_CONFIG) == 0o600
