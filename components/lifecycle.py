"""Day-2 scripts: installing, joining, removing and upgrading Kubernetes nodes.

Every script is safe to run again (its guard sees the work is done) and bounded
in time, so an interrupted `pulumi up` resumes by simply running again.

Which node a script runs on matters:
- on the node itself: package installation, `kubeadm reset`, `kubeadm upgrade`;
- on a control plane other than the node ("admin node", holding admin.conf):
  bootstrap-token refresh, waiting for Ready, drain, uncordon, Node deletion.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import KubernetesConfig
from components.kubeadm import CONFIG_DIR
from components.scripts import INSTALL_BUNDLE_FUNCTION, STATE_DIR, Script, command, logged, quote

ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
KUBERNETES_PACKAGES = ("kubelet", "kubeadm", "kubectl")
KUBERNETES_KEYRING = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg"
KUBERNETES_SOURCES = "/etc/apt/sources.list.d/kubernetes.list"
TOKEN_CONFIG_PATH = f"{CONFIG_DIR}/bootstrap-token.yaml"
# Bounds on every wait: a node has 10 minutes to become Ready, a drain 5 minutes.
READY_TIMEOUT = "600s"
DRAIN_TIMEOUT = "300s"
# A token with less than this left is re-created before a join.
TOKEN_MIN_REMAINING_SECONDS = 2 * 3600

KUBECTL = ("kubectl", "--kubeconfig", ADMIN_KUBECONFIG)
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


def apt_version(kubernetes: KubernetesConfig) -> str:
    """pkgs.k8s.io's Debian version of a Kubernetes release."""
    return f"{kubernetes.version}-1.1"


def repository(kubernetes: KubernetesConfig) -> str:
    return f"https://pkgs.k8s.io/core:/stable:/v{kubernetes.minor}/deb/"


def _installed(package: str, version: str) -> str:
    return f"[ \"$(dpkg-query --show --showformat='${{Version}}' {quote(package)} 2>/dev/null)\" = {quote(version)} ]"


def _use_repository(kubernetes: KubernetesConfig) -> tuple[str, ...]:
    """Point apt at the minor's repository (each minor has its own; an upgrade moves to the next)."""
    source = f"deb [signed-by={KUBERNETES_KEYRING}] {repository(kubernetes)} /\n"
    fetch_key = command(*_CURL, f"{repository(kubernetes)}Release.key")
    dearmor = command("gpg", "--batch", "--yes", "--dearmor", "--output", KUBERNETES_KEYRING)
    return (
        # Under the script's umask 077 `mkdir` would make it 0700, unreadable for apt's `_apt` user.
        command("install", "-d", "-m", "0755", "/etc/apt/keyrings"),
        f"{fetch_key} | {dearmor}",
        "chmod 0644 " + quote(KUBERNETES_KEYRING),
        f"printf '%s' {quote(source)} >{quote(KUBERNETES_SOURCES)}",
        logged("apt", *_APT, "update"),
    )


def _install(kubernetes: KubernetesConfig, packages: tuple[str, ...]) -> tuple[str, ...]:
    pinned = [f"{package}={apt_version(kubernetes)}" for package in packages]
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


# --- on an admin node ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The node a step on the admin node acts upon."""

    admin: str
    node: str


_TOKEN_FRESH_FUNCTION = (
    "token_fresh() {",
    "  local expiration",
    (
        f'  expiration="$({command(*KUBECTL, "--namespace", "kube-system", "get", "secret")} '
        '"bootstrap-token-$1" --output "jsonpath={.data.expiration}" 2>/dev/null | base64 -d)" || return 1'
    ),
    '  [ -n "$expiration" ] || return 1',
    f'  [ "$(date -d "$expiration" +%s)" -gt "$(( $(date +%s) + {TOKEN_MIN_REMAINING_SECONDS} ))" ]',
    "}",
)


def join_token_script(target: Target, token_id: str) -> Script:
    """Re-create the cluster's bootstrap token if it is missing or about to expire, before `target.node` joins.

    `kubeadm token create --config` updates an existing token in place, so this is
    safe at any time; the token itself arrives on stdin (an InitConfiguration).
    """
    return Script(
        step=f"join-token-for-{target.node}",
        host=target.admin,
        done_when=f"token_fresh {quote(token_id)}",
        functions=(*_TOKEN_FRESH_FUNCTION, *INSTALL_BUNDLE_FUNCTION),
        body=(
            # The file holds the token: remove it however the step ends.
            f"trap {quote(command('rm', '-f', TOKEN_CONFIG_PATH))} EXIT",
            "install_bundle",
            # `token create` prints the token: send stdout nowhere, keep errors (a secret output) visible.
            command("kubeadm", "token", "create", "--kubeconfig", ADMIN_KUBECONFIG, "--config", TOKEN_CONFIG_PATH)
            + " >/dev/null",
            command("rm", "-f", TOKEN_CONFIG_PATH),
        ),
    )


def _node_field(node: str, jsonpath: str) -> str:
    """A shell word: one field of the Node object, empty when the Node does not exist."""
    return f'"$({command(*KUBECTL, "get", "node", node, "--output", f"jsonpath={jsonpath}")} 2>/dev/null)"'


def _node_ready(node: str) -> str:
    ready = _node_field(node, '{.status.conditions[?(@.type=="Ready")].status}')
    return f"[ {ready} = True ]"


def node_ready_script(target: Target) -> Script:
    """Wait (bounded) until the node reports Ready; the step other steps use as 'this node is in'."""
    return Script(
        step=f"wait-ready-{target.node}",
        host=target.admin,
        done_when=_node_ready(target.node),
        body=(
            # kubelet registers the Node shortly after join; wait for the object, then for Ready.
            f"timeout {READY_TIMEOUT[:-1]} bash -c "
            + quote(f"until {command(*KUBECTL, 'get', 'node', target.node)} >/dev/null 2>&1; do sleep 5; done"),
            command(*KUBECTL, "wait", "--for=condition=Ready", f"node/{target.node}", f"--timeout={READY_TIMEOUT}"),
        ),
    )


_LIST_PODS = command(*KUBECTL, "get", "pods", "--all-namespaces", "--output", "wide")
_REPORT_BLOCKERS = (
    "report_blockers() {",
    '  echo "kubeadm-ha: draining $1 did not finish within the timeout; pods still on it:" >&2',
    f'  {_LIST_PODS} --field-selector "spec.nodeName=$1" >&2 || true',
    "}",
)


def _drain(node: str) -> tuple[str, ...]:
    drain = command(
        *KUBECTL, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", f"--timeout={DRAIN_TIMEOUT}"
    )
    return (
        command(*KUBECTL, "cordon", node),
        f'{drain} >>"$KUBEADM_HA_LOG_DIR/drain.log" 2>&1 || {{ report_blockers {quote(node)}; exit 1; }}',
    )


def _node_absent(node: str) -> str:
    return f"! {command(*KUBECTL, 'get', 'node', node)} >/dev/null 2>&1"


def _cordoned(node: str) -> str:
    return f"[ {_node_field(node, '{.spec.unschedulable}')} = true ]"


def drain_node_script(target: Target) -> Script:
    """Before a node leaves: cordon and drain it (the Node object goes only after `kubeadm reset`).

    A drain that cannot finish fails the step, naming the node and the pods still on it; the node
    then keeps everything, because Pulumi deletes nothing a failed delete still depends on.
    """
    marker = f"{STATE_DIR}/drained-{target.node}"
    return Script(
        step=f"drain-{target.node}",
        host=target.admin,
        done_when=f"{_node_absent(target.node)} || {{ [ -f {quote(marker)} ] && {_cordoned(target.node)}; }}",
        functions=_REPORT_BLOCKERS,
        body=(*_drain(target.node), command("touch", marker)),
    )


def delete_node_script(target: Target) -> Script:
    """After `kubeadm reset` stopped its kubelet (which would re-register it): delete the Node object."""
    return Script(
        step=f"delete-node-{target.node}",
        host=target.admin,
        done_when=_node_absent(target.node),
        body=(
            command(*KUBECTL, "delete", "node", target.node, "--timeout=120s"),
            command("rm", "-f", f"{STATE_DIR}/drained-{target.node}"),
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


# --- upgrades --------------------------------------------------------------------------------------------


def drain_for_upgrade_script(target: Target, kubernetes: KubernetesConfig) -> Script:
    """Before a node's kubelet is upgraded: cordon and drain it.

    Done once its kubelet runs the new version, or once a drain for this version has finished
    (a marker on the admin node) and the node is still cordoned.
    """
    marker = f"{STATE_DIR}/upgrade-drained-{target.node}-{kubernetes.version}"
    cordoned = _cordoned(target.node)
    return Script(
        step=f"upgrade-drain-{target.node}",
        host=target.admin,
        done_when=f"{_kubelet_at(target.node, kubernetes)} || {{ [ -f {quote(marker)} ] && {cordoned}; }}",
        functions=_REPORT_BLOCKERS,
        body=(*_drain(target.node), command("touch", marker)),
    )


def _kubelet_at(node: str, kubernetes: KubernetesConfig) -> str:
    return f"[ {_node_field(node, '{.status.nodeInfo.kubeletVersion}')} = {quote('v' + kubernetes.version)} ]"


def upgrade_node_script(hostname: str, kubernetes: KubernetesConfig, *, first_control_plane: bool) -> Script:
    """On the node: new kubeadm, `kubeadm upgrade apply` (first control plane) or `upgrade node`, new kubelet."""
    version = apt_version(kubernetes)
    upgrade = (
        logged("kubeadm-upgrade", "kubeadm", "upgrade", "apply", f"v{kubernetes.version}", "--yes")
        if first_control_plane
        else logged("kubeadm-upgrade", "kubeadm", "upgrade", "node")
    )
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


def uncordon_script(target: Target, kubernetes: KubernetesConfig) -> Script:
    """After an upgrade: wait until the node is Ready on the new version, then let pods back on."""
    schedulable = f"[ -z {_node_field(target.node, '{.spec.unschedulable}')} ]"
    return Script(
        step=f"upgrade-uncordon-{target.node}",
        host=target.admin,
        done_when=f"{_kubelet_at(target.node, kubernetes)} && {_node_ready(target.node)} && {schedulable}",
        body=(
            f"timeout {READY_TIMEOUT[:-1]} bash -c "
            + quote(f"until {_kubelet_at(target.node, kubernetes)}; do sleep 5; done"),
            command(*KUBECTL, "wait", "--for=condition=Ready", f"node/{target.node}", f"--timeout={READY_TIMEOUT}"),
            command(*KUBECTL, "uncordon", target.node),
        ),
    )
