"""Day-2 scripts: installing, joining, removing and upgrading Kubernetes nodes.

Every script is safe to run again (its guard sees the work is done) and bounded
in time, so an interrupted `pulumi up` resumes by simply running again.

Which node a script runs on matters:
- on the node itself: package installation, `kubeadm reset`, `kubeadm upgrade`;
- on a control plane other than the node ("admin node", holding admin.conf):
  bootstrap-token refresh, waiting for Ready, drain, uncordon, Node (and etcd member) deletion;
- on the machine running Pulumi: the reset of a leaving node over SSH, which can tell a node that
  does not answer (gone: skipped) from one whose reset failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import KubernetesConfig
from render.kubeadm import CONFIG_DIR
from render.node_prep import use_kubernetes_repository
from render.scripts import INSTALL_BUNDLE_FUNCTION, STATE_DIR, Script, command, logged, quote, remote_command

ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
KUBERNETES_PACKAGES = ("kubelet", "kubeadm", "kubectl")
KUBERNETES_KEYRING = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg"
KUBERNETES_SOURCES = "/etc/apt/sources.list.d/kubernetes.list"
TOKEN_CONFIG_PATH = f"{CONFIG_DIR}/bootstrap-token.yaml"
# Bounds on every wait: a node has 10 minutes to become Ready, a drain 5 minutes.
READY_TIMEOUT = "600s"
DRAIN_TIMEOUT = "300s"
# A token with less than this left is replaced before a join.
TOKEN_MIN_REMAINING_SECONDS = 2 * 3600
# Serialises token refreshes on an admin node; a refresh takes seconds, so a long wait means a stuck one.
TOKEN_LOCK = f"{STATE_DIR}/bootstrap-token.lock"
TOKEN_LOCK_WAIT_SECONDS = 300
# A drain skips pods deleted longer ago than this: a dead kubelet never confirms their deletion.
DRAIN_SKIP_WAIT_FOR_DELETE_SECONDS = 60

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
    """The minor's repository, its signing key checked against the pinned fingerprint (as node preparation)."""
    return (
        # The script runs under umask 077; the keyring and sources must stay readable for apt's `_apt` user.
        "umask 022",
        *use_kubernetes_repository(kubernetes),
        "umask 077",
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


_TOKEN_FUNCTIONS = (
    # Prints the token's expiration; fails when its Secret does not exist.
    "token_expiration() {",
    (
        f"  {command(*KUBECTL, '--namespace', 'kube-system', 'get', 'secret')} "
        '"bootstrap-token-$1" --output "jsonpath={.data.expiration}" 2>/dev/null | base64 -d'
    ),
    "}",
    "token_fresh() {",
    "  local expiration",
    '  expiration="$(token_expiration "$1")" || return 1',
    '  [ -n "$expiration" ] || return 1',
    f'  [ "$(date -d "$expiration" +%s)" -gt "$(( $(date +%s) + {TOKEN_MIN_REMAINING_SECONDS} ))" ]',
    "}",
)


def join_token_script(target: Target, token_id: str) -> Script:
    """Replace the cluster's bootstrap token if it is missing or about to expire, before `target.node` joins.

    Safe at any token age and from many steps at once (workers join in parallel, each with its own
    step on the same admin node):
    - `kubeadm token create` refuses an id whose Secret exists (it creates with failIfExists, unlike
      `kubeadm init`), so a stale token is deleted first, then created again with the same id and secret;
    - a lock on the admin node serialises the refresh, and the freshness check is repeated once it is
      held, so only the first of several concurrent steps replaces the token;
    - the token arrives on stdin (an InitConfiguration); the file holding it is written and removed
      under the lock, so a concurrent step never removes the file another one is about to read.
    """
    config = TOKEN_CONFIG_PATH
    return Script(
        step=f"join-token-for-{target.node}",
        host=target.admin,
        done_when=f"token_fresh {quote(token_id)}",
        functions=(*_TOKEN_FUNCTIONS, *INSTALL_BUNDLE_FUNCTION),
        body=(
            f"exec 9>>{quote(TOKEN_LOCK)}",
            f"flock --wait {TOKEN_LOCK_WAIT_SECONDS} 9 || {{ echo "
            + quote(f"kubeadm-ha: another bootstrap-token refresh held {TOKEN_LOCK} for {TOKEN_LOCK_WAIT_SECONDS} s")
            + " >&2; exit 1; }",
            # The file holds the token: remove it however the step ends (while the lock is still held).
            f"trap {quote(command('rm', '-f', config))} EXIT",
            f"if token_fresh {quote(token_id)}; then",
            '  echo "kubeadm-ha: another step refreshed the bootstrap token on ${KUBEADM_HA_HOST} meanwhile"',
            "else",
            "  install_bundle",
            f"  if token_expiration {quote(token_id)} >/dev/null; then",
            "    " + command("kubeadm", "token", "delete", "--kubeconfig", ADMIN_KUBECONFIG, token_id) + " >/dev/null",
            "  fi",
            # `token create` prints the token: send stdout nowhere, keep errors (a secret output) visible.
            "  "
            + command("kubeadm", "token", "create", "--kubeconfig", ADMIN_KUBECONFIG, "--config", config)
            + " >/dev/null",
            "fi",
            command("rm", "-f", config),
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
        *KUBECTL,
        "drain",
        node,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        f"--skip-wait-for-delete-timeout={DRAIN_SKIP_WAIT_FOR_DELETE_SECONDS}",
        f"--timeout={DRAIN_TIMEOUT}",
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


_ETCD_PKI = "/etc/kubernetes/pki/etcd"


def _etcdctl(admin: str, *words: str) -> str:
    """etcdctl in the admin node's own stacked etcd pod (the node has no etcdctl; the image does)."""
    exec_etcdctl = command(
        *KUBECTL,
        "--namespace",
        "kube-system",
        "exec",
        f"etcd-{admin}",
        "--",
        "etcdctl",
        "--endpoints=https://127.0.0.1:2379",
        f"--cacert={_ETCD_PKI}/ca.crt",
        f"--cert={_ETCD_PKI}/healthcheck-client.crt",
        f"--key={_ETCD_PKI}/healthcheck-client.key",
        "--command-timeout=30s",
        *words,
    )
    return f"timeout 60 {exec_etcdctl}"


def _etcd_member_function(admin: str) -> tuple[str, ...]:
    """`etcd_member_of NAME` prints NAME's member id (nothing when it is no member) and fails when etcd cannot
    be asked: an unanswered question must not pass for "no member"."""
    listing = _etcdctl(admin, "member", "list", "--write-out=simple")
    return (
        "etcd_member_of() {",
        "  local members",
        f'  members="$({listing})" || return 1',
        "  printf '%s\\n' \"$members\" | awk -F ', ' -v name=\"$1\" '$3 == name { print $1 }'",
        "}",
    )


def delete_node_script(target: Target, *, etcd_member: bool = False) -> Script:
    """After `kubeadm reset` stopped its kubelet (which would re-register it): delete the Node object.

    With `etcd_member` (a stacked-etcd control plane) its etcd member is removed too, if still there: a
    node's own `kubeadm reset` removes it, but a dead node's reset is skipped, and the survivors must not
    keep counting a member that will never answer.
    """
    node = target.node
    # --ignore-not-found: a re-run after the Node went but the member removal failed must reach the latter.
    delete = command(*KUBECTL, "delete", "node", node, "--ignore-not-found", "--timeout=120s")
    functions: tuple[str, ...] = ()
    done_when = _node_absent(node)
    body: tuple[str, ...] = (delete,)
    if etcd_member:
        functions = _etcd_member_function(target.admin)
        done_when += f' && member="$(etcd_member_of {quote(node)})" && [ -z "$member" ]'
        body = (
            delete,
            f'member="$(etcd_member_of {quote(node)})"',
            'if [ -n "$member" ]; then',
            f'  {_etcdctl(target.admin, "member", "remove")} "$member"',
            "fi",
        )
    return Script(
        step=f"delete-node-{node}",
        host=target.admin,
        done_when=done_when,
        functions=functions,
        body=(*body, command("rm", "-f", f"{STATE_DIR}/drained-{node}")),
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
