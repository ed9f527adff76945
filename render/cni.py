"""The pod network add-on, applied once from the first control plane after `kubeadm init`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.versions import CALICO_SHA256, CALICO_VERSION, FLANNEL_SHA256, FLANNEL_VERSION
from render.scripts import (
    STATE_DIR,
    Script,
    command,
    copy_verified,
    download_verified,
    https_fetch,
    logged,
    quote,
    retry_function,
)

ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
# A manifest is larger than a key: a longer bound per attempt.
_CURL = https_fetch(120)
# The apply runs right after `kubeadm init`, while the first API server may still restart or stall: lab run 21's
# failed on one attempt with TLS handshake timeouts, then 403s from the restarted server whose RBAC cache had not
# synced. `kubectl apply` is safe to repeat. Each attempt is bounded by kubectl's request timeout; together the
# attempts outlast a restart (kube-apiserver took 57 s to be healthy after `kubeadm init` there).
APPLY_ATTEMPTS = 10
APPLY_PAUSE_SECONDS = 15
APPLY_REQUEST_TIMEOUT = "60s"


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
    # SHA-256 of the file at `url`; the step refuses any other bytes.
    sha256: str


def _calico_edits(cidr: str) -> tuple[LineEdit, ...]:
    # calico.yaml ships CALICO_IPV4POOL_CIDR commented out; enable it with our pod subnet.
    return (
        LineEdit("# - name: CALICO_IPV4POOL_CIDR", "- name: CALICO_IPV4POOL_CIDR"),
        LineEdit('#   value: "192.168.0.0/16"', f'  value: "{cidr}"'),
    )


def _flannel_edits(cidr: str) -> tuple[LineEdit, ...]:
    return (LineEdit('"Network": "10.244.0.0/16"', f'"Network": "{cidr}"'),)


def manifest_for(cni: str, pod_subnet: str) -> CniManifest | None:
    if cni == "calico":
        return CniManifest(
            "calico",
            f"https://raw.githubusercontent.com/projectcalico/calico/{CALICO_VERSION}/manifests/calico.yaml",
            "kube-system",
            "calico-node",
            _calico_edits(pod_subnet),
            CALICO_SHA256,
        )
    if cni == "flannel":
        return CniManifest(
            "flannel",
            f"https://raw.githubusercontent.com/flannel-io/flannel/{FLANNEL_VERSION}/Documentation/kube-flannel.yml",
            "kube-flannel",
            "kube-flannel-ds",
            _flannel_edits(pod_subnet),
            FLANNEL_SHA256,
        )
    return None


def cni_script(hostname: str, manifest: CniManifest, pod_subnet: str, *, from_file: str | None = None) -> Script:
    """Apply the CNI's manifest, downloaded, or with an artifact bundle copied from `from_file` (the bundle's
    verified copy on the node, render/artifacts.py); either way only the pinned bytes are applied."""
    path = f"{STATE_DIR}/cni-{manifest.name}.yaml"
    fetched = (
        download_verified(_CURL, manifest.url, path, manifest.sha256)
        if from_file is None
        else copy_verified(from_file, path, manifest.sha256)
    )
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
    apply = logged(
        f"cni-{manifest.name}", *kubectl, f"--request-timeout={APPLY_REQUEST_TIMEOUT}", "apply", "--filename", path
    )
    return Script(
        step=f"cni-{manifest.name}",
        host=hostname,
        done_when=command(*kubectl, "--namespace", manifest.namespace, "get", "daemonset", manifest.daemonset)
        + " >/dev/null 2>&1",
        functions=retry_function(APPLY_PAUSE_SECONDS),
        body=(
            *fetched,
            *expected,
            command("sed", "-i", *sed_args, path),
            *landed,
            f"kha_retry {APPLY_ATTEMPTS} {quote(f'applying the {manifest.name} manifest')} {apply}",
        ),
    )


def _require_in_file(needle: str, path: str, message: str) -> str:
    return f"grep -qF -e {quote(needle)} {quote(path)} || {{ echo {quote(message)} >&2; exit 1; }}"
