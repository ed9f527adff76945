"""The systemd units a bundle node gets (render/artifact_units.py), read the way systemd reads them: found by the
real-cluster lab, where systemd logged "10-kubeadm.conf:7: Missing '=', ignoring line." three times."""

from __future__ import annotations

import pytest

from render.artifact_units import CONTAINERD_SERVICE, KUBEADM_DROP_IN, KUBELET_SERVICE


def _settings(text: str) -> list[str]:
    """Lines systemd takes as settings: a comment ends at its line's end (a trailing backslash continues only a
    setting), so every other non-empty, non-section line must be KEY=VALUE."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped[0] in "#;" or stripped.startswith("[")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return logical


@pytest.mark.parametrize(
    "unit", [KUBEADM_DROP_IN, KUBELET_SERVICE, CONTAINERD_SERVICE], ids=["drop-in", "kubelet", "containerd"]
)
def test_every_setting_line_has_an_equals_sign(unit: str) -> None:
    assert [line for line in _settings(unit) if "=" not in line] == []


def test_the_drop_in_sets_kubeadms_arguments() -> None:
    settings = _settings(KUBEADM_DROP_IN)
    assert (
        'Environment="KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf'
        ' --kubeconfig=/etc/kubernetes/kubelet.conf"' in settings
    )
    arguments = "$KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS"
    assert settings[-2:] == ["ExecStart=", f"ExecStart=/usr/bin/kubelet {arguments}"]
