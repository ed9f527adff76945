"""A running node's kubelet moved to a serving certificate signed by the cluster CA (issue 20).

New nodes get `serverTLSBootstrap: true` from kubeadm (render/kubeadm.py's KubeletConfiguration, and the
`kubelet-config` ConfigMap every join reads). A node set up before that runs with a self-signed serving
certificate, which kube-apiserver's `--kubelet-certificate-authority` would refuse (logs, exec, port-forward):
this step sets the field in the kubelet's file and restarts it, so that it asks for a certificate (a
`kubernetes.io/kubelet-serving` CSR) that the program's approver (render/csr_approval.py) approves. It does
not wait for the approval: the approver's step, after every node's, does.
"""

from __future__ import annotations

from render.scripts import Script, quote
from render.scripts import command as shell

KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
FIELD = "serverTLSBootstrap: true"


def kubelet_serving_script(host: str) -> Script:
    return Script(
        step="kubelet-serving",
        host=host,
        done_when=f"grep -qx {quote(FIELD)} {quote(KUBELET_CONFIG)}",
        body=(
            # The file is kubeadm's YAML of a KubeletConfiguration, one top-level key per line.
            shell("sed", "-i", "/^serverTLSBootstrap:/d", KUBELET_CONFIG),
            f"printf '%s\\n' {quote(FIELD)} >>{quote(KUBELET_CONFIG)}",
            shell("chmod", "0600", KUBELET_CONFIG),
            shell("systemctl", "restart", "kubelet"),
            f"echo {quote(f'kubeadm-ha: kubelet on {host} asks for a serving certificate signed by the cluster CA')}",
        ),
    )
