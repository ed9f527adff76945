"""Day-2 scripts run on an admin node (a control plane other than the node they act upon, holding admin.conf):
bootstrap-token refresh, waiting for Ready, drain, uncordon, Node (and etcd member) deletion.

Like every day-2 script (render/lifecycle.py), each is safe to run again and bounded in time.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import KubernetesConfig
from render.kubeadm import CONFIG_DIR
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    STATE_DIR,
    Script,
    bounded_wait_function,
    command,
    quote,
    retry_function,
)

ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
TOKEN_CONFIG_PATH = f"{CONFIG_DIR}/bootstrap-token.yaml"
# Bounds on every wait: a node has 10 minutes to become Ready, a drain 5 minutes.
READY_TIMEOUT_SECONDS = 600
READY_POLL_SECONDS = 5
DRAIN_TIMEOUT = "300s"
# A token with less than this left is replaced before a join.
TOKEN_MIN_REMAINING_SECONDS = 2 * 3600
# Serialises token refreshes on an admin node; a refresh takes seconds, so a long wait means a stuck one.
TOKEN_LOCK = f"{STATE_DIR}/bootstrap-token.lock"
TOKEN_LOCK_WAIT_SECONDS = 300
# A loaded API server can drop a call (the cluster lab, 2 TCG cores: EOF from `kubeadm token create`). Bounded:
# at most this many attempts, this far apart, each bounded by kubeadm's own API timeouts.
TOKEN_ATTEMPTS = 5
TOKEN_RETRY_PAUSE_SECONDS = 5
# A drain skips pods deleted longer ago than this: a dead kubelet never confirms their deletion.
DRAIN_SKIP_WAIT_FOR_DELETE_SECONDS = 60

KUBECTL = ("kubectl", "--kubeconfig", ADMIN_KUBECONFIG)


# --- joining and leaving -------------------------------------------------------------------------------


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
        functions=(
            *_TOKEN_FUNCTIONS,
            *INSTALL_BUNDLE_FUNCTION,
            *retry_function(TOKEN_RETRY_PAUSE_SECONDS),
            # One attempt. Repeatable: a token an attempt made although its answer was lost is replaced.
            "refresh_token() {",
            '  if token_expiration "$1" >/dev/null; then',
            "    "
            + command("kubeadm", "token", "delete", "--kubeconfig", ADMIN_KUBECONFIG)
            + ' "$1" >/dev/null || return 1',
            "  fi",
            # `token create` prints the token: send stdout nowhere, keep errors (a secret output) visible.
            "  "
            + command("kubeadm", "token", "create", "--kubeconfig", ADMIN_KUBECONFIG, "--config", config)
            + " >/dev/null",
            "}",
        ),
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
            f"  kha_retry {TOKEN_ATTEMPTS} 'refreshing the bootstrap token' refresh_token {quote(token_id)}",
            "fi",
            command("rm", "-f", config),
        ),
    )


def _node_field(node: str, jsonpath: str) -> str:
    """A shell word: one field of the Node object, empty when the Node does not exist."""
    return f'"$({command(*KUBECTL, "get", "node", node, "--output", f"jsonpath={jsonpath}")} 2>/dev/null)"'


def _node_ready(node: str) -> str:
    return f"node_is_ready {quote(node)}"


def _wait_ready(node: str) -> tuple[str, ...]:
    """Poll (bounded) until the Node exists and reports Ready. A failed call is "not yet", not the step's end:
    a loaded API server behind the VIP answers some calls with EOF (the cluster lab, 2 TCG cores), and
    `kubectl wait` gives up on the first one. At the bound, what the API says of the node goes to stderr."""
    wait = f"kha_wait {READY_TIMEOUT_SECONDS} {quote(f'node {node} to be Ready')} node_is_ready {quote(node)}"
    return (f"{wait} || {{ {command(*KUBECTL, 'get', 'node', node)} >&2 || true; exit 1; }}",)


_GET_NODE = command(*KUBECTL, "get", "node")


def _node_test(name: str, jsonpath: str, expected: str) -> tuple[str, ...]:
    """The shell function `NAME NODE [VALUE]`: true when the Node's `jsonpath` prints `expected`; false as well
    when the call fails, so the guards and waits using it take a call the API dropped as "not yet"."""
    get = f'{_GET_NODE} "$1" --output {quote("jsonpath=" + jsonpath)} 2>/dev/null'
    return (f"{name}() {{", f'  [ "$({get})" = {expected} ]', "}")


_NODE_IS_READY = _node_test("node_is_ready", '{.status.conditions[?(@.type=="Ready")].status}', "True")
_KUBELET_IS_AT = _node_test("kubelet_is_at", "{.status.nodeInfo.kubeletVersion}", '"$2"')


def node_ready_script(target: Target) -> Script:
    """Wait (bounded) until the node reports Ready; the step other steps use as 'this node is in'."""
    return Script(
        step=f"wait-ready-{target.node}",
        host=target.admin,
        done_when=_node_ready(target.node),
        functions=(*bounded_wait_function(READY_POLL_SECONDS), *_NODE_IS_READY),
        body=_wait_ready(target.node),
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
        done_when=f"{' '.join(_kubelet_at(target.node, kubernetes))} || {{ [ -f {quote(marker)} ] && {cordoned}; }}",
        functions=(*_REPORT_BLOCKERS, *_KUBELET_IS_AT),
        body=(*_drain(target.node), command("touch", marker)),
    )


def _kubelet_at(node: str, kubernetes: KubernetesConfig) -> tuple[str, ...]:
    """The words of `kubelet_is_at NODE vVERSION`."""
    return ("kubelet_is_at", quote(node), quote("v" + kubernetes.version))


def uncordon_script(target: Target, kubernetes: KubernetesConfig) -> Script:
    """After an upgrade: wait until the node is Ready on the new version, then let pods back on."""
    schedulable = f"[ -z {_node_field(target.node, '{.spec.unschedulable}')} ]"
    kubelet_at = _kubelet_at(target.node, kubernetes)
    wanted = f"kubelet v{kubernetes.version}"
    return Script(
        step=f"upgrade-uncordon-{target.node}",
        host=target.admin,
        done_when=f"{' '.join(kubelet_at)} && {_node_ready(target.node)} && {schedulable}",
        functions=(*bounded_wait_function(READY_POLL_SECONDS), *_NODE_IS_READY, *_KUBELET_IS_AT),
        body=(
            " ".join(("kha_wait", str(READY_TIMEOUT_SECONDS), quote(f"{wanted} on {target.node}"), *kubelet_at)),
            *_wait_ready(target.node),
            command(*KUBECTL, "uncordon", target.node),
        ),
    )
