"""render/kubelet_serving.py under real bash, sed and grep in the mount-namespace sandbox (tests/sandbox.py), with a
stand-in `systemctl` (no systemd in the sandbox) that records the restart: a kubelet file kubeadm wrote before
serverTLSBootstrap gets the field (whatever it said before) and the kubelet is restarted; a file that has it is left
alone, and so is the kubelet."""

from __future__ import annotations

from pathlib import Path

import pytest

from render.kubelet_serving import KUBELET_CONFIG, kubelet_serving_script
from tests.sandbox import Sandbox

BEFORE = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: systemd\n"


@pytest.fixture
def sandbox(sandbox_support: None, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, {"systemctl": "exit 0"})


@pytest.mark.parametrize("had", ["", "serverTLSBootstrap: false\n"])
def test_an_old_kubelet_asks_for_a_serving_certificate(sandbox: Sandbox, had: str) -> None:
    sandbox.put(KUBELET_CONFIG, BEFORE + had, 0o644)
    script = kubelet_serving_script("dev-worker-1")
    calls = sandbox.run_first(script)
    assert calls == [["systemctl", "restart", "kubelet"]]
    text = sandbox.file(KUBELET_CONFIG).read_text()
    assert text == BEFORE + "serverTLSBootstrap: true\n"
    sandbox.run_again(script, read_only=lambda call: False)  # no call at all: the kubelet is not restarted again


def test_a_kubelet_kubeadm_set_up_with_it_is_left_alone(sandbox: Sandbox) -> None:
    sandbox.put(KUBELET_CONFIG, BEFORE + "serverTLSBootstrap: true\n", 0o600)
    sandbox.run_again(kubelet_serving_script("dev-cp-1"), read_only=lambda call: False)
