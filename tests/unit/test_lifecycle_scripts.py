"""Day-2 scripts (render/lifecycle.py, render/admin_node.py), run unmodified with bash as root in the sandbox
(tests/sandbox.py).

The node's /etc and /var are overlays in the test's temp dir; `kubeadm`, `kubectl`, `systemctl`, `apt-get`,
`apt-mark`, `dpkg-query`, `curl` and `gpg` are stubs that record every call and keep just enough state in
files under the sandbox's `state/` directory to behave like the real programs for these scripts:

* the cluster: `nodes/<name>/` (exists while the Node does) with `kubeletVersion`, `ready`,
  `unschedulable`, `pods` (what `get pods --field-selector spec.nodeName=<name>` lists),
  `drain-blocked` (drain fails); `api-eof`
  (the numbers of the kubectl calls that get EOF, as from a loaded API server behind the VIP);
  `secrets/bootstrap-token-<id>/expiration`; `cluster-version` (what `kubeadm upgrade apply` set);
* the packages: `packages/<name>` (installed version), `holds/<name>`, `apt-lists` (the repositories
  the last `apt-get update` read, only from a sources file whose keyring apt's `_apt` user can read
  and that holds that repository's Release.key, as fetched by curl and dearmored by gpg);
* the kubelet: `systemctl restart kubelet` makes `nodes/$STUB_NODE/kubeletVersion` the installed one.

The stubs refuse what the real programs refuse, so order matters: `apt-get install` of a version whose
minor repository was not fetched, or of a held package without `--allow-change-held-packages`, fails;
`kubeadm upgrade apply vX` fails unless kubeadm X is installed; `kubeadm upgrade node` fails unless the
installed kubeadm matches the cluster's version; `kubectl` fails without a readable kubeconfig; anything
unexpected exits 2.

For every script: the first run makes exactly the expected calls in order; a second run prints
"already done", makes only read-only calls (its guard) and changes no file (upper layers and state).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from model.config import KubernetesConfig
from render import admin_node, lifecycle
from render.admin_node import (
    ADMIN_KUBECONFIG,
    TOKEN_ATTEMPTS,
    TOKEN_CONFIG_PATH,
    TOKEN_RETRY_PAUSE_SECONDS,
    Target,
    delete_node_script,
    drain_for_upgrade_script,
    drain_node_script,
    join_token_script,
    node_ready_script,
    uncordon_script,
)
from render.kubeadm import token_documents
from render.lifecycle import (
    KUBELET_KUBECONFIG,
    KUBERNETES_KEYRING,
    KUBERNETES_SOURCES,
    SshNode,
    kubernetes_packages_script,
    reset_over_ssh_script,
    reset_script,
    upgrade_node_script,
)
from render.node_prep import CURL as NODE_PREP_CURL
from render.node_prep import KUBERNETES_KEY_FINGERPRINT
from render.scripts import BundleFile, Script, encode_bundle
from tests.sandbox import RECORD_ONLY, Sandbox, Stub, unavailable

CURRENT = KubernetesConfig(version="1.34.2")
NEXT = KubernetesConfig(version="1.35.0")
ADMIN = "dev-cp-1"
NODE = "dev-worker-2"
TARGET = Target(admin=ADMIN, node=NODE)
TOKEN_ID = "abcdef"
TOKEN = f"{TOKEN_ID}.0123456789abcdef"
# What the program sends: kubeadm reads it with `token create --config`.
TOKEN_CONFIG = token_documents(TOKEN, CURRENT.version)
PODS = "default  web-7d4b9c-x2x9q  1/1  Running  0  5m  10.244.1.5  dev-worker-2\n"

K = ["kubectl", "--kubeconfig", ADMIN_KUBECONFIG]
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-o", "Dpkg::Options::=--force-confold", "--quiet", "--yes"]
DOWNLOADED_KEY = "/var/lib/kubeadm-ha/kubernetes-release.key"


def key_calls(repository: str) -> list[list[str]]:
    """Fetch the Release.key, check its fingerprint, dearmor it: as node preparation does."""
    partial = DOWNLOADED_KEY + ".download"
    return [
        [*NODE_PREP_CURL, "--output", partial, f"{repository}Release.key"],
        ["gpg", "--batch", "--no-default-keyring", "--with-colons", "--show-keys", partial],
        ["gpg", "--batch", "--yes", "--dearmor", "--output", KUBERNETES_KEYRING + ".tmp", DOWNLOADED_KEY],
    ]


INSTALL = [*APT, "install", "--allow-downgrades", "--allow-change-held-packages"]
VERSION_OF = "--showformat=${Version}"
KUBEADM_INSTALLED = ["dpkg-query", "--show", "--showformat=${db:Status-Status}", "kubeadm"]
READY = 'jsonpath={.status.conditions[?(@.type=="Ready")].status}'
KUBELET_VERSION = "jsonpath={.status.nodeInfo.kubeletVersion}"
UNSCHEDULABLE = "jsonpath={.spec.unschedulable}"
RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


# ---------------------------------------------------------------- stubs

_KUBECTL = r"""
kubeconfig="$(opt --kubeconfig "$@")" || { echo "stub kubectl: no --kubeconfig" >&2; exit 2; }
[ -r "$kubeconfig" ] || { echo "error: stat $kubeconfig: no such file or directory" >&2; exit 1; }
# A loaded API server behind the VIP: the calls whose numbers `api-eof` lists get EOF (counted only then).
if [ -e "$STATE/api-eof" ]; then
  calls=$(( $(cat "$STATE/kubectl-calls" 2>/dev/null || echo 0) + 1 ))
  printf '%s' "$calls" >"$STATE/kubectl-calls"
  if grep -qx "$calls" "$STATE/api-eof"; then echo "Unable to connect to the server: EOF" >&2; exit 1; fi
fi
namespace=default
words=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --kubeconfig) shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    *) words+=("$1"); shift ;;
  esac
done
set -- "${words[@]}"
node_dir() {
  dir="$STATE/nodes/$1"
  [ -d "$dir" ] || { echo "Error from server (NotFound): nodes \"$1\" not found" >&2; exit 1; }
}
case "$1 ${2-}" in
  "get node")
    node_dir "$3"
    output="$(opt --output "$@" || true)"
    case "$output" in
      "") printf 'NAME STATUS\n%s %s\n' "$3" "$(cat "$dir/ready")" ;;
      "jsonpath={.status.nodeInfo.kubeletVersion}") cat "$dir/kubeletVersion" ;;
      'jsonpath={.status.conditions[?(@.type=="Ready")].status}') cat "$dir/ready" ;;
      "jsonpath={.spec.unschedulable}") if [ -e "$dir/unschedulable" ]; then printf true; fi ;;
      *) echo "stub kubectl: unexpected --output $output" >&2; exit 2 ;;
    esac ;;
  "get secret")
    [ "$namespace" = kube-system ] || { echo "stub kubectl: secret outside kube-system" >&2; exit 2; }
    [ "$(opt --output "$@")" = "jsonpath={.data.expiration}" ] || exit 2
    file="$STATE/secrets/$3/expiration"
    [ -f "$file" ] || { echo "Error from server (NotFound): secrets \"$3\" not found" >&2; exit 1; }
    printf '%s' "$(cat "$file")" | base64 -w0 ;;
  "get pods")
    has --all-namespaces "$@" || exit 2
    selector="$(opt --field-selector "$@")"
    echo "NAMESPACE  NAME  READY  STATUS  RESTARTS  AGE  IP  NODE"
    cat "$STATE/nodes/${selector#spec.nodeName=}/pods" 2>/dev/null || true ;;
  "cordon "*) node_dir "$2"; touch "$dir/unschedulable"; echo "node/$2 cordoned" ;;
  "uncordon "*) node_dir "$2"; rm -f "$dir/unschedulable"; echo "node/$2 uncordoned" ;;
  "drain "*)
    node_dir "$2"
    touch "$dir/unschedulable"
    # A dead kubelet never confirms a pod's deletion: the drain waits for it unless told to skip such pods.
    if [ -e "$dir/dead" ] && [ -s "$dir/pods" ] && [[ " $* " != *" --skip-wait-for-delete-timeout="[1-9]* ]]; then
      echo "error: unable to drain node \"$2\" due to error: global timeout reached: 5m0s" >&2
      exit 1
    fi
    if [ -e "$dir/drain-blocked" ]; then
      echo "error: unable to drain node \"$2\" due to error: global timeout reached: 5m0s" >&2
      exit 1
    fi
    rm -f "$dir/pods"
    echo "node/$2 drained" ;;
  "delete node")
    if [ ! -d "$STATE/nodes/$3" ] && has --ignore-not-found "$@"; then exit 0; fi
    node_dir "$3"; rm -rf "$dir"; echo "node \"$3\" deleted" ;;
  "exec etcd-"*)
    # etcdctl in the admin node's etcd pod: `members/<name>` holds each member's id.
    [ "$namespace" = kube-system ] || exit 2
    [ "$3" = -- ] && [ "$4" = etcdctl ] || { echo "stub kubectl: exec without -- etcdctl" >&2; exit 2; }
    has --cacert=/etc/kubernetes/pki/etcd/ca.crt "$@" || exit 2
    case "${*: -3}" in
      "member list --write-out=simple")
        for member in "$STATE"/members/*; do
          [ -e "$member" ] || continue
          printf '%s, started, %s, https://x:2380, https://x:2379, false\n' "$(cat "$member")" "${member##*/}"
        done ;;
      *)
        [ "${*: -3:2}" = "member remove" ] || { echo "stub etcdctl: unexpected call: $*" >&2; exit 2; }
        id="${*: -1}"
        found="$(grep -lxF "$id" "$STATE"/members/* 2>/dev/null)" \
          || { echo "Error: etcdserver: member not found" >&2; exit 1; }
        rm -f "$found"
        echo "Member $id removed from cluster" ;;
    esac ;;
  *) echo "stub kubectl: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_KUBEADM = r"""
installed() { local version; version="$(cat "$STATE/packages/kubeadm")"; printf 'v%s' "${version%-*}"; }
case "$1 ${2-}" in
  "token create")
    [ -r "$(opt --kubeconfig "$@")" ] || { echo "stub kubeadm: no kubeconfig" >&2; exit 1; }
    config="$(opt --config "$@")"
    [ -r "$config" ] || { echo "open $config: no such file or directory" >&2; exit 1; }
    token="$(sed -n 's/^- token: "\{0,1\}\([a-z0-9.]*\)"\{0,1\}$/\1/p' "$config")"
    sha256sum <"$config" | cut -d' ' -f1 >>"$STATE/token-configs-read"
    # Without a ClusterConfiguration naming the version, kubeadm looks up `stable-1` on dl.k8s.io.
    if ! grep -qx 'kind: ClusterConfiguration' "$config" || ! grep -qE '^kubernetesVersion: v[0-9]' "$config"; then
      echo "stub kubeadm: no kubernetesVersion in $config; would fetch https://dl.k8s.io/release/stable-1.txt" >&2
      exit 2
    fi
    # token-create-fails: every create fails; with a count in it, only that many (a loaded API server).
    if [ -e "$STATE/token-create-fails" ]; then
      left="$(cat "$STATE/token-create-fails")"
      if [ -z "$left" ] || [ "$left" -gt 0 ]; then
        [ -z "$left" ] || echo $((left - 1)) >"$STATE/token-create-fails"
        echo "$token"
        echo "error: the server is currently unable to handle the request" >&2
        exit 1
      fi
    fi
    # The API server's create is atomic and refuses an existing Secret; a moment passes before it answers,
    # as it would over the network, so concurrent callers overlap.
    sleep 0.2
    mkdir -p "$STATE/secrets"
    if ! mkdir "$STATE/secrets/bootstrap-token-${token%%.*}" 2>/dev/null; then
      echo "failed to create or update bootstrap token with name bootstrap-token-${token%%.*}:" \
        "a token with id \"${token%%.*}\" already exists" >&2
      exit 1
    fi
    date -u -d '+24 hours' +%Y-%m-%dT%H:%M:%SZ >"$STATE/secrets/bootstrap-token-${token%%.*}/expiration"
    # token-create-answer-lost: the Secret is made, but the connection drops before the answer.
    if [ -e "$STATE/token-create-answer-lost" ]; then
      rm -f "$STATE/token-create-answer-lost"
      echo "error: failed to create bootstrap token: Post \"https://10.0.0.10:6443/api/v1/secrets\": EOF" >&2
      exit 1
    fi
    echo "$token" ;;
  "token delete")
    [ -r "$(opt --kubeconfig "$@")" ] || { echo "stub kubeadm: no kubeconfig" >&2; exit 1; }
    id="${*: -1}"
    rm -r "$STATE/secrets/bootstrap-token-$id" 2>/dev/null \
      || { echo "failed to delete bootstrap token \"$id\": secrets \"bootstrap-token-$id\" not found" >&2; exit 1; }
    echo "bootstrap token \"$id\" deleted" ;;
  "reset --force")
    rm -f /etc/kubernetes/{admin,super-admin,kubelet,bootstrap-kubelet,controller-manager,scheduler}.conf
    for dir in /etc/kubernetes/manifests /etc/kubernetes/pki /var/lib/kubelet; do
      if [ -d "$dir" ]; then find "$dir" -mindepth 1 -delete; fi
    done
    echo "[reset] done" ;;
  "upgrade apply")
    has --yes "$@" || { echo "stub kubeadm: would prompt for confirmation" >&2; exit 1; }
    if [ "$3" != "$(installed)" ]; then
      echo "[upgrade/version] FATAL: the version to upgrade to $3 is not kubeadm's $(installed)" >&2
      exit 1
    fi
    printf '%s' "$3" >"$STATE/cluster-version"
    echo "[upgrade] SUCCESS! Your cluster was upgraded to \"$3\"." ;;
  "upgrade node")
    if [ "$(cat "$STATE/cluster-version")" != "$(installed)" ]; then
      echo "stub kubeadm: kubeadm $(installed) cannot upgrade a node to $(cat "$STATE/cluster-version")" >&2
      exit 1
    fi
    echo "[upgrade] The configuration for this node was successfully upgraded!" ;;
  *) echo "stub kubeadm: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_DPKG_QUERY = r"""
format=""
for arg in "$@"; do
  case "$arg" in --showformat=*) format="${arg#--showformat=}" ;; esac
done
has --show "$@" || exit 2
package="${*: -1}"
if [ ! -f "$STATE/packages/$package" ]; then
  echo "dpkg-query: no packages found matching $package" >&2
  exit 1
fi
case "$format" in
  "") printf '%s\t%s\n' "$package" "$(cat "$STATE/packages/$package")" ;;
  '${Version}') printf '%s' "$(cat "$STATE/packages/$package")" ;;
  '${db:Status-Status}') printf 'installed' ;;
  *) exit 2 ;;
esac
"""

_APT_GET = r"""
flags=()
words=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    -o) shift 2 ;;
    -*) flags+=("$1"); shift ;;
    *) words+=("$1"); shift ;;
  esac
done
has --yes "${flags[@]}" || exit 2
case "${words[0]}" in
  update)
    lists=""
    sources=/etc/apt/sources.list.d/kubernetes.list
    if [ -f "$sources" ]; then
      read -r type options url suite <"$sources"
      keyring="${options#[signed-by=}"
      keyring="${keyring%]}"
      # apt's `_apt` user reads the keyring: it must be world-readable in a directory it may enter.
      if [ "$type $suite" != "deb /" ] || [ -z "$(find "$keyring" -perm -0004)" ] \
        || [ -z "$(find "$(dirname "$keyring")" -maxdepth 0 -perm -0001)" ] \
        || ! grep -qxF "dearmored KEY for ${url}Release.key" "$keyring"; then
        echo "E: The repository '$url' is not signed." >&2
        exit 100
      fi
      lists="$url"
    fi
    printf '%s\n' "$lists" >"$STATE/apt-lists" ;;
  install)
    for spec in "${words[@]:1}"; do
      package="${spec%%=*}"
      version="${spec#*=}"
      [ "$package" != "$spec" ] || { echo "stub apt-get: $spec is not pinned" >&2; exit 2; }
      minor="$(printf '%s' "$version" | cut -d. -f1,2)"
      if ! grep -qxF "https://pkgs.k8s.io/core:/stable:/v$minor/deb/" "$STATE/apt-lists" 2>/dev/null; then
        echo "E: Version '$version' for '$package' was not found" >&2
        exit 100
      fi
      if [ -e "$STATE/holds/$package" ] && ! has --allow-change-held-packages "${flags[@]}"; then
        echo "E: Held packages were changed and -y was used without --allow-change-held-packages." >&2
        exit 100
      fi
    done
    mkdir -p "$STATE/packages"
    for spec in "${words[@]:1}"; do printf '%s' "${spec#*=}" >"$STATE/packages/${spec%%=*}"; done ;;
  *) echo "stub apt-get: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_APT_MARK = r"""
action="$1"
shift
mkdir -p "$STATE/holds"
for package in "$@"; do
  case "$action" in
    hold) touch "$STATE/holds/$package"; echo "$package set on hold." ;;
    unhold) rm -f "$STATE/holds/$package"; echo "Canceled hold on $package." ;;
    *) exit 2 ;;
  esac
done
"""

_CURL = r"""
has --fail "$@" || exit 2
printf 'KEY for %s\n' "${*: -1}" >"$(opt --output "$@")"
"""

# `--show-keys` lists the served key as the real Release.key: the pinned primary key and a subkey.
_GPG = r"""
if has --show-keys "$@"; then
  printf 'pub:-:2048:1:234654DA9A296436:1:::-:::scESC::::::23::0:\nfpr:::::::::%s:\n' "$PINNED_KEY"
  printf 'sub:-:2048:1:AAAAAAAAAAAAAAAA:1:::::e::::::23:\nfpr:::::::::0123456789ABCDEF0123456789ABCDEF01234567:\n'
  exit 0
fi
has --dearmor "$@" || exit 2
{ printf 'dearmored '; cat "${@: -1}"; } >"$(opt --output "$@")"
""".replace("$PINNED_KEY", KUBERNETES_KEY_FINGERPRINT)

_SYSTEMCTL = r"""
case "$*" in
  "enable kubelet") mkdir -p "$STATE/systemd"; touch "$STATE/systemd/kubelet.enabled" ;;
  daemon-reload) ;;
  "restart kubelet")
    if [ -n "${STUB_NODE:-}" ] && [ -d "$STATE/nodes/$STUB_NODE" ]; then
      version="$(cat "$STATE/packages/kubelet")"
      printf 'v%s' "${version%-*}" >"$STATE/nodes/$STUB_NODE/kubeletVersion"
    fi ;;
  *) echo "stub systemctl: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_SSH = r"""
# The machine running Pulumi reaching a node: the key and the pinned host key must be given as files, the
# session must never prompt, and the remote command runs here, on the sandbox's node.
key="$(opt -i "$@")" && [ -r "$key" ] || { echo "stub ssh: no readable -i key" >&2; exit 255; }
for option in BatchMode=yes StrictHostKeyChecking=yes IdentitiesOnly=yes; do
  has "$option" "$@" || { echo "stub ssh: missing -o $option" >&2; exit 255; }
done
known=""
for arg in "$@"; do case "$arg" in UserKnownHostsFile=*) known="${arg#UserKnownHostsFile=}" ;; esac; done
[ -r "$known" ] || { echo "stub ssh: no readable UserKnownHostsFile" >&2; exit 255; }
cp "$key" "$STATE/ssh-key-used"
cp "$known" "$STATE/ssh-known-hosts-used"
exec bash -c "${*: -1}"
"""

_SUDO = r"""
[ "$1" = --non-interactive ] || { echo "stub sudo: would prompt for a password" >&2; exit 1; }
shift
exec "$@"
"""

STUBS: dict[str, str | Stub] = {
    "ssh": _SSH,
    "sudo": _SUDO,
    "kubectl": _KUBECTL,
    "kubeadm": _KUBEADM,
    "dpkg-query": _DPKG_QUERY,
    "apt-get": _APT_GET,
    "apt-mark": _APT_MARK,
    "curl": _CURL,
    "gpg": _GPG,
    "systemctl": _SYSTEMCTL,
}


def _read_only(call: list[str]) -> bool:
    """Calls that change nothing: `kubectl get`, `etcdctl member list`, `dpkg-query`."""
    if call[0] == "dpkg-query":
        return True
    if call[:3] != K:
        return False
    words = call[5:] if call[3:5] == ["--namespace", "kube-system"] else call[3:]
    return words[:1] == ["get"] or (words[:1] == ["exec"] and words[-3:] == ["member", "list", "--write-out=simple"])


# ---------------------------------------------------------------- fixtures and helpers


STUB_KUBECONFIG = "apiVersion: v1\nkind: Config\n# stub admin kubeconfig\n"


@pytest.fixture
def sandbox(sandbox_support: None, tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path, STUBS)
    box.put(ADMIN_KUBECONFIG, STUB_KUBECONFIG)
    return box


@pytest.fixture
def timeless(sandbox_support: None, tmp_path: Path) -> Sandbox:
    """A sandbox whose `sleep` only records its call: a step's pauses take no time."""
    box = Sandbox(tmp_path / "timeless", {**STUBS, "sleep": RECORD_ONLY})
    box.put(ADMIN_KUBECONFIG, STUB_KUBECONFIG)
    return box


def _node(sandbox: Sandbox, name: str = NODE, *, version: str = "v1.34.2", ready: str = "True", **extra: str) -> None:
    sandbox.put_state(f"nodes/{name}/kubeletVersion", version)
    sandbox.put_state(f"nodes/{name}/ready", ready)
    for key, value in extra.items():
        sandbox.put_state(f"nodes/{name}/{key.replace('_', '-')}", value)


def _packages(sandbox: Sandbox, version: str, *, repository: str = "1.34") -> None:
    """A node where node preparation installed and held the packages from `repository`."""
    for package in ("kubelet", "kubeadm", "kubectl"):
        sandbox.put_state(f"packages/{package}", version)
        sandbox.put_state(f"holds/{package}")
    sandbox.put_state("apt-lists", f"https://pkgs.k8s.io/core:/stable:/v{repository}/deb/\n")


def _run_first(
    sandbox: Sandbox, script: Script, *, setup: str = "", env: dict[str, str] | None = None
) -> list[list[str]]:
    return sandbox.run_first(script, setup=setup, env=env)


def _run_again(
    sandbox: Sandbox, script: Script, *, env: dict[str, str] | None = None, stdin: str | None = None
) -> list[list[str]]:
    return sandbox.run_again(script, _read_only, env=env, stdin=stdin)


def _state(sandbox: Sandbox, relative: str) -> str:
    return (sandbox.state / relative).read_text()


# ---------------------------------------------------------------- packages


def test_packages_install_the_pinned_version_from_the_minor_repository_then_do_nothing(sandbox: Sandbox):
    script = kubernetes_packages_script(NODE, CURRENT)
    # A fresh image may lack /etc/apt/keyrings: the step creates it readable for apt's `_apt` user.
    calls = _run_first(sandbox, script, setup="rm -rf /etc/apt/keyrings")
    repository = "https://pkgs.k8s.io/core:/stable:/v1.34/deb/"
    pinned = ["kubelet=1.34.2-1.1", "kubeadm=1.34.2-1.1", "kubectl=1.34.2-1.1"]
    assert calls == [
        KUBEADM_INSTALLED,
        *key_calls(repository),
        [*APT, "update"],
        ["apt-mark", "unhold", "kubelet", "kubeadm", "kubectl"],
        [*INSTALL, *pinned],
        ["apt-mark", "hold", "kubelet", "kubeadm", "kubectl"],
        ["systemctl", "enable", "kubelet"],
    ]
    for package in ("kubelet", "kubeadm", "kubectl"):
        assert _state(sandbox, f"packages/{package}") == "1.34.2-1.1"
        assert (sandbox.state / "holds" / package).exists()
    assert sandbox.file(KUBERNETES_SOURCES).read_text() == f"deb [signed-by={KUBERNETES_KEYRING}] {repository} /\n"
    assert sandbox.file(KUBERNETES_KEYRING).read_text() == f"dearmored KEY for {repository}Release.key\n"
    assert sandbox.file(KUBERNETES_KEYRING).stat().st_mode & 0o777 == 0o644
    assert sandbox.file("/etc/apt/keyrings").stat().st_mode & 0o777 == 0o755

    assert _run_again(sandbox, script) == [KUBEADM_INSTALLED]


@pytest.mark.parametrize("installed", ["1.33.5-1.1", "1.34.2-1.1", "1.35.0-1.1"])
def test_packages_leave_a_node_with_any_kubeadm_alone(sandbox: Sandbox, installed: str):
    _packages(sandbox, installed)
    assert _run_again(sandbox, kubernetes_packages_script(NODE, CURRENT)) == [KUBEADM_INSTALLED]
    assert _state(sandbox, "packages/kubeadm") == installed


# ---------------------------------------------------------------- join token


def _expiring_in(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime(RFC3339)


GET_TOKEN = [*K, "--namespace", "kube-system", "get", "secret", f"bootstrap-token-{TOKEN_ID}"]
GET_TOKEN += ["--output", "jsonpath={.data.expiration}"]
CREATE_TOKEN = ["kubeadm", "token", "create", "--kubeconfig", ADMIN_KUBECONFIG, "--config", TOKEN_CONFIG_PATH]
DELETE_TOKEN = ["kubeadm", "token", "delete", "--kubeconfig", ADMIN_KUBECONFIG, TOKEN_ID]
TOKEN_BUNDLE = encode_bundle([BundleFile(TOKEN_CONFIG_PATH, TOKEN_CONFIG)])
# Token ages: a token is made with 24 h to live and refreshed once less than 2 h are left.
STALE = {"expired": timedelta(hours=-1), "90min-left": timedelta(minutes=90), "23h-old": timedelta(hours=1)}


def _fresh_token_expiration(sandbox: Sandbox) -> datetime:
    expiration = _state(sandbox, f"secrets/bootstrap-token-{TOKEN_ID}/expiration").strip()
    return datetime.strptime(expiration, RFC3339).replace(tzinfo=UTC)


@pytest.mark.parametrize("expires_in", [None, *STALE.values()], ids=["missing", *STALE])
def test_a_missing_or_stale_token_is_replaced_then_left_alone(sandbox: Sandbox, expires_in: timedelta | None):
    if expires_in is not None:
        sandbox.put_state(f"secrets/bootstrap-token-{TOKEN_ID}/expiration", _expiring_in(expires_in))
    script = join_token_script(TARGET, TOKEN_ID)

    result = sandbox.run(script.render(), stdin=TOKEN_BUNDLE)
    assert result.returncode == 0, result.stderr
    assert f"join-token-for-{NODE} done on {ADMIN}" in result.stdout
    assert TOKEN not in script.render()  # it arrives on stdin only
    # kubeadm prints the token; the step sends that nowhere, neither to its output nor to a log on the node.
    assert TOKEN not in result.stdout + result.stderr
    logs = sandbox.file("/var/log/kubeadm-ha")
    assert not logs.exists() or all(TOKEN not in log.read_text() for log in logs.iterdir())
    # The guard, the same check once the lock is held, whether a Secret is there to replace, then kubeadm:
    # `token create` refuses an id whose Secret exists, so an existing one is deleted first.
    replace = [DELETE_TOKEN] if expires_in is not None else []
    assert sandbox.call_lines() == [GET_TOKEN, GET_TOKEN, GET_TOKEN, *replace, CREATE_TOKEN]
    # kubeadm read exactly the configuration from stdin, which is gone afterwards.
    sha = subprocess.run(["sha256sum"], input=TOKEN_CONFIG, capture_output=True, text=True, check=True)
    assert _state(sandbox, "token-configs-read").split() == [sha.stdout.split()[0]]
    assert not sandbox.exists(TOKEN_CONFIG_PATH)
    assert _fresh_token_expiration(sandbox) > datetime.now(UTC) + timedelta(hours=23)

    assert _run_again(sandbox, script, stdin=TOKEN_BUNDLE) == [GET_TOKEN]


@pytest.mark.parametrize("expires_in", [None, STALE["23h-old"]], ids=["missing", "23h-old"])
def test_concurrent_refreshes_all_succeed_and_leave_one_token(sandbox: Sandbox, expires_in: timedelta | None):
    """Workers join in parallel, so their token steps run on the first control plane at the same time."""
    if expires_in is not None:
        sandbox.put_state(f"secrets/bootstrap-token-{TOKEN_ID}/expiration", _expiring_in(expires_in))
    runs = sandbox.run_concurrently(join_token_script(TARGET, TOKEN_ID).render(), 3, stdin=TOKEN_BUNDLE)
    assert [rc for rc, _ in runs] == [0, 0, 0], runs
    assert all(TOKEN not in output for _, output in runs)
    assert [path.name for path in (sandbox.state / "secrets").iterdir()] == [f"bootstrap-token-{TOKEN_ID}"]
    calls = sandbox.call_lines()
    assert calls.count(CREATE_TOKEN) == 1
    assert calls.count(DELETE_TOKEN) == (0 if expires_in is None else 1)
    assert _fresh_token_expiration(sandbox) > datetime.now(UTC) + timedelta(hours=23)
    assert not sandbox.exists(TOKEN_CONFIG_PATH)


def test_the_token_refresh_waits_a_bounded_time_for_the_lock():
    rendered = join_token_script(TARGET, TOKEN_ID).render()
    assert "flock --wait 300 9" in rendered


@pytest.mark.parametrize("expires_in", [timedelta(hours=3), timedelta(hours=23)], ids=["3h", "23h"])
def test_a_fresh_token_is_left_alone(sandbox: Sandbox, expires_in: timedelta):
    sandbox.put_state(f"secrets/bootstrap-token-{TOKEN_ID}/expiration", _expiring_in(expires_in))
    assert _run_again(sandbox, join_token_script(TARGET, TOKEN_ID), stdin=TOKEN_BUNDLE) == [GET_TOKEN]
    assert not sandbox.exists(TOKEN_CONFIG_PATH)


def _pauses(box: Sandbox) -> list[str]:
    """The step's own pauses: not the kubeadm stub's `sleep 0.2` inside each create."""
    return [args[0] for args in box.calls_of("sleep") if args != ["0.2"]]


def test_a_failed_token_create_removes_the_config_and_shows_no_token(timeless: Sandbox):
    sandbox = timeless
    sandbox.put_state("token-create-fails")
    result = sandbox.run(join_token_script(TARGET, TOKEN_ID).render(), stdin=TOKEN_BUNDLE)
    assert result.returncode == 1
    assert f"refreshing the bootstrap token on dev-cp-1 failed {TOKEN_ATTEMPTS} times; giving up" in result.stderr
    assert sandbox.call_lines().count(CREATE_TOKEN) == TOKEN_ATTEMPTS
    assert _pauses(sandbox) == [str(TOKEN_RETRY_PAUSE_SECONDS)] * (TOKEN_ATTEMPTS - 1)
    assert "step join-token-for-dev-worker-2 failed on host dev-cp-1" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert (sandbox.state / "token-configs-read").exists()  # kubeadm did get to read it
    assert not sandbox.exists(TOKEN_CONFIG_PATH)


@pytest.mark.parametrize("trouble", ["fails-twice", "answer-lost"])
def test_a_token_create_the_api_drops_is_tried_again(timeless: Sandbox, trouble: str):
    """The cluster lab (2 TCG cores, a loaded first control plane) failed a whole `pulumi up` on one EOF from
    `kubeadm token create`. A dropped call is tried again, within a bound; a create that went through although
    its answer was lost is replaced, not refused as "already exists"."""
    sandbox = timeless
    if trouble == "fails-twice":
        sandbox.put_state("token-create-fails", "2")
    else:
        sandbox.put_state("token-create-answer-lost")
    result = sandbox.run(join_token_script(TARGET, TOKEN_ID).render(), stdin=TOKEN_BUNDLE)
    assert result.returncode == 0, result.stderr
    retrying = f"failed (attempt 1 of {TOKEN_ATTEMPTS}); retrying in {TOKEN_RETRY_PAUSE_SECONDS} s"
    assert f"refreshing the bootstrap token on dev-cp-1 {retrying}" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    calls = sandbox.call_lines()
    if trouble == "fails-twice":
        assert calls.count(CREATE_TOKEN) == 3 and DELETE_TOKEN not in calls
    else:
        assert calls.count(CREATE_TOKEN) == 2 and calls.count(DELETE_TOKEN) == 1
    assert _fresh_token_expiration(sandbox) > datetime.now(UTC) + timedelta(hours=23)
    assert not sandbox.exists(TOKEN_CONFIG_PATH)
    assert _run_again(sandbox, join_token_script(TARGET, TOKEN_ID), stdin=TOKEN_BUNDLE) == [GET_TOKEN]


# ---------------------------------------------------------------- wait for Ready


def _kubelet_comes_up(sandbox: Sandbox, tmp_path: Path, name: str) -> Sandbox:
    """A sandbox whose `sleep` lets time pass: the kubelet registers the Node (if it had not) and reports Ready."""
    box = Sandbox(
        tmp_path / name,
        {**STUBS, "sleep": f'mkdir -p "$STATE/nodes/{NODE}"; printf v1.34.2 >"$STATE/nodes/{NODE}/kubeletVersion"; '
         f'printf True >"$STATE/nodes/{NODE}/ready"'},
    )  # fmt: skip
    box.put(ADMIN_KUBECONFIG, "stub\n")
    return box


def test_node_ready_waits_for_ready_then_does_nothing(sandbox: Sandbox, tmp_path: Path):
    waiting = _kubelet_comes_up(sandbox, tmp_path, "waiting")
    _node(waiting, ready="False")
    script = node_ready_script(TARGET)
    assert _run_first(waiting, script) == [
        [*K, "get", "node", NODE, "--output", READY],
        [*K, "get", "node", NODE, "--output", READY],
        ["sleep", "5"],
        [*K, "get", "node", NODE, "--output", READY],
    ]
    assert _run_again(waiting, script) == [[*K, "get", "node", NODE, "--output", READY]]


def test_node_ready_waits_for_the_node_to_register(sandbox: Sandbox, tmp_path: Path):
    registering = _kubelet_comes_up(sandbox, tmp_path, "registering")
    assert _run_first(registering, node_ready_script(TARGET)) == [
        [*K, "get", "node", NODE, "--output", READY],
        [*K, "get", "node", NODE, "--output", READY],
        ["sleep", "5"],
        [*K, "get", "node", NODE, "--output", READY],
    ]


def test_node_ready_keeps_waiting_through_calls_the_api_drops(sandbox: Sandbox, tmp_path: Path):
    # The cluster lab (2 LB + 1 CP + 1 worker on 2 TCG cores): the worker had registered, and `kubectl wait`
    # got "Unable to connect to the server: EOF" through the VIP, which failed the step and the `pulumi up`.
    # A failed call is "not Ready yet" within the step's bound, not its end.
    flaky = _kubelet_comes_up(sandbox, tmp_path, "flaky")
    _node(flaky, ready="False")
    flaky.put_state("api-eof", "3\n4\n")
    result = flaky.run(node_ready_script(TARGET).render())
    assert result.returncode == 0, result.stderr
    assert _state(flaky, "kubectl-calls") == "5"


def test_node_ready_gives_up_at_its_bound_naming_the_node_and_what_the_api_says(timeless: Sandbox):
    never = timeless
    _node(never, ready="False")
    # `SECONDS` is bash's own clock: past the bound after the first poll.
    script = node_ready_script(TARGET).render().replace("deadline=$((SECONDS + limit))", "deadline=$SECONDS")
    result = never.run(script)
    assert result.returncode == 1
    assert f"gave up after 600s waiting for node {NODE} to be Ready on {ADMIN}" in result.stderr
    assert f"{NODE} False" in result.stderr


# ---------------------------------------------------------------- remove and reset

DRAIN = [*K, "drain", NODE, "--ignore-daemonsets", "--delete-emptydir-data", "--skip-wait-for-delete-timeout=60"]
DRAIN += ["--timeout=300s"]
LIST_PODS = [*K, "get", "pods", "--all-namespaces", "--output", "wide", "--field-selector", f"spec.nodeName={NODE}"]
CP = "dev-cp-3"
ETCDCTL = [*K, "--namespace", "kube-system", "exec", f"etcd-{ADMIN}", "--", "etcdctl"]
ETCDCTL += ["--endpoints=https://127.0.0.1:2379", "--cacert=/etc/kubernetes/pki/etcd/ca.crt"]
ETCDCTL += ["--cert=/etc/kubernetes/pki/etcd/healthcheck-client.crt"]
ETCDCTL += ["--key=/etc/kubernetes/pki/etcd/healthcheck-client.key", "--command-timeout=30s"]
MEMBER_LIST = [*ETCDCTL, "member", "list", "--write-out=simple"]
MEMBER_IDS = {ADMIN: "8e9e05c52164694d", "dev-cp-2": "2c3f5a0a9e7b1d44", CP: "91bc3c398fb3c146"}


def _members(sandbox: Sandbox, *names: str) -> None:
    for name in names:
        sandbox.put_state(f"members/{name}", MEMBER_IDS[name])


def test_drain_cordons_and_drains_then_does_nothing(sandbox: Sandbox):
    _node(sandbox, pods=PODS)
    script = drain_node_script(TARGET)
    assert _run_first(sandbox, script) == [
        [*K, "get", "node", NODE],
        [*K, "cordon", NODE],
        DRAIN,
    ]
    assert (sandbox.state / "nodes" / NODE).exists()  # the Node object stays until after `kubeadm reset`
    assert _run_again(sandbox, script) == [
        [*K, "get", "node", NODE],
        [*K, "get", "node", NODE, "--output", "jsonpath={.spec.unschedulable}"],
    ]


def test_a_dead_node_drains_without_waiting_for_its_pods_to_go(sandbox: Sandbox):
    # A NotReady node: evicted pods stay Terminating forever, because no kubelet confirms their deletion.
    _node(sandbox, ready="Unknown", pods=PODS, dead="")
    assert _run_first(sandbox, drain_node_script(TARGET))[-1] == DRAIN


def test_delete_node_removes_the_node_object_then_does_nothing(sandbox: Sandbox):
    _node(sandbox, pods=PODS)
    script = delete_node_script(TARGET)
    assert _run_first(sandbox, script) == [
        [*K, "get", "node", NODE],
        [*K, "delete", "node", NODE, "--ignore-not-found", "--timeout=120s"],
    ]
    assert not (sandbox.state / "nodes" / NODE).exists()
    assert _run_again(sandbox, script) == [[*K, "get", "node", NODE]]


def test_delete_node_of_a_control_plane_removes_its_etcd_member_then_does_nothing(sandbox: Sandbox):
    """Its own `kubeadm reset` removes a live node's member; a dead node's member is removed by the survivors."""
    _node(sandbox, CP)
    _members(sandbox, ADMIN, "dev-cp-2", CP)
    script = delete_node_script(Target(ADMIN, CP), etcd_member=True)
    assert _run_first(sandbox, script) == [
        [*K, "get", "node", CP],
        [*K, "delete", "node", CP, "--ignore-not-found", "--timeout=120s"],
        MEMBER_LIST,
        [*ETCDCTL, "member", "remove", MEMBER_IDS[CP]],
    ]
    assert sorted(path.name for path in (sandbox.state / "members").iterdir()) == [ADMIN, "dev-cp-2"]
    assert _run_again(sandbox, script) == [[*K, "get", "node", CP], MEMBER_LIST]


def test_delete_node_leaves_etcd_alone_once_the_reset_removed_the_member(sandbox: Sandbox):
    _node(sandbox, CP)
    _members(sandbox, ADMIN, "dev-cp-2")
    calls = _run_first(sandbox, delete_node_script(Target(ADMIN, CP), etcd_member=True))
    assert calls[-1] == MEMBER_LIST
    assert sorted(path.name for path in (sandbox.state / "members").iterdir()) == [ADMIN, "dev-cp-2"]


def test_delete_node_fails_when_etcd_cannot_be_asked(sandbox: Sandbox):
    """No member list is not the same as no member: the step fails rather than leave a member behind."""
    script = delete_node_script(Target(ADMIN, CP), etcd_member=True)
    result = sandbox.run(script.render(), env={"STUB_FAIL": "kubectl"})
    assert result.returncode != 0
    assert f"step delete-node-{CP} failed on host {ADMIN}" in result.stderr


@pytest.mark.parametrize("make", [drain_node_script, lambda target: drain_for_upgrade_script(target, NEXT)])
def test_a_drain_that_cannot_finish_fails_naming_the_node_and_its_pods(sandbox: Sandbox, make):
    _node(sandbox, pods=PODS, drain_blocked="")
    script = make(TARGET)
    result = sandbox.run(script.render())
    assert result.returncode == 1
    assert f"draining {NODE} did not finish within the timeout; pods still on it:" in result.stderr
    assert PODS.strip() in result.stderr
    calls = sandbox.call_lines()
    assert calls[-3:] == [[*K, "cordon", NODE], DRAIN, LIST_PODS]
    assert (sandbox.state / "nodes" / NODE).exists()  # the Node was not deleted
    assert not any("drained-" in path for path in sandbox.snapshot())

    # Once the blocking pod is gone, a re-run drains again (the earlier cordon does not count as done).
    (sandbox.state / "nodes" / NODE / "drain-blocked").unlink()
    assert DRAIN in _run_first(sandbox, script)


@pytest.mark.parametrize("role", ["control-plane", "worker"])
def test_reset_then_does_nothing(sandbox: Sandbox, role: str):
    host = CP if role == "control-plane" else NODE
    _reset_able(sandbox, control_plane=role == "control-plane")
    script = reset_script(host)
    assert _run_first(sandbox, script) == [["kubeadm", "reset", "--force"]]
    _assert_reset(sandbox)
    assert _run_again(sandbox, script) == []


def _reset_able(sandbox: Sandbox, *, control_plane: bool) -> None:
    """A node that has joined: kubelet's kubeconfig, static pods on a control plane, a CNI config."""
    sandbox.put(KUBELET_KUBECONFIG, "kubelet\n")
    if control_plane:
        sandbox.put("/etc/kubernetes/super-admin.conf", "super\n")
        sandbox.put("/etc/kubernetes/manifests/kube-apiserver.yaml", "pod\n")
    else:
        sandbox.file(ADMIN_KUBECONFIG).unlink()
    sandbox.put("/etc/cni/net.d/10-calico.conflist", "{}\n", 0o644)


def _assert_reset(sandbox: Sandbox) -> None:
    for path in (KUBELET_KUBECONFIG, ADMIN_KUBECONFIG, "/etc/kubernetes/manifests/kube-apiserver.yaml"):
        assert not sandbox.exists(path)
    assert not sandbox.exists("/etc/cni/net.d")


# The reset of a leaving node runs from the machine running Pulumi, over SSH, so that a node that does not
# answer can be told apart from one whose reset failed. Nodes sit on loopback addresses; nothing listens on
# 127.77.0.66, so that one is dead.
OPERATOR_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtleW9mdGhlbm9kZXRoYXRpc2xlYXZpbmc"
DEAD_ADDRESS = "127.77.0.66"


@contextlib.contextmanager
def _listening(address: str) -> Iterator[int]:
    """An open TCP port at `address` (an sshd that answers); its number."""
    with socket.socket() as server:
        server.bind((address, 0))
        server.listen(8)
        yield server.getsockname()[1]


def _ssh_node(address: str, port: int, host: str = NODE) -> SshNode:
    return SshNode(hostname=host, address=address, user="kube", host_public_key=HOST_KEY, port=port)


@pytest.fixture
def operator(timeless: Sandbox, tmp_path: Path) -> Sandbox:
    """The machine running Pulumi, which is also the node here: ssh runs the remote command on the sandbox.

    `sleep` only records its call, so the probes of a dead node take no time.
    """
    (tmp_path / "tmp").mkdir()
    return timeless


def _operator_env(sandbox: Sandbox) -> dict[str, str]:
    return {"TMPDIR": str(sandbox.root.parent / "tmp")}


def test_reset_over_ssh_resets_a_node_that_answers(operator: Sandbox):
    _reset_able(operator, control_plane=False)
    with _listening("127.77.0.5") as port:
        script = reset_over_ssh_script(_ssh_node("127.77.0.5", port))
        result = operator.run(script.render(), stdin=OPERATOR_KEY, env=_operator_env(operator))
        assert result.returncode == 0, result.stdout + result.stderr
        # The remote command is a script of many lines: keep each call's first line.
        calls = [call for call in operator.call_lines() if call[0] in ("ssh", "sudo", "kubeadm")]
        assert [call[0] for call in calls] == ["ssh", "sudo", "kubeadm"]
        assert calls[0][-2] == "kube@127.77.0.5" and ["-p", str(port)] == calls[0][-4:-2]
        assert calls[2] == ["kubeadm", "reset", "--force"]
        _assert_reset(operator)
        # The key and the pinned host key were files for ssh only, gone once the step is done.
        assert _state(operator, "ssh-key-used") == OPERATOR_KEY
        assert _state(operator, "ssh-known-hosts-used") == f"[127.77.0.5]:{port} {HOST_KEY}\n"
        assert list((operator.root.parent / "tmp").iterdir()) == []
        assert OPERATOR_KEY not in result.stdout + result.stderr

        # Again: the node's own guard sees the reset done.
        again = operator.run(script.render(), stdin=OPERATOR_KEY, env=_operator_env(operator))
        assert again.returncode == 0, again.stderr
        assert "kubeadm-reset already done on dev-worker-2" in again.stdout
        again_calls = [call[0] for call in operator.call_lines() if call[0] in ("ssh", "sudo", "kubeadm")]
        assert again_calls[len(calls) :] == ["ssh", "sudo"]


def test_reset_over_ssh_treats_a_node_that_does_not_answer_as_gone(operator: Sandbox):
    script = reset_over_ssh_script(_ssh_node(DEAD_ADDRESS, 22))
    result = operator.run(script.render(), stdin=OPERATOR_KEY, env=_operator_env(operator))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NODE} does not answer on {DEAD_ADDRESS}:22" in result.stderr
    assert "kubeadm reset skipped" in result.stderr
    # Bounded: a few probes a few seconds apart, then no ssh at all.
    assert operator.call_lines() == [["sleep", "5"]] * 5
    assert list((operator.root.parent / "tmp").iterdir()) == []


def test_reset_over_ssh_fails_when_a_node_that_answers_cannot_be_reset(operator: Sandbox):
    _reset_able(operator, control_plane=False)
    with _listening("127.77.0.5") as port:
        script = reset_over_ssh_script(_ssh_node("127.77.0.5", port))
        failing = {**_operator_env(operator), "STUB_FAIL": "kubeadm"}
        result = operator.run(script.render(), stdin=OPERATOR_KEY, env=failing)
    assert result.returncode != 0
    assert "step kubeadm-reset failed on host dev-worker-2" in result.stderr  # the node's own message
    assert f"step kubeadm-reset-over-ssh failed on host {NODE}" in result.stderr
    assert operator.exists(KUBELET_KUBECONFIG)
    assert list((operator.root.parent / "tmp").iterdir()) == []


def test_a_dead_control_plane_leaves_through_the_survivors(operator: Sandbox):
    """README, day-2: remove or replace a dead node. Drain, reset (skipped), Node and etcd member removed."""
    _node(operator, CP, ready="Unknown", pods=PODS.replace(NODE, CP), dead="")
    _members(operator, ADMIN, "dev-cp-2", CP)
    target = Target(ADMIN, CP)
    steps = [
        drain_node_script(target),
        reset_over_ssh_script(_ssh_node(DEAD_ADDRESS, 22, host=CP)),
        delete_node_script(target, etcd_member=True),
    ]
    for step in steps:
        result = operator.run(step.render(), stdin=OPERATOR_KEY, env=_operator_env(operator))
        assert result.returncode == 0, result.stdout + result.stderr
    assert not (operator.state / "nodes" / CP).exists()
    assert sorted(path.name for path in (operator.state / "members").iterdir()) == [ADMIN, "dev-cp-2"]
    assert not any(call[0] == "ssh" for call in operator.call_lines())


# ---------------------------------------------------------------- upgrade


def test_drain_for_upgrade_then_does_nothing(sandbox: Sandbox):
    _node(sandbox, pods=PODS)
    script = drain_for_upgrade_script(TARGET, NEXT)
    assert _run_first(sandbox, script) == [
        [*K, "get", "node", NODE, "--output", KUBELET_VERSION],
        [*K, "cordon", NODE],
        DRAIN,
    ]
    assert (sandbox.state / "nodes" / NODE / "unschedulable").exists()
    assert _run_again(sandbox, script) == [
        [*K, "get", "node", NODE, "--output", KUBELET_VERSION],
        [*K, "get", "node", NODE, "--output", UNSCHEDULABLE],
    ]
    # Uncordoned by hand before the upgrade: drained again.
    (sandbox.state / "nodes" / NODE / "unschedulable").unlink()
    assert DRAIN in _run_first(sandbox, script)


def test_drain_for_upgrade_skips_a_node_already_on_the_new_version(sandbox: Sandbox):
    _node(sandbox, version="v1.35.0", pods=PODS)
    script = drain_for_upgrade_script(TARGET, NEXT)
    assert _run_again(sandbox, script) == [[*K, "get", "node", NODE, "--output", KUBELET_VERSION]]


@pytest.mark.parametrize("first_control_plane", [True, False], ids=["first-control-plane", "other-node"])
def test_upgrade_installs_kubeadm_upgrades_then_installs_kubelet(sandbox: Sandbox, first_control_plane: bool):
    _packages(sandbox, "1.34.2-1.1")
    sandbox.put(KUBERNETES_SOURCES, "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] old /\n", 0o644)
    if not first_control_plane:
        sandbox.put_state("cluster-version", "v1.35.0")  # `upgrade apply` already ran on the first control plane
    script = upgrade_node_script(NODE, NEXT, first_control_plane=first_control_plane)
    upgrade = ["apply", "v1.35.0", "--yes"] if first_control_plane else ["node"]
    calls = _run_first(sandbox, script)
    repository = "https://pkgs.k8s.io/core:/stable:/v1.35/deb/"
    assert calls == [
        ["dpkg-query", "--show", VERSION_OF, "kubelet"],
        *key_calls(repository),
        [*APT, "update"],
        ["apt-mark", "unhold", "kubeadm"],
        [*INSTALL, "kubeadm=1.35.0-1.1"],
        ["apt-mark", "hold", "kubeadm"],
        ["kubeadm", "upgrade", *upgrade],
        ["apt-mark", "unhold", "kubelet", "kubectl"],
        [*INSTALL, "kubelet=1.35.0-1.1", "kubectl=1.35.0-1.1"],
        ["apt-mark", "hold", "kubelet", "kubectl"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "restart", "kubelet"],
    ]
    assert sandbox.file(KUBERNETES_SOURCES).read_text() == f"deb [signed-by={KUBERNETES_KEYRING}] {repository} /\n"
    for package in ("kubelet", "kubeadm", "kubectl"):
        assert _state(sandbox, f"packages/{package}") == "1.35.0-1.1"
        assert (sandbox.state / "holds" / package).exists()
    assert _state(sandbox, "cluster-version") == "v1.35.0"

    assert _run_again(sandbox, script) == [
        ["dpkg-query", "--show", VERSION_OF, "kubelet"],
        ["dpkg-query", "--show", VERSION_OF, "kubeadm"],
    ]


@pytest.mark.parametrize("first_control_plane", [True, False])
def test_upgrade_of_a_node_already_at_the_target_is_a_no_op(sandbox: Sandbox, first_control_plane: bool):
    _packages(sandbox, "1.35.0-1.1", repository="1.35")
    script = upgrade_node_script(NODE, NEXT, first_control_plane=first_control_plane)
    assert _run_again(sandbox, script) == [
        ["dpkg-query", "--show", VERSION_OF, "kubelet"],
        ["dpkg-query", "--show", VERSION_OF, "kubeadm"],
    ]


def test_uncordon_waits_for_the_new_kubelet_then_does_nothing(sandbox: Sandbox):
    _node(sandbox, version="v1.35.0", unschedulable="")
    script = uncordon_script(TARGET, NEXT)
    guard = [
        [*K, "get", "node", NODE, "--output", KUBELET_VERSION],
        [*K, "get", "node", NODE, "--output", READY],
        [*K, "get", "node", NODE, "--output", UNSCHEDULABLE],
    ]
    assert _run_first(sandbox, script) == [
        *guard,
        [*K, "get", "node", NODE, "--output", KUBELET_VERSION],
        [*K, "get", "node", NODE, "--output", READY],
        [*K, "uncordon", NODE],
    ]
    assert not (sandbox.state / "nodes" / NODE / "unschedulable").exists()
    assert _run_again(sandbox, script) == guard


def test_a_whole_node_upgrade_in_order_then_every_step_again_does_nothing(sandbox: Sandbox):
    """drain (admin) -> upgrade (node) -> uncordon (admin), with the kubelet restart feeding the Node's version."""
    _node(sandbox, pods=PODS)
    _packages(sandbox, "1.34.2-1.1")
    sandbox.put_state("cluster-version", "v1.35.0")
    steps = [
        drain_for_upgrade_script(TARGET, NEXT),
        upgrade_node_script(NODE, NEXT, first_control_plane=False),
        uncordon_script(TARGET, NEXT),
    ]
    for step in steps:
        _run_first(sandbox, step, env={"STUB_NODE": NODE})
    assert _state(sandbox, f"nodes/{NODE}/kubeletVersion") == "v1.35.0"
    assert not (sandbox.state / "nodes" / NODE / "unschedulable").exists()
    for step in steps:
        _run_again(sandbox, step, env={"STUB_NODE": NODE})


# ---------------------------------------------------------------- static checks

ALL_SCRIPTS = {
    "packages": kubernetes_packages_script(NODE, CURRENT),
    "join-token": join_token_script(TARGET, TOKEN_ID),
    "node-ready": node_ready_script(TARGET),
    "drain-node": drain_node_script(TARGET),
    "delete-node": delete_node_script(TARGET),
    "delete-control-plane": delete_node_script(Target(ADMIN, CP), etcd_member=True),
    "reset": reset_script(NODE),
    "reset-over-ssh": reset_over_ssh_script(_ssh_node("10.17.3.52", 22)),
    "drain-for-upgrade": drain_for_upgrade_script(TARGET, NEXT),
    "upgrade-first": upgrade_node_script(NODE, NEXT, first_control_plane=True),
    "upgrade-other": upgrade_node_script(NODE, NEXT, first_control_plane=False),
    "uncordon": uncordon_script(TARGET, NEXT),
}


def test_every_lifecycle_script_is_covered():
    made = {name for module in (lifecycle, admin_node) for name in dir(module) if name.endswith("_script")}
    assert made == {
        "kubernetes_packages_script", "join_token_script", "node_ready_script", "drain_node_script",
        "delete_node_script", "reset_over_ssh_script",
        "reset_script", "drain_for_upgrade_script", "upgrade_node_script", "uncordon_script",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(ALL_SCRIPTS))
def test_shellcheck(tmp_path: Path, name: str):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        unavailable("shellcheck is not installed (Debian package `shellcheck`)")
    path = tmp_path / "script.sh"
    path.write_text(ALL_SCRIPTS[name].render())
    result = subprocess.run(
        [shellcheck, "--severity=warning", "--shell=bash", "--format=gcc", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
