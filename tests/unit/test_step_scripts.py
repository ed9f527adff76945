"""Bring-up scripts (PKI, kubeadm init/join, load balancer, CNI, cloud-init wait) run in the sandbox (tests/sandbox.py).

Each script is rendered by its component and run unmodified with bash as root; the node's /etc and /var
are overlays in the test's temp dir. `kubeadm`, `kubectl`, `systemctl`, `curl`, `haproxy`, `keepalived`
and `cloud-init` are stubs that record every call; coreutils, sed, grep, base64, sha256sum, timeout and
bash's own /dev/tcp are the real ones. The stubs keep state under the sandbox's `state/` directory,
which stands for everything outside the node:

* `answering`: the URLs whose API answers (`curl` probes succeed for them; `kubeadm join` needs one);
* `internet/<file name>`: what a download of a URL ending in that name returns;
* `daemonsets/<namespace>/<name>`: the cluster's DaemonSets (`kubectl apply` creates those it finds);
* `systemd/<unit>.{enabled,active,loaded}`: a unit's state; `loaded` is the digest of the config the
  daemon last (re)started with;
* `cloud-init-failed`: cloud-init finished with an error.

The stubs refuse what the real programs would refuse: kubeadm refuses a node that already has a kubelet
kubeconfig, `join` fails while no API answers, `init` refuses to run without `--skip-token-print`; curl
probes need a readable `--cacert` and downloads need an existing output directory; kubectl needs a readable
kubeconfig; keepalived's config test refuses a track script others may write or nobody may run;
anything unexpected exits 2.

For every script: the first run makes exactly the expected calls in order; a second run prints
"already done", makes only read-only calls (its guard) and changes no file (upper layers and state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shlex
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from components.control_plane import KUBELET_KUBECONFIG, first_control_plane_script, kubeadm_join_script
from components.loadbalancer import lb_config_script
from components.pki_placement import PlacedPki, place_pki_script
from model.addressing import plan_addresses
from model.config import ClusterConfig
from render.cloudinit import PREPARATION_PATH
from render.cni import (
    ADMIN_KUBECONFIG,
    APPLY_ATTEMPTS,
    APPLY_PAUSE_SECONDS,
    APPLY_REQUEST_TIMEOUT,
    CniManifest,
    cni_script,
    manifest_for,
)
from render.kubeadm import INIT_CONFIG_PATH, JOIN_CONFIG_PATH
from render.lb_config import HAPROXY_CFG_PATH, KEEPALIVED_CHECK_SCRIPT_PATH, KEEPALIVED_CONF_PATH, lb_node_files
from render.node_prep import PREPARED_MARKER
from render.readiness import READY_MARKER, readiness_script
from render.scripts import LOG_DIR, STATE_DIR, BundleFile, Script, encode_bundle, sha256_hex
from tests.sandbox import RECORD_ONLY, Sandbox, Stub
from tests.stacks import stack_config

TOKEN = "abcdef.0123456789abcdef"
ENDPOINT = "10.17.4.10:6443"
# Peers on loopback addresses: nothing listens there unless a test opens the port.
PEERS = ("127.77.0.2", "127.77.0.3")
CA_CERT = "/etc/kubernetes/pki/ca.crt"

INIT_DOCUMENT = f"""\
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
- token: "{TOKEN}"
  ttl: 24h0m0s
"""
JOIN_DOCUMENT = f"""\
apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: {ENDPOINT}
    token: "{TOKEN}"
"""

# ---------------------------------------------------------------- stubs

_KUBEADM = r"""
config="$(opt --config "$@")" || { echo "stub kubeadm: no --config" >&2; exit 2; }
[ -r "$config" ] || { echo "open $config: no such file or directory" >&2; exit 1; }
if [ -e "$STATE/fails-in-preflight" ]; then
  echo "[ERROR CRI]: container runtime is not running" >&2
  exit 1
fi
if [ -e /etc/kubernetes/kubelet.conf ] && ! has --skip-phases=preflight "$@"; then
  echo "[ERROR FileAvailable--etc-kubernetes-kubelet.conf]: /etc/kubernetes/kubelet.conf already exists" >&2
  exit 1
fi
# What kubeadm read: the document's digest and the file's mode.
read_by_kubeadm="$(sha256sum <"$config" | cut -d' ' -f1) $(stat -c %a "$config")"
case "$1" in
  init)
    has --skip-token-print "$@" || { echo "stub kubeadm: init would print the token" >&2; exit 2; }
    printf '%s\n' "$read_by_kubeadm" >>"$STATE/init-configs-read"
    mkdir -p /etc/kubernetes/manifests
    echo "apiVersion: v1" >/etc/kubernetes/manifests/kube-apiserver.yaml
    echo "kind: Config" >/etc/kubernetes/admin.conf
    echo "kind: Config" >/etc/kubernetes/kubelet.conf
    if [ -e "$STATE/fails-after-kubeconfig" ]; then
      echo "error execution phase wait-control-plane: failed while waiting for the control plane to start" >&2
      exit 1
    fi
    echo "Your Kubernetes control-plane has initialized successfully!" ;;
  join)
    printf '%s\n' "$read_by_kubeadm" >>"$STATE/join-configs-read"
    echo "[preflight] Running pre-flight checks"
    echo "[discovery] Using bootstrap token $(sed -n 's/^ *token: "\(.*\)"$/\1/p' "$config")"
    if [ ! -s "$STATE/answering" ]; then
      echo "error execution phase preflight: couldn't validate the identity of the API Server: connection refused" >&2
      exit 1
    fi
    echo "kind: Config" >/etc/kubernetes/kubelet.conf
    if [ -e "$STATE/fails-after-kubeconfig" ]; then
      echo "error execution phase control-plane-join/etcd: error creating local etcd static pod manifest" >&2
      exit 1
    fi
    echo "This node has joined the cluster" ;;
  *) echo "stub kubeadm: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_CURL = r"""
has --fail "$@" || { echo "stub curl: without --fail an HTTP error would count as success" >&2; exit 2; }
url="${*: -1}"
if output="$(opt --output "$@")"; then
  page="$STATE/internet/${url##*/}"
  [ -f "$page" ] || { echo "curl: (22) The requested URL returned error: 404" >&2; exit 22; }
  [ -d "$(dirname "$output")" ] || { echo "curl: (23) Failure writing output to destination" >&2; exit 23; }
  cat "$page" >"$output"
else
  cacert="$(opt --cacert "$@")" || { echo "stub curl: probe without --cacert" >&2; exit 2; }
  [ -r "$cacert" ] || { echo "curl: (77) error setting certificate file: $cacert" >&2; exit 77; }
  grep -qxF "$url" "$STATE/answering" 2>/dev/null || { echo "curl: (7) Failed to connect" >&2; exit 7; }
  echo ok
fi
"""

_KUBECTL = r"""
kubeconfig="$(opt --kubeconfig "$@")" || { echo "stub kubectl: no --kubeconfig" >&2; exit 2; }
[ -r "$kubeconfig" ] || { echo "error: stat $kubeconfig: no such file or directory" >&2; exit 1; }
namespace=default
words=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --kubeconfig) shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    --request-timeout=*) shift ;;
    *) words+=("$1"); shift ;;
  esac
done
set -- "${words[@]}"
case "$1 ${2-}" in
  "get daemonset")
    [ -e "$STATE/daemonsets/$namespace/$3" ] \
      || { echo "Error from server (NotFound): daemonsets.apps \"$3\" not found" >&2; exit 1; }
    printf 'NAME  DESIRED\n%s  3\n' "$3" ;;
  "apply --filename")
    [ -r "$3" ] || { echo "error: the path \"$3\" does not exist" >&2; exit 1; }
    # A restarted API server whose RBAC cache has not synced yet (lab run 21): `apply-fails` calls refused.
    if [ -s "$STATE/apply-fails" ] && [ "$(cat "$STATE/apply-fails")" -gt 0 ]; then
      echo "$(($(cat "$STATE/apply-fails") - 1))" >"$STATE/apply-fails"
      echo 'Error from server (Forbidden): configmaps "kube-flannel-cfg" is forbidden:' \
        'User "kubernetes-admin" cannot get resource "configmaps"' >&2
      exit 1
    fi
    mkdir -p "$STATE/applied"
    cat "$3" >"$STATE/applied/${3##*/}"
    # The DaemonSets in the manifest (top-level `kind:` and the metadata's two-space `name:`/`namespace:`).
    awk '/^---/ {kind = ""; name = ""; ns = ""}
         /^kind: / {kind = $2}
         /^  name: / {if (name == "") name = $2}
         /^  namespace: / {ns = $2}
         kind == "DaemonSet" && name != "" && ns != "" {print ns "/" name; kind = ""}' "$3" |
      while read -r daemonset; do
        mkdir -p "$STATE/daemonsets/${daemonset%/*}"
        touch "$STATE/daemonsets/$daemonset"
        echo "daemonset.apps/${daemonset#*/} created"
      done ;;
  *) echo "stub kubectl: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_SYSTEMCTL = r"""
config_of() {
  case "$1" in
    haproxy) echo /etc/haproxy/haproxy.cfg ;;
    keepalived) echo /etc/keepalived/keepalived.conf ;;
    *) echo "Failed: Unit $1.service not found." >&2; exit 5 ;;
  esac
}
units="$STATE/systemd"
case "$1" in
  is-active)
    has --quiet "$@" || exit 2
    config_of "${*: -1}" >/dev/null
    [ -e "$units/${*: -1}.active" ] ;;
  enable) config_of "$2" >/dev/null; mkdir -p "$units"; touch "$units/$2.enabled" ;;
  disable)
    has --now "$@" || exit 2
    config_of "${*: -1}" >/dev/null
    rm -f "$units/${*: -1}.enabled" "$units/${*: -1}.active" ;;
  reload-or-restart | restart)
    config="$(config_of "$2")"
    [ -r "$config" ] || { echo "Job for $2.service failed: no configuration file $config" >&2; exit 1; }
    mkdir -p "$units"
    sha256sum <"$config" | cut -d' ' -f1 >"$units/$2.loaded"
    touch "$units/$2.active" ;;
  *) echo "stub systemctl: unexpected call: $*" >&2; exit 2 ;;
esac
"""

_HAPROXY = r"""
has -c "$@" || { echo "stub haproxy: only configuration checks here" >&2; exit 2; }
config="$(opt -f "$@")" || exit 2
[ -r "$config" ] || { echo "[ALERT] Could not open configuration file $config" >&2; exit 1; }
grep -q '^frontend ' "$config" && grep -q '^backend ' "$config" \
  || { echo "[ALERT] Fatal errors found in configuration." >&2; exit 1; }
sha256sum <"$config" | cut -d' ' -f1 >>"$STATE/haproxy-checked"
"""

_KEEPALIVED = r"""
has --config-test "$@" || { echo "stub keepalived: only configuration tests here" >&2; exit 2; }
config="$(opt --use-file "$@")" || exit 2
[ -r "$config" ] || { echo "Configuration file '$config' does not exist" >&2; exit 1; }
# enable_script_security: a track script that others may modify, or that cannot run, is refused.
script="$(sed -n 's/^ *script "\(.*\)"$/\1/p' "$config")"
if [ -z "$script" ] || [ ! -x "$script" ] || [ -n "$(find "$script" -perm /022)" ]; then
  echo "SECURITY VIOLATION - script '$script' is unsafe or not executable" >&2
  exit 1
fi
sha256sum <"$config" | cut -d' ' -f1 >>"$STATE/keepalived-checked"
"""

_CLOUD_INIT = r"""
case "$*" in
  "status --wait")
    if [ -e "$STATE/cloud-init-hangs" ]; then exit 124; fi  # what `timeout` returns once the bound is reached
    if [ -e "$STATE/cloud-init-failed" ]; then printf '....\nstatus: error\n'; exit 1; fi
    if [ -e "$STATE/cloud-init-recoverable" ]; then printf '....\nstatus: done\n'; exit 2; fi
    printf '....\nstatus: done\n' ;;
  "status --long")
    if [ -e "$STATE/cloud-init-failed" ]; then
      printf 'status: error\nextended_status: error - done\ndetail: DataSourceNoCloud [seed=/dev/sr0]\n'
      printf 'errors:\n\t- (scripts_user) Failed to run module scripts_user\n'
      exit 1
    fi
    if [ -e "$STATE/cloud-init-recoverable" ]; then
      printf 'status: done\nrecoverable_errors:\nDEPRECATED:\n\t- a deprecated key\n'
      exit 2
    fi
    printf 'status: done\n' ;;
  *) echo "stub cloud-init: unexpected call: $*" >&2; exit 2 ;;
esac
"""

STUBS: dict[str, str | Stub] = {
    "kubeadm": _KUBEADM,
    "curl": _CURL,
    "kubectl": _KUBECTL,
    "systemctl": _SYSTEMCTL,
    "haproxy": _HAPROXY,
    "keepalived": _KEEPALIVED,
    "cloud-init": _CLOUD_INIT,
}


def _read_only(call: list[str]) -> bool:
    """Calls that change nothing: `systemctl is-active`, `kubectl get`, curl probes."""
    if call[:2] == ["systemctl", "is-active"]:
        return True
    if call[0] == "curl":
        return "--output" not in call
    if call[0] == "kubectl":
        words = [word for word in call[1:] if not word.startswith("--")]
        return "get" in words and "apply" not in words
    return False


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def sandbox(sandbox_support: None, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, STUBS)


def _run_first(
    sandbox: Sandbox, script: Script, *, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> list[list[str]]:
    return sandbox.run_first(script, stdin=stdin, env=env)


def _run_failing(
    sandbox: Sandbox, script: Script, *, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, list[list[str]]]:
    """Run the script expecting it to fail; its stderr and calls."""
    before = len(sandbox.call_lines())
    result = sandbox.run(script.render(), stdin=stdin, env=env)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "done on" not in result.stdout
    return result.stderr, sandbox.call_lines()[before:]


def _run_again(sandbox: Sandbox, script: Script, *, stdin: str | None = None) -> list[list[str]]:
    return sandbox.run_again(script, _read_only, stdin=stdin)


def _state_lines(sandbox: Sandbox, relative: str) -> list[str]:
    path = sandbox.state / relative
    return path.read_text().splitlines() if path.exists() else []


def _mode(sandbox: Sandbox, path: str) -> int:
    return sandbox.file(path).stat().st_mode & 0o7777


# ---------------------------------------------------------------- place the PKI

HOST = "staging-cp-2"


def _pem(kind: str, name: str) -> str:
    body = hashlib.sha256(name.encode()).hexdigest()
    return f"-----BEGIN {kind}-----\n{body}\n{body[:32]}\n-----END {kind}-----\n"


PKI = "/etc/kubernetes/pki"
CERTS = {
    f"{PKI}/ca.crt": _pem("CERTIFICATE", "cluster ca"),
    f"{PKI}/front-proxy-ca.crt": _pem("CERTIFICATE", "front-proxy ca"),
    f"{PKI}/etcd/ca.crt": _pem("CERTIFICATE", "etcd ca"),
    f"{PKI}/sa.pub": _pem("PUBLIC KEY", "service accounts"),
}
KEYS = {
    f"{PKI}/ca.key": _pem("PRIVATE KEY", "cluster ca"),
    f"{PKI}/front-proxy-ca.key": _pem("PRIVATE KEY", "front-proxy ca"),
    f"{PKI}/etcd/ca.key": _pem("PRIVATE KEY", "etcd ca"),
    f"{PKI}/sa.key": _pem("PRIVATE KEY", "service accounts"),
}
DIGESTS = {path: sha256_hex(content) for path, content in CERTS.items()}


def _pki_bundle(certs: Mapping[str, str] = CERTS) -> str:
    files = [BundleFile(path, content, 0o644) for path, content in sorted(certs.items())]
    files += [BundleFile(path, content, 0o600) for path, content in sorted(KEYS.items())]
    return encode_bundle(files)


def test_place_pki_installs_every_file_with_its_mode_then_does_nothing(sandbox: Sandbox):
    script = place_pki_script(HOST, DIGESTS, list(KEYS))
    bundle = _pki_bundle()
    assert _run_first(sandbox, script, stdin=bundle) == []
    for path, content in CERTS.items():
        assert sandbox.file(path).read_text() == content
        assert _mode(sandbox, path) == 0o644, path
    for path, content in KEYS.items():
        assert sandbox.file(path).read_text() == content
        assert _mode(sandbox, path) == 0o600, path
    # Nothing else: no temp file of the atomic writes is left behind.
    placed = {path for path in sandbox.snapshot() if path.startswith(f"{PKI}/") and sandbox.file(path).is_file()}
    assert placed == {*CERTS, *KEYS}
    assert "PRIVATE KEY" not in script.render()  # keys only ever arrive on stdin

    assert _run_again(sandbox, script, stdin=bundle) == []


def test_place_pki_refuses_a_certificate_that_does_not_match_the_digests(sandbox: Sandbox):
    script = place_pki_script(HOST, DIGESTS, list(KEYS))
    torn = {**CERTS, f"{PKI}/ca.crt": _pem("CERTIFICATE", "some other ca")}
    stderr, calls = _run_failing(sandbox, script, stdin=_pki_bundle(torn))
    assert "kubeadm-ha: placed certificates do not match on " in stderr and "(step place-pki)" in stderr
    assert calls == []
    # The right bundle then places it, and the step is done.
    _run_first(sandbox, script, stdin=_pki_bundle())
    assert sandbox.file(f"{PKI}/ca.crt").read_text() == CERTS[f"{PKI}/ca.crt"]
    _run_again(sandbox, script, stdin=_pki_bundle())


def test_place_pki_redoes_a_node_whose_key_is_missing(sandbox: Sandbox):
    script = place_pki_script(HOST, DIGESTS, list(KEYS))
    _run_first(sandbox, script, stdin=_pki_bundle())
    sandbox.file(f"{PKI}/sa.key").unlink()
    _run_first(sandbox, script, stdin=_pki_bundle())
    assert sandbox.file(f"{PKI}/sa.key").read_text() == KEYS[f"{PKI}/sa.key"]
    assert _mode(sandbox, f"{PKI}/sa.key") == 0o600


# ---------------------------------------------------------------- kubeadm join

JOIN = ["kubeadm", "join", "--config", JOIN_CONFIG_PATH]
INIT = ["kubeadm", "init", "--config", INIT_CONFIG_PATH, "--skip-token-print"]
JOIN_BUNDLE = encode_bundle([BundleFile(JOIN_CONFIG_PATH, JOIN_DOCUMENT, 0o600)])
# What kubeadm read: the document, from a file only root can read.
JOIN_READ = f"{sha256_hex(JOIN_DOCUMENT)} 600"
INIT_READ = f"{sha256_hex(INIT_DOCUMENT)} 600"


def _api_answers(sandbox: Sandbox, *urls: str) -> None:
    sandbox.put_state("answering", "".join(f"{url}\n" for url in urls))


def test_join_reads_the_config_from_stdin_removes_it_then_does_nothing(sandbox: Sandbox):
    _api_answers(sandbox, f"https://{ENDPOINT}/readyz")
    script = kubeadm_join_script(HOST, worker=False)
    assert _run_first(sandbox, script, stdin=JOIN_BUNDLE) == [JOIN]
    assert _state_lines(sandbox, "join-configs-read") == [JOIN_READ]
    assert sandbox.exists(KUBELET_KUBECONFIG)
    assert not sandbox.exists(JOIN_CONFIG_PATH)
    assert TOKEN not in script.render()

    assert _run_again(sandbox, script, stdin=JOIN_BUNDLE) == []


def test_a_failed_join_shows_the_log_tail_without_tokens_and_removes_the_config(sandbox: Sandbox):
    script = kubeadm_join_script(HOST, worker=False)
    stderr, calls = _run_failing(sandbox, script, stdin=JOIN_BUNDLE)
    assert calls == [JOIN]
    assert f"kubeadm-ha: kubeadm failed on {HOST} during kubeadm-join; last lines of {LOG_DIR}/kubeadm-join.log:" in (
        stderr
    )
    assert "[discovery] Using bootstrap token <redacted-token>" in stderr
    assert "couldn't validate the identity of the API Server" in stderr
    assert f"kubeadm-ha: step kubeadm-join failed on host {HOST} (exit 1 at line" in stderr
    assert TOKEN not in stderr
    # The full log stays on the node, readable by root only.
    assert _mode(sandbox, f"{LOG_DIR}/kubeadm-join.log") == 0o600
    # The document holds the token: gone however the step ends.
    assert not sandbox.exists(JOIN_CONFIG_PATH)
    assert not sandbox.exists(KUBELET_KUBECONFIG)

    # Once the API answers, a re-run joins.
    _api_answers(sandbox, f"https://{ENDPOINT}/readyz")
    assert _run_first(sandbox, script, stdin=JOIN_BUNDLE) == [JOIN]
    assert _run_again(sandbox, script, stdin=JOIN_BUNDLE) == []


# ---------------------------------------------------------------- first control plane: init or join

FIRST = "staging-cp-1"
INIT_BUNDLE = encode_bundle(
    [BundleFile(INIT_CONFIG_PATH, INIT_DOCUMENT, 0o600), BundleFile(JOIN_CONFIG_PATH, JOIN_DOCUMENT, 0o600)]
)
API_URLS = [f"https://{ENDPOINT}/readyz", *(f"https://{peer}:6443/readyz" for peer in PEERS)]
PROBES = [["curl", "--silent", "--fail", "--max-time", "5", "--cacert", CA_CERT, url] for url in API_URLS]


def _etcd_port_open(address: str) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((address, 2379)) == 0


@contextlib.contextmanager
def _etcd_listening(address: str) -> Iterator[None]:
    """A real listener on ADDRESS:2379 for the block; the script's `/dev/tcp` probe connects to it."""
    with socket.create_server((address, 2379), backlog=16):
        yield


@pytest.fixture
def first_cp(sandbox: Sandbox) -> Sandbox:
    """The first control plane, its PKI placed; no peer's etcd port is open."""
    for peer in PEERS:
        if _etcd_port_open(peer):
            pytest.fail(f"something listens on {peer}:2379; the etcd probe would see it")
    sandbox.put(CA_CERT, CERTS[CA_CERT], 0o644)
    return sandbox


def _first_script(*, stacked_etcd: bool = True) -> Script:
    return first_control_plane_script(FIRST, ENDPOINT, PEERS, stacked_etcd=stacked_etcd)


def _no_configs_left(sandbox: Sandbox) -> None:
    assert not sandbox.exists(INIT_CONFIG_PATH)
    assert not sandbox.exists(JOIN_CONFIG_PATH)


def test_init_when_nothing_answers_then_does_nothing(first_cp: Sandbox):
    script = _first_script()
    assert _run_first(first_cp, script, stdin=INIT_BUNDLE) == [*PROBES, INIT]
    assert _state_lines(first_cp, "init-configs-read") == [INIT_READ]
    assert _state_lines(first_cp, "join-configs-read") == []
    assert first_cp.exists(KUBELET_KUBECONFIG)
    _no_configs_left(first_cp)
    assert TOKEN not in script.render()

    assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


def test_the_first_control_plane_never_runs_kubeadm_without_the_shared_keys(first_cp: Sandbox):
    """Without ca.key kubeadm init would make a CA of its own, which the program's join discovery does not trust:
    a first control plane whose placed keys are gone (kubeadm reset) stops before kubeadm and names the step."""
    pki = PlacedPki(f"{FIRST}-place-pki", tuple(KEYS))
    script = first_control_plane_script(FIRST, ENDPOINT, PEERS, stacked_etcd=True, pki=pki)
    stderr, calls = _run_failing(first_cp, script, stdin=INIT_BUNDLE)
    assert calls == []
    assert f"the shared certificates are missing on {FIRST}" in stderr and f"{FIRST}-place-pki" in stderr
    for path, content in KEYS.items():
        first_cp.put(path, content, 0o600)
    assert _run_first(first_cp, script, stdin=INIT_BUNDLE) == [*PROBES, INIT]


@pytest.mark.parametrize("answering", [0, 1, 2], ids=["endpoint", "first-peer", "second-peer"])
def test_join_when_the_api_answers_then_does_nothing(first_cp: Sandbox, answering: int):
    _api_answers(first_cp, API_URLS[answering])
    script = _first_script()
    # The probes stop at the first answer; the open etcd port does not matter then.
    with _etcd_listening(PEERS[0]):
        assert _run_first(first_cp, script, stdin=INIT_BUNDLE) == [*PROBES[: answering + 1], JOIN]
    assert _state_lines(first_cp, "join-configs-read") == [JOIN_READ]
    assert _state_lines(first_cp, "init-configs-read") == []
    assert first_cp.exists(KUBELET_KUBECONFIG)
    _no_configs_left(first_cp)

    assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


@pytest.mark.parametrize("peer", PEERS)
def test_init_is_refused_while_a_peer_etcd_port_is_open(first_cp: Sandbox, peer: str):
    script = _first_script()
    for _ in range(2):  # the refusal is not remembered: a re-run refuses again
        with _etcd_listening(peer):
            stderr, calls = _run_failing(first_cp, script, stdin=INIT_BUNDLE)
        assert calls == PROBES
        assert "the API does not answer but another control plane's etcd does" in stderr
        assert "refusing to run kubeadm init against a cluster that already exists" in stderr
        assert _state_lines(first_cp, "init-configs-read") == []
        assert _state_lines(first_cp, "join-configs-read") == []
        assert not first_cp.exists(KUBELET_KUBECONFIG)
        _no_configs_left(first_cp)

    # Once the cluster's API is back, the node joins it.
    _api_answers(first_cp, API_URLS[0])
    with _etcd_listening(peer):
        assert _run_first(first_cp, script, stdin=INIT_BUNDLE) == [PROBES[0], JOIN]
        assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


def test_with_external_etcd_no_etcd_port_is_probed(first_cp: Sandbox):
    script = _first_script(stacked_etcd=False)
    assert "/dev/tcp/" not in script.render()
    with _etcd_listening(PEERS[0]):
        assert _run_first(first_cp, script, stdin=INIT_BUNDLE) == [*PROBES, INIT]
    _no_configs_left(first_cp)
    assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


# ---------------------------------------------------------------- a kubeadm that stopped halfway

RESUME = [*INIT, "--skip-phases=preflight"]


def test_an_init_that_failed_after_writing_kubelet_conf_is_run_again_not_taken_as_done(first_cp: Sandbox):
    """Found by the cluster lab: `kubeadm init` missed its wait-control-plane deadline on a loaded machine,
    after its kubeconfig phase had written kubelet.conf, and the next `pulumi up` said "already done"."""
    script = _first_script()
    first_cp.put_state("fails-after-kubeconfig")
    stderr, calls = _run_failing(first_cp, script, stdin=INIT_BUNDLE)
    assert calls == [*PROBES, INIT]
    assert "error execution phase wait-control-plane" in stderr
    assert first_cp.exists(KUBELET_KUBECONFIG)

    # The next run takes the init up again, past the preflight checks that refuse a begun node, and not by
    # way of a join, though this node's own API may answer through the endpoint by then.
    (first_cp.state / "fails-after-kubeconfig").unlink()
    _api_answers(first_cp, API_URLS[0])
    result = first_cp.run(script.render(), stdin=INIT_BUNDLE)
    assert result.returncode == 0, result.stderr
    assert f"the kubeadm init on {FIRST} started and did not finish" in result.stdout
    assert first_cp.call_lines()[-1:] == [RESUME]
    assert _state_lines(first_cp, "join-configs-read") == []
    _no_configs_left(first_cp)
    assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


def test_an_init_that_stopped_in_preflight_runs_again_with_its_checks(first_cp: Sandbox):
    script = _first_script()
    first_cp.put_state("fails-in-preflight")
    stderr, calls = _run_failing(first_cp, script, stdin=INIT_BUNDLE)
    assert calls == [*PROBES, INIT] and "[ERROR CRI]" in stderr
    (first_cp.state / "fails-in-preflight").unlink()
    result = first_cp.run(script.render(), stdin=INIT_BUNDLE)
    assert result.returncode == 0, result.stderr
    assert f"the kubeadm init on {FIRST} stopped before it changed anything; running it again" in result.stdout
    assert first_cp.call_lines()[-4:] == [*PROBES, INIT]
    assert _run_again(first_cp, script, stdin=INIT_BUNDLE) == []


@pytest.mark.parametrize("worker", [False, True], ids=["control-plane", "worker"])
def test_a_join_that_failed_after_writing_kubelet_conf_is_not_taken_as_done(sandbox: Sandbox, worker: bool):
    """A control plane's join can stop after kubelet.conf, in control-plane-join (its etcd member perhaps
    added): it is refused with what to do, never called done. A worker's join is kubelet's TLS bootstrap, so
    kubelet.conf there means the node has joined."""
    _api_answers(sandbox, f"https://{ENDPOINT}/readyz")
    sandbox.put_state("fails-after-kubeconfig")
    script = kubeadm_join_script(HOST, worker=worker)
    stderr, calls = _run_failing(sandbox, script, stdin=JOIN_BUNDLE)
    assert "error execution phase control-plane-join" in stderr
    assert calls == [JOIN]
    (sandbox.state / "fails-after-kubeconfig").unlink()
    before = len(sandbox.call_lines())
    result = sandbox.run(script.render(), stdin=JOIN_BUNDLE)
    assert sandbox.call_lines()[before:] == []  # kubeadm is not run again either way
    assert not sandbox.exists(JOIN_CONFIG_PATH)
    if worker:
        assert result.returncode == 0, result.stderr
        assert f"kubelet on {HOST} finished its TLS bootstrap after kubeadm join gave up" in result.stdout
        assert _run_again(sandbox, script, stdin=JOIN_BUNDLE) == []
    else:
        assert result.returncode == 1
        assert f"a kubeadm join on {HOST} started and did not finish" in result.stderr
        assert "Run kubeadm reset --force on the node, or replace its VM" in result.stderr
        assert TOKEN not in result.stdout + result.stderr


def test_a_control_plane_reset_after_a_failed_join_is_told_to_place_its_certificates_again(sandbox: Sandbox):
    """Cluster lab run 20: the refusal above said "Run kubeadm reset --force on the node ... then pulumi up
    again". kubeadm reset also deletes /etc/kubernetes/pki, where the place-pki step (recorded as done, so not run
    again) had put the shared certificates, and the next join failed in real kubeadm's preflight ("failure loading
    certificate for CA ... no such file or directory"). The refusal now names that step to replace, and a join
    whose shared keys are gone stops before kubeadm and says so."""
    pki = PlacedPki(f"{HOST}-place-pki", tuple(KEYS))
    for path, content in {**CERTS, **KEYS}.items():
        sandbox.put(path, content, 0o600)
    _api_answers(sandbox, f"https://{ENDPOINT}/readyz")
    sandbox.put_state("fails-after-kubeconfig")
    script = kubeadm_join_script(HOST, worker=False, pki=pki)
    _, calls = _run_failing(sandbox, script, stdin=JOIN_BUNDLE)
    assert calls == [JOIN]
    (sandbox.state / "fails-after-kubeconfig").unlink()
    replace = f"pulumi up --replace with the URN of its {HOST}-place-pki step (pulumi stack --show-urns)"
    stderr, calls = _run_failing(sandbox, script, stdin=JOIN_BUNDLE)
    assert f"Run kubeadm reset --force on the node and {replace}, or replace its VM" in stderr
    assert calls == []
    # What `kubeadm reset --force` deletes: the kubeconfigs and everything under /etc/kubernetes/pki.
    for path in (KUBELET_KUBECONFIG, *CERTS, *KEYS):
        sandbox.file(path).unlink()
    stderr, calls = _run_failing(sandbox, script, stdin=JOIN_BUNDLE)
    assert calls == []  # not kubeadm's own preflight failure
    assert (
        f"kubeadm-ha: the shared certificates are missing on {HOST}, and kubeadm needs them to make this node a "
        f"control plane of the cluster ({HOST}-place-pki placed them in /etc/kubernetes/pki; kubeadm reset deletes "
        f"them). Run {replace}"
    ) in stderr
    assert TOKEN not in stderr
    # The replaced place-pki step puts them back; the join then runs.
    for path, content in {**CERTS, **KEYS}.items():
        sandbox.put(path, content, 0o600)
    before = len(sandbox.call_lines())
    result = sandbox.run(script.render(), stdin=JOIN_BUNDLE)
    assert result.returncode == 0, result.stderr
    assert sandbox.call_lines()[before:] == [JOIN]
    assert _run_again(sandbox, script, stdin=JOIN_BUNDLE) == []


@pytest.mark.parametrize("which", ["init", "join"])
def test_a_node_bootstrapped_before_the_record_existed_is_left_alone(sandbox: Sandbox, which: str):
    """Running clusters' nodes have kubelet.conf and no record: the changed step is a no-op there."""
    sandbox.put(CA_CERT, CERTS[CA_CERT], 0o644)
    sandbox.put(KUBELET_KUBECONFIG, "kind: Config\n", 0o600)
    script = _first_script() if which == "init" else kubeadm_join_script(HOST, worker=False)
    result = sandbox.run(script.render(), stdin=INIT_BUNDLE if which == "init" else JOIN_BUNDLE)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    assert sandbox.call_lines() == []


# ---------------------------------------------------------------- load balancer

LB = "staging-lb-1"
CHECK_HAPROXY = ["haproxy", "-c", "-q", "-f", HAPROXY_CFG_PATH]
CHECK_KEEPALIVED = ["keepalived", "--config-test", "--use-file", KEEPALIVED_CONF_PATH]
HAPROXY_UP = [["systemctl", "enable", "haproxy"], ["systemctl", "reload-or-restart", "haproxy"]]
KEEPALIVED_UP = [["systemctl", "enable", "keepalived"], ["systemctl", "restart", "keepalived"]]
IS_ACTIVE = [["systemctl", "is-active", "--quiet", "haproxy"], ["systemctl", "is-active", "--quiet", "keepalived"]]


def _lb_files(config: ClusterConfig, hostname: str) -> tuple[BundleFile, ...]:
    plan = plan_addresses(config)
    node = next(node for node in plan.load_balancers if node.hostname == hostname)
    return lb_node_files(config.cluster_name, config.load_balancer.port, plan, node)


def _with_control_planes(config: ClusterConfig, replicas: int) -> ClusterConfig:
    return config.model_copy(update={"control_plane": config.control_plane.model_copy(update={"replicas": replicas})})


def _assert_installed(sandbox: Sandbox, files: tuple[BundleFile, ...]) -> None:
    for item in files:
        assert sandbox.file(item.path).read_text() == item.content, item.path
        assert _mode(sandbox, item.path) == item.mode, item.path


def _loaded(sandbox: Sandbox, unit: str) -> str | None:
    path = sandbox.state / "systemd" / f"{unit}.loaded"
    return path.read_text().strip() if path.exists() else None


def test_lb_installs_checks_then_restarts_then_does_nothing(sandbox: Sandbox):
    files = _lb_files(stack_config("staging"), LB)
    by_path = {item.path: item for item in files}
    assert set(by_path) == {HAPROXY_CFG_PATH, KEEPALIVED_CONF_PATH, KEEPALIVED_CHECK_SCRIPT_PATH}
    assert by_path[KEEPALIVED_CHECK_SCRIPT_PATH].mode == 0o755
    script = lb_config_script(LB, files)
    bundle = encode_bundle(files)

    assert _run_first(sandbox, script, stdin=bundle) == [CHECK_HAPROXY, *HAPROXY_UP, CHECK_KEEPALIVED, *KEEPALIVED_UP]
    _assert_installed(sandbox, files)
    # The checkers read the installed files, and the daemons were (re)started with exactly those.
    haproxy_digest = sha256_hex(by_path[HAPROXY_CFG_PATH].content)
    keepalived_digest = sha256_hex(by_path[KEEPALIVED_CONF_PATH].content)
    assert _state_lines(sandbox, "haproxy-checked") == [haproxy_digest]
    assert _state_lines(sandbox, "keepalived-checked") == [keepalived_digest]
    assert _loaded(sandbox, "haproxy") == haproxy_digest
    assert _loaded(sandbox, "keepalived") == keepalived_digest

    assert _run_again(sandbox, script, stdin=bundle) == IS_ACTIVE


def test_lb_with_a_new_backend_set_runs_again(sandbox: Sandbox):
    config = stack_config("staging")
    old = _lb_files(config, LB)
    _run_first(sandbox, lb_config_script(LB, old), stdin=encode_bundle(old))

    new = _lb_files(_with_control_planes(config, 5), LB)
    new_haproxy = next(item for item in new if item.path == HAPROXY_CFG_PATH).content
    assert new_haproxy.count("server staging-cp-") == 5 * 2  # the checked and the fail-open backend
    script = lb_config_script(LB, new)
    assert script.render() != lb_config_script(LB, old).render()
    calls = _run_first(sandbox, script, stdin=encode_bundle(new))
    assert calls == [CHECK_HAPROXY, *HAPROXY_UP, CHECK_KEEPALIVED, *KEEPALIVED_UP]
    _assert_installed(sandbox, new)
    assert _loaded(sandbox, "haproxy") == sha256_hex(new_haproxy)
    assert _run_again(sandbox, script, stdin=encode_bundle(new)) == IS_ACTIVE


@pytest.mark.parametrize(
    ("rejecting", "reached"),
    [("haproxy", [CHECK_HAPROXY]), ("keepalived", [CHECK_HAPROXY, *HAPROXY_UP, CHECK_KEEPALIVED])],
)
def test_a_rejected_lb_config_restarts_nothing_and_is_not_taken_for_done(
    sandbox: Sandbox, rejecting: str, reached: list[list[str]]
):
    config = stack_config("staging")
    old = _lb_files(config, LB)
    _run_first(sandbox, lb_config_script(LB, old), stdin=encode_bundle(old))
    loaded_before = {unit: _loaded(sandbox, unit) for unit in ("haproxy", "keepalived")}

    new = _lb_files(_with_control_planes(config, 5), LB)
    script = lb_config_script(LB, new)
    stderr, calls = _run_failing(sandbox, script, stdin=encode_bundle(new), env={"STUB_FAIL": rejecting})
    assert calls == reached
    assert f"kubeadm-ha: step configure-lb failed on host {LB} (exit 42" in stderr
    assert _loaded(sandbox, "keepalived") == loaded_before["keepalived"]
    if rejecting == "haproxy":
        assert _loaded(sandbox, "haproxy") == loaded_before["haproxy"]

    # The rejected files were installed, but the step did not happen: a re-run checks and restarts again.
    assert _run_first(sandbox, script, stdin=encode_bundle(new)) == [
        CHECK_HAPROXY,
        *HAPROXY_UP,
        CHECK_KEEPALIVED,
        *KEEPALIVED_UP,
    ]
    assert _loaded(sandbox, "haproxy") == sha256_hex(next(i for i in new if i.path == HAPROXY_CFG_PATH).content)
    assert _run_again(sandbox, script, stdin=encode_bundle(new)) == IS_ACTIVE


def test_a_lone_lb_runs_haproxy_only_and_keeps_keepalived_disabled(sandbox: Sandbox):
    config = stack_config("dev")
    plan = plan_addresses(config)
    assert len(plan.load_balancers) == 1
    hostname = plan.load_balancers[0].hostname
    files = _lb_files(config, hostname)
    assert [item.path for item in files] == [HAPROXY_CFG_PATH]
    # A node that used to hold the VIP with a peer (scaled down from two load balancers).
    sandbox.put_state("systemd/keepalived.enabled")
    sandbox.put_state("systemd/keepalived.active")
    script = lb_config_script(hostname, files)
    bundle = encode_bundle(files)

    assert _run_first(sandbox, script, stdin=bundle) == [
        CHECK_HAPROXY,
        *HAPROXY_UP,
        ["systemctl", "disable", "--now", "keepalived"],
    ]
    _assert_installed(sandbox, files)
    assert not sandbox.exists(KEEPALIVED_CONF_PATH)
    assert not sandbox.exists(KEEPALIVED_CHECK_SCRIPT_PATH)
    assert not any(call[0] == "keepalived" for call in sandbox.call_lines())
    assert sorted(path.name for path in (sandbox.state / "systemd").iterdir()) == [
        "haproxy.active",
        "haproxy.enabled",
        "haproxy.loaded",
    ]

    assert _run_again(sandbox, script, stdin=bundle) == IS_ACTIVE[:1]


# ---------------------------------------------------------------- CNI

CALICO_UPSTREAM = """\
---
# Source: calico/templates/calico-node.yaml
kind: DaemonSet
apiVersion: apps/v1
metadata:
  name: calico-node
  namespace: kube-system
spec:
  template:
    spec:
      containers:
        - name: calico-node
          env:
            # The default IPv4 pool to create on startup if none exists. Pod IPs will be
            # chosen from this range. Changing this value after installation will have
            # no effect. This should fall within `--cluster-cidr`.
            # - name: CALICO_IPV4POOL_CIDR
            #   value: "192.168.0.0/16"
            - name: CALICO_DISABLE_FILE_LOGGING
              value: "true"
"""

FLANNEL_UPSTREAM = """\
---
kind: Namespace
apiVersion: v1
metadata:
  name: kube-flannel
---
kind: ConfigMap
apiVersion: v1
metadata:
  name: kube-flannel-cfg
  namespace: kube-flannel
data:
  net-conf.json: |
    {
      "Network": "10.244.0.0/16",
      "EnableNFTables": false,
      "Backend": {
        "Type": "vxlan"
      }
    }
---
kind: DaemonSet
apiVersion: apps/v1
metadata:
  name: kube-flannel-ds
  namespace: kube-flannel
spec:
  template:
    spec:
      containers:
        - name: kube-flannel
"""

CNI_HOST = "staging-cp-1"
KUBECTL = ["kubectl", "--kubeconfig", ADMIN_KUBECONFIG]


def _cni(name: str, cidr: str, served: str) -> tuple[CniManifest, Script, str]:
    """The step for `name`, with the manifest the stub internet serves (`served`) as the pinned one."""
    upstream = manifest_for(name, cidr)
    assert upstream is not None
    manifest = dataclasses.replace(upstream, sha256=sha256_hex(served))
    return manifest, cni_script(CNI_HOST, manifest, cidr), f"{STATE_DIR}/cni-{name}.yaml"


def _cni_calls(manifest: CniManifest, path: str) -> tuple[list[str], list[str], list[str]]:
    get = [*KUBECTL, "--namespace", manifest.namespace, "get", "daemonset", manifest.daemonset]
    download = ["curl", "--fail", "--silent", "--show-error", "--location", "--proto", "=https"]
    download += ["--connect-timeout", "15", "--max-time", "120", "--retry", "5", "--retry-delay", "5"]
    download += ["--retry-all-errors", "--output", path + ".download", manifest.url]
    return get, download, [*KUBECTL, f"--request-timeout={APPLY_REQUEST_TIMEOUT}", "apply", "--filename", path]


@pytest.fixture
def cni_node(sandbox: Sandbox) -> Sandbox:
    """The first control plane after `kubeadm init`: it has the admin kubeconfig."""
    sandbox.put(ADMIN_KUBECONFIG, "apiVersion: v1\nkind: Config\n")
    return sandbox


def _publish(sandbox: Sandbox, manifest: CniManifest, content: str) -> None:
    sandbox.put_state(f"internet/{manifest.url.rsplit('/', 1)[1]}", content)


def _applied(sandbox: Sandbox, path: str) -> str:
    return (sandbox.state / "applied" / path.rsplit("/", 1)[1]).read_text()


def test_calico_gets_the_pod_subnet_then_does_nothing(cni_node: Sandbox):
    cidr = "10.244.0.0/16"
    manifest, script, path = _cni("calico", cidr, CALICO_UPSTREAM)
    _publish(cni_node, manifest, CALICO_UPSTREAM)
    get, download, apply = _cni_calls(manifest, path)
    assert _run_first(cni_node, script) == [get, download, apply]

    applied = _applied(cni_node, path)
    assert applied == CALICO_UPSTREAM.replace("# - name: CALICO_IPV4POOL_CIDR", "- name: CALICO_IPV4POOL_CIDR").replace(
        '#   value: "192.168.0.0/16"', f'  value: "{cidr}"'
    )
    (daemonset,) = [doc for doc in yaml.safe_load_all(applied) if doc]
    env = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "CALICO_IPV4POOL_CIDR", "value": cidr} in env
    assert (cni_node.state / "daemonsets" / "kube-system" / "calico-node").exists()

    assert _run_again(cni_node, script) == [get]


def test_flannel_gets_a_non_default_pod_subnet_then_does_nothing(cni_node: Sandbox):
    cidr = "10.32.0.0/16"
    manifest, script, path = _cni("flannel", cidr, FLANNEL_UPSTREAM)
    _publish(cni_node, manifest, FLANNEL_UPSTREAM)
    get, download, apply = _cni_calls(manifest, path)
    assert _run_first(cni_node, script) == [get, download, apply]

    applied = _applied(cni_node, path)
    assert applied == FLANNEL_UPSTREAM.replace('"Network": "10.244.0.0/16"', f'"Network": "{cidr}"')
    config_map = next(doc for doc in yaml.safe_load_all(applied) if doc["kind"] == "ConfigMap")
    assert json.loads(config_map["data"]["net-conf.json"])["Network"] == cidr
    assert (cni_node.state / "daemonsets" / "kube-flannel" / "kube-flannel-ds").exists()

    assert _run_again(cni_node, script) == [get]


@pytest.mark.parametrize("refusals", [3, APPLY_ATTEMPTS])
def test_an_apply_the_restarting_api_server_refuses_is_tried_again_within_a_bound(
    sandbox_support: None, tmp_path: Path, refusals: int
):
    """Lab run 21: the first API server restarted while the flannel manifest was applied, and the one `kubectl
    apply` failed the whole `pulumi up` (403 from the restarted server before its RBAC cache had synced). The
    apply is tried again, a bounded number of times; past the bound the step fails naming the host."""
    node = Sandbox(tmp_path / "cni", {**STUBS, "sleep": RECORD_ONLY})
    node.put(ADMIN_KUBECONFIG, "apiVersion: v1\nkind: Config\n")
    manifest, script, path = _cni("flannel", "10.244.0.0/16", FLANNEL_UPSTREAM)
    _publish(node, manifest, FLANNEL_UPSTREAM)
    node.put_state("apply-fails", str(refusals))
    get, download, apply = _cni_calls(manifest, path)
    result = node.run(script.render())
    calls = node.call_lines()
    retrying = f"failed (attempt 1 of {APPLY_ATTEMPTS}); retrying in {APPLY_PAUSE_SECONDS} s"
    assert f"kubeadm-ha: applying the flannel manifest on {CNI_HOST} {retrying}" in result.stderr
    assert "is forbidden" in result.stderr  # each failed attempt shows kubectl's own words
    if refusals < APPLY_ATTEMPTS:
        assert result.returncode == 0, result.stderr
        assert [call for call in calls if call[0] != "sleep"] == [get, download, *[apply] * (refusals + 1)]
        assert calls.count(["sleep", str(APPLY_PAUSE_SECONDS)]) == refusals
        assert (node.state / "daemonsets" / "kube-flannel" / "kube-flannel-ds").exists()
        assert _run_again(node, script) == [get]
    else:
        assert result.returncode != 0
        assert f"applying the flannel manifest on {CNI_HOST} failed {APPLY_ATTEMPTS} times; giving up" in result.stderr
        assert calls.count(apply) == APPLY_ATTEMPTS
        assert not (node.state / "daemonsets").exists()


@pytest.mark.parametrize(
    ("name", "cidr", "upstream"),
    [
        ("calico", "10.244.0.0/16", CALICO_UPSTREAM.replace('"192.168.0.0/16"', '"192.168.0.0/24"')),
        ("flannel", "10.32.0.0/16", FLANNEL_UPSTREAM.replace('"Network": "10.244.0.0/16"', '"Network": "10.1.0.0/16"')),
        # The value line alone would carry the CIDR while the variable stayed commented out: refused too.
        ("calico", "10.244.0.0/16", CALICO_UPSTREAM.replace("# - name: CALICO_IPV4POOL_CIDR", "# - name: OTHER")),
        # The default pod subnet needs no edit, but the line must still be there.
        (
            "flannel",
            "10.244.0.0/16",
            FLANNEL_UPSTREAM.replace('"Network": "10.244.0.0/16"', '"Network": "10.1.0.0/16"'),
        ),
    ],
)
def test_a_manifest_without_the_default_cidr_is_not_applied(cni_node: Sandbox, name: str, cidr: str, upstream: str):
    manifest, script, path = _cni(name, cidr, upstream)
    _publish(cni_node, manifest, upstream)
    get, download, _ = _cni_calls(manifest, path)
    stderr, calls = _run_failing(cni_node, script)
    assert calls == [get, download]
    assert f"kubeadm-ha: {name} manifest did not take pod subnet {cidr}" in stderr
    assert not (cni_node.state / "applied").exists()
    assert not (cni_node.state / "daemonsets").exists()


@pytest.mark.parametrize("name", ["calico", "flannel"])
def test_a_manifest_other_than_the_pinned_one_is_refused_naming_host_and_file(cni_node: Sandbox, name: str):
    upstream = CALICO_UPSTREAM if name == "calico" else FLANNEL_UPSTREAM
    manifest, script, path = _cni(name, "10.244.0.0/16", upstream)
    _publish(cni_node, manifest, upstream + "# one line more than the pinned release\n")
    get, download, _ = _cni_calls(manifest, path)
    stderr, calls = _run_failing(cni_node, script)
    assert calls == [get, download]
    assert f"on {CNI_HOST}: {manifest.url} (for {path}) does not have the pinned SHA-256" in stderr
    assert not cni_node.exists(path) and not cni_node.exists(path + ".download")
    assert not (cni_node.state / "applied").exists()


def test_the_pinned_releases_are_current() -> None:
    # Issue 8: Calico 3.31 or newer, flannel 0.28 or newer, each with a SHA-256 the step checks.
    calico, flannel = manifest_for("calico", "10.244.0.0/16"), manifest_for("flannel", "10.244.0.0/16")
    assert calico is not None and flannel is not None
    assert "/v3.32.1/" in calico.url and "/v0.28.10/" in flannel.url
    assert all(len(m.sha256) == 64 for m in (calico, flannel))


# ---------------------------------------------------------------- cloud-init

WAIT = ["cloud-init", "status", "--wait"]


def test_readiness_waits_for_cloud_init_then_does_nothing(sandbox: Sandbox):
    sandbox.put(PREPARED_MARKER, "kubernetes-node 1.34.2-1.1\n")
    script = readiness_script(HOST)
    assert _run_first(sandbox, script) == [WAIT]
    assert sandbox.exists(READY_MARKER)
    assert _run_again(sandbox, script) == []


def test_recoverable_cloud_init_errors_are_shown_not_fatal(sandbox: Sandbox):
    sandbox.put(PREPARED_MARKER, "kubernetes-node 1.34.2-1.1\n")
    sandbox.put_state("cloud-init-recoverable")
    result = sandbox.run(readiness_script(HOST).render())
    assert result.returncode == 0, result.stderr
    assert f"cloud-init finished with recoverable errors on {HOST}" in result.stderr
    assert "a deprecated key" in result.stderr
    assert sandbox.exists(READY_MARKER)


# The preparation script cloud-init ran is on the node at PREPARATION_PATH (outside the sandbox's overlays, so a
# tmpfs is mounted there inside the namespace). This one records its runs, logs like the real one, and writes
# the marker unless `prep-fails` is set.
_PREPARATION = f"""#!/bin/bash
echo run >>"$STUB_STATE/prep-runs"
mkdir -p {LOG_DIR}
if [ -e "$STUB_STATE/prep-fails" ]; then
  echo "E: Failed to fetch http://archive.ubuntu.com/ubuntu/pool/main/c/containerd.deb  Connection timed out" \\
    >>{LOG_DIR}/node-prep.log
  exit 100
fi
mkdir -p {STATE_DIR}
echo "kubernetes-node 1.34.2-1.1" >{PREPARED_MARKER}
"""
_PLACE_PREPARATION = (
    f"mount -t tmpfs tmpfs {PREPARATION_PATH.rsplit('/', 1)[0]}\n"
    f"printf '%s' {shlex.quote(_PREPARATION)} >{PREPARATION_PATH}\nchmod 0700 {PREPARATION_PATH}"
)


def _preparation_runs(sandbox: Sandbox) -> int:
    return len(_state_lines(sandbox, "prep-runs"))


@pytest.mark.parametrize("cloud_init", ["done", "failed"])
def test_an_incomplete_node_preparation_is_run_again(sandbox: Sandbox, cloud_init: str):
    """The preparation ran once from cloud-init and failed (a mirror timed out, say): it is idempotent, so
    the readiness step runs it again; cloud-init's own error is shown, and the marker decides."""
    if cloud_init == "failed":
        sandbox.put_state("cloud-init-failed")
    script = readiness_script(HOST)
    result = sandbox.run(script.render(), setup=_PLACE_PREPARATION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"node preparation did not complete on {HOST}; running it again" in result.stderr
    assert _preparation_runs(sandbox) == 1
    assert sandbox.exists(READY_MARKER)
    assert _run_again(sandbox, script) == []


def test_a_preparation_that_fails_again_shows_the_tail_of_its_log(sandbox: Sandbox):
    sandbox.put_state("cloud-init-failed")
    sandbox.put_state("prep-fails")
    result = sandbox.run(readiness_script(HOST).render(), setup=_PLACE_PREPARATION)
    assert result.returncode != 0
    assert _preparation_runs(sandbox) == 1
    assert f"kubeadm-ha: cloud-init did not finish cleanly on {HOST}:" in result.stderr
    assert "(scripts_user) Failed to run module scripts_user" in result.stderr
    assert f"{LOG_DIR}/node-prep.log:" in result.stderr
    assert "E: Failed to fetch" in result.stderr
    assert f"step wait-for-cloud-init failed on host {HOST}" in result.stderr
    assert not sandbox.exists(READY_MARKER)


def test_a_cloud_init_that_does_not_finish_is_not_raced(sandbox: Sandbox):
    """Still running after the bound: the preparation may be running too, so it is not started again."""
    sandbox.put_state("cloud-init-hangs")
    stderr, calls = _run_failing(sandbox, readiness_script(HOST))
    assert calls == [WAIT, ["cloud-init", "status", "--long"]]
    assert f"kubeadm-ha: cloud-init did not finish within 1800 s on {HOST}" in stderr
    assert _preparation_runs(sandbox) == 0
    assert not sandbox.exists(READY_MARKER)
