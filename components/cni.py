"""The pod network add-on, applied once from the first control plane after `kubeadm init`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from components.scripts import STATE_DIR, Script, command, logged, quote

ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"


@dataclass(frozen=True)
class LineEdit:
    """Replace the literal text `before` (which the upstream manifest must contain) with `after`."""

    before: str
    after: str

    def sed_expression(self) -> str:
        before = re.sub(r"([\\.*\[\]^$|])", r"\\\1", self.before)
        after = re.sub(r"([\\&|])", r"\\\1", self.after)
        return f"s|{before}|{after}|"


@dataclass(frozen=True)
class CniManifest:
    name: str
    url: str
    namespace: str
    daemonset: str
    # How to set the pod CIDR: the manifests ship a fixed default.
    cidr_edits: tuple[LineEdit, ...]


def _calico_edits(cidr: str) -> tuple[LineEdit, ...]:
    # calico.yaml ships CALICO_IPV4POOL_CIDR commented out; enable it with our pod subnet.
    return (
        LineEdit("# - name: CALICO_IPV4POOL_CIDR", "- name: CALICO_IPV4POOL_CIDR"),
        LineEdit('#   value: "192.168.0.0/16"', f'  value: "{cidr}"'),
    )


def _flannel_edits(cidr: str) -> tuple[LineEdit, ...]:
    return (LineEdit('"Network": "10.244.0.0/16"', f'"Network": "{cidr}"'),)


CALICO_VERSION = "v3.29.1"
FLANNEL_VERSION = "v0.26.1"


def manifest_for(cni: str, pod_subnet: str) -> CniManifest | None:
    if cni == "calico":
        return CniManifest(
            "calico",
            f"https://raw.githubusercontent.com/projectcalico/calico/{CALICO_VERSION}/manifests/calico.yaml",
            "kube-system",
            "calico-node",
            _calico_edits(pod_subnet),
        )
    if cni == "flannel":
        return CniManifest(
            "flannel",
            f"https://github.com/flannel-io/flannel/releases/download/{FLANNEL_VERSION}/kube-flannel.yml",
            "kube-flannel",
            "kube-flannel-ds",
            _flannel_edits(pod_subnet),
        )
    return None


def cni_script(hostname: str, manifest: CniManifest, pod_subnet: str) -> Script:
    path = f"{STATE_DIR}/cni-{manifest.name}.yaml"
    kubectl = ("kubectl", "--kubeconfig", ADMIN_KUBECONFIG)
    sed_args: list[str] = []
    for edit in manifest.cidr_edits:
        sed_args += ["-e", edit.sed_expression()]
    refusal = f"kubeadm-ha: {manifest.name} manifest did not take pod subnet {pod_subnet}"
    # A manifest whose defaults moved would silently keep its own CIDR: every edit must find its line and land.
    expected = [
        _require_in_file(edit.before, path, f"{refusal}: no line {edit.before!r}") for edit in manifest.cidr_edits
    ]
    landed = [_require_in_file(edit.after, path, f"{refusal}: no line {edit.after!r}") for edit in manifest.cidr_edits]
    return Script(
        step=f"cni-{manifest.name}",
        host=hostname,
        done_when=command(*kubectl, "--namespace", manifest.namespace, "get", "daemonset", manifest.daemonset)
        + " >/dev/null 2>&1",
        body=(
            command(
                "curl",
                "--fail",
                "--silent",
                "--show-error",
                "--location",
                "--max-time",
                "120",
                "--retry",
                "5",
                "--retry-delay",
                "5",
                "--output",
                path,
                manifest.url,
            ),
            *expected,
            command("sed", "-i", *sed_args, path),
            *landed,
            logged(f"cni-{manifest.name}", *kubectl, "apply", "--filename", path),
        ),
    )


def _require_in_file(needle: str, path: str, message: str) -> str:
    return f"grep -qF -e {quote(needle)} {quote(path)} || {{ echo {quote(message)} >&2; exit 1; }}"
