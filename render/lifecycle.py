"""Day-2 scripts: installing, joining, removing and upgrading Kubernetes nodes.

Every script is safe to run again (its guard sees the work is done) and bounded
in time, so an interrupted `pulumi up` resumes by simply running again.

Which node a script runs on matters:
- on the node itself: package installation, `kubeadm reset`, `kubeadm upgrade` (this module);
- on a control plane other than the node ("admin node", holding admin.conf):
  bootstrap-token refresh, waiting for Ready, drain, uncordon, Node (and etcd member) deletion
  (render/admin_node.py);
- on the machine running Pulumi: the reset of a leaving node over SSH, which can tell a node that
  does not answer (gone: skipped) from one whose reset failed (this module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from model.config import KubernetesConfig
from model.versions import kubernetes_apt_version
from render.admin_node import ADMIN_KUBECONFIG
from render.artifacts import VERSION_PROBES
from render.node_prep import use_kubernetes_repository
from render.scripts import Script, command, logged, quote, remote_command

KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
KUBERNETES_PACKAGES = ("kubelet", "kubeadm", "kubectl")
KUBERNETES_KEYRING = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg"
KUBERNETES_SOURCES = "/etc/apt/sources.list.d/kubernetes.list"
_APT = (
    "env",
    "DEBIAN_FRONTEND=noninteractive",
    "apt-get",
    "-o",
    "DPkg::Lock::Timeout=600",
    "-o",
    "Dpkg::Options::=--force-confold",
    "--quiet",
    "--yes",
)
_CURL = ("curl", "--fail", "--silent", "--show-error", "--location", "--max-time", "60", "--retry", "5")


def _installed(package: str, version: str) -> str:
    return f"[ \"$(dpkg-query --show --showformat='${{Version}}' {quote(package)} 2>/dev/null)\" = {quote(version)} ]"


def _use_repository(kubernetes: KubernetesConfig) -> tuple[str, ...]:
    """The minor's repository, its signing key checked against the pinned fingerprint (as node preparation)."""
    return (
        # The script runs under umask 077; the keyring and sources must stay readable for apt's `_apt` user.
        "umask 022",
        *use_kubernetes_repository(kubernetes),
        "umask 077",
        logged("apt", *_APT, "update"),
    )


def _install(kubernetes: KubernetesConfig, packages: tuple[str, ...]) -> tuple[str, ...]:
    pinned = [f"{package}={kubernetes_apt_version(kubernetes.version)}" for package in packages]
    return (
        logged("apt", "apt-mark", "unhold", *packages),
        logged("apt", *_APT, "install", "--allow-downgrades", "--allow-change-held-packages", *pinned),
        logged("apt", "apt-mark", "hold", *packages),
    )


def kubernetes_packages_script(hostname: str, kubernetes: KubernetesConfig) -> Script:
    """First install of kubelet/kubeadm/kubectl at the cluster's version, pinned and held.

    Done once per node: later versions arrive only through the upgrade steps, in
    the order kubeadm requires, never because this step's text changed.
    """
    return Script(
        step="kubernetes-packages",
        host=hostname,
        # Installed, not merely known to dpkg (a removed package leaves its record behind).
        done_when="[ \"$(dpkg-query --show --showformat='${db:Status-Status}' kubeadm 2>/dev/null)\" = installed ]",
        body=(
            *_use_repository(kubernetes),
            *_install(kubernetes, KUBERNETES_PACKAGES),
            command("systemctl", "enable", "kubelet"),
        ),
    )


def reset_script(hostname: str) -> Script:
    """`kubeadm reset` on a leaving node: stops kubelet, removes its static pods (and its stacked etcd member)."""
    return Script(
        step="kubeadm-reset",
        host=hostname,
        done_when=f"[ ! -e {KUBELET_KUBECONFIG} ] && [ ! -e {ADMIN_KUBECONFIG} ]",
        body=(
            logged("kubeadm-reset", "timeout", "300", "kubeadm", "reset", "--force"),
            command("rm", "-rf", "/etc/cni/net.d"),
        ),
    )


# --- on the machine running Pulumi -----------------------------------------------------------------------


@dataclass(frozen=True)
class SshNode:
    """How the machine running Pulumi reaches a node: the pinned host key, never trust on first use."""

    hostname: str
    address: str
    user: str
    host_public_key: str
    port: int = 22

    @property
    def known_hosts_line(self) -> str:
        # OpenSSH looks up a non-default port as `[address]:port`.
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {self.host_public_key.strip()}\n"


# A node that does not answer within about a minute (sshd's port closed or silent) is taken for gone.
SSH_PROBE_ATTEMPTS = 6
SSH_PROBE_TIMEOUT_SECONDS = 5
SSH_PROBE_INTERVAL_SECONDS = 5


def _ssh_port_closed_function(node: SshNode) -> tuple[str, ...]:
    probe = f"</dev/tcp/{node.address}/{node.port}"
    gone = (
        f"kubeadm-ha: {node.hostname} does not answer on {node.address}:{node.port}; treating it as gone: "
        "kubeadm reset skipped (its Node, and a control plane's etcd member, are removed by the surviving "
        "control planes)"
    )
    return (
        "ssh_port_closed() {",
        "  local try",
        f"  for try in $(seq {SSH_PROBE_ATTEMPTS}); do",
        f"    if timeout {SSH_PROBE_TIMEOUT_SECONDS} bash -c {quote(probe)} 2>/dev/null; then return 1; fi",
        f'    if [ "$try" -lt {SSH_PROBE_ATTEMPTS} ]; then sleep {SSH_PROBE_INTERVAL_SECONDS}; fi',
        "  done",
        f"  echo {quote(gone)} >&2",
        "}",
    )


def reset_over_ssh_script(node: SshNode) -> Script:
    """`kubeadm reset` of a leaving node, run by the machine running Pulumi: skipped if the node is gone.

    A remote step's delete needs SSH to its node and fails when the node does not answer, so a dead
    node could never be removed or replaced. This script probes the node's SSH port (bounded) and, when
    nothing answers, treats the node as gone: a node that does not answer has nothing left to reset, and
    the steps around it (drain before, Node and etcd member removal after) run on the surviving control
    planes. A node that answers is reset as before, and a failed reset fails the step.

    The operator's private key arrives on stdin and lives in a private temporary directory for the
    duration of the ssh call only; the node's host key is pinned.
    """
    ssh = command(
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        "@KEY@",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "@KNOWN@",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
        "-p",
        node.port,
        f"{node.user}@{node.address}",
        remote_command(reset_script(node.hostname)),
    )
    ssh = ssh.replace("@KEY@", '"$dir/key"').replace("@KNOWN@", '"UserKnownHostsFile=$dir/known_hosts"')
    return Script(
        step="kubeadm-reset-over-ssh",
        host=node.hostname,
        done_when="ssh_port_closed",
        functions=_ssh_port_closed_function(node),
        on_node=False,
        body=(
            'dir="$(mktemp -d)"',
            "trap 'rm -rf \"$dir\"' EXIT",
            'cat >"$dir/key"',
            f"printf '%s' {quote(node.known_hosts_line)} >\"$dir/known_hosts\"",
            f"{ssh} </dev/null",
        ),
    )


# --- upgrades --------------------------------------------------------------------------------------------


def upgrade_node_script(
    hostname: str,
    kubernetes: KubernetesConfig,
    *,
    first_control_plane: bool,
    bundled: Mapping[str, str] | None = None,
) -> Script:
    """On the node: new kubeadm, `kubeadm upgrade apply` (first control plane) or `upgrade node`, new kubelet.

    With an artifact bundle (`bundled`: kubeadm, kubelet and kubectl in its verified copy on the node,
    render/artifacts.py) they come from there instead of apt, in the same order; the bundle step leaves an
    installed kubeadm, kubelet or kubectl of another version to this step."""
    upgrade = (
        logged("kubeadm-upgrade", "kubeadm", "upgrade", "apply", f"v{kubernetes.version}", "--yes")
        if first_control_plane
        else logged("kubeadm-upgrade", "kubeadm", "upgrade", "node")
    )
    if bundled is not None:
        return Script(
            step=f"kubeadm-upgrade-{kubernetes.version}",
            host=hostname,
            done_when=f"{_reports('kubelet', kubernetes.version)} && {_reports('kubeadm', kubernetes.version)}",
            body=(
                _from_bundle(bundled, "kubeadm"),
                upgrade,
                _from_bundle(bundled, "kubelet"),
                _from_bundle(bundled, "kubectl"),
                command("systemctl", "daemon-reload"),
                command("systemctl", "restart", "kubelet"),
            ),
        )
    version = kubernetes_apt_version(kubernetes.version)
    return Script(
        step=f"kubeadm-upgrade-{kubernetes.version}",
        host=hostname,
        done_when=f"{_installed('kubelet', version)} && {_installed('kubeadm', version)}",
        body=(
            *_use_repository(kubernetes),
            *_install(kubernetes, ("kubeadm",)),
            upgrade,
            *_install(kubernetes, ("kubelet", "kubectl")),
            command("systemctl", "daemon-reload"),
            command("systemctl", "restart", "kubelet"),
        ),
    )


def _reports(binary: str, version: str) -> str:
    """The installed binary at /usr/bin says it is `version`."""
    probe = VERSION_PROBES[binary].replace(binary, f"/usr/bin/{binary}", 1)
    return f"{probe} 2>/dev/null | grep -wF {quote('v' + version)} >/dev/null"


def _from_bundle(bundled: Mapping[str, str], binary: str) -> str:
    return command("install", "-m", "0755", bundled[binary], f"/usr/bin/{binary}")
