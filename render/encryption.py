"""Secrets encrypted at rest: kube-apiserver's EncryptionConfiguration, and the steps that enable and rotate it
one control plane at a time (issue 20).

The provider is `secretbox` (XSalsa20 and Poly1305, 32-byte keys): authenticated, fast, and without `aesgcm`'s
need to rotate every 200k writes or `aescbc`'s padding-oracle weakness, which the Kubernetes documentation
("Encrypting Confidential Data at Rest", providers table) cites against both. Only Secrets are encrypted:
ConfigMaps are documented as non-confidential, and every other resource costs decryption on each read.

Each key generation `N` has the key named `key-N`. A control plane's file always ends with `identity`, so
whatever was written before encryption (or by a restore of an old snapshot) stays readable; writes use the
first entry. The file's first line lists the entries in order (`# kubeadm-ha keys: key-2 key-1 identity`),
which is what the steps' guards read: never the keys themselves.

Moving every control plane from the old entry `OLD` (`identity` when enabling, `key-M` when rotating) to
`key-N` takes four phases, each complete on every control plane before the next starts, so no API server ever
meets a Secret written with a key it does not hold:

1. `add`: `OLD key-N identity` (the new key readable everywhere, still unused);
2. `promote`: `key-N OLD identity` (new writes use it);
3. `rewrite` (on one control plane): every Secret read and written back, now with key-N;
4. `drop`: `key-N identity` (OLD gone from every node; the state keeps it, for old snapshots).

A phase writes the file, then restarts the API server (held out of the load balancers like every restart,
render/static_pods.py) if it already runs with the file; one that does not yet gets the flag, and the file, from
the control-plane settings step. A marker per pending restart lets a re-run finish a stopped one.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from render import hardening, static_pods, yamldoc
from render.kubeadm import CONFIG_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import INSTALL_BUNDLE_FUNCTION, STATE_DIR, Script, quote, retry_function
from render.scripts import command as shell

PROVIDER = "secretbox"
RESOURCES = ("secrets",)
CONFIG_DIR_ON_NODE = hardening.ENCRYPTION_CONFIG_DIR
CONFIG_PATH = hardening.ENCRYPTION_CONFIG_PATH
FLAG = hardening.ENCRYPTION_FLAG
IDENTITY = "identity"
HEADER = "# kubeadm-ha keys:"
HELD_DIR = f"{CONFIG_DIR}/encryption-held"
PENDING_DIR = f"{STATE_DIR}/encryption-pending"
REWRITTEN_MARKER = f"{STATE_DIR}/encryption-rewritten"
RESTARTS = static_pods.Restarts(HELD_DIR, PENDING_DIR, "restarted with the new encryption configuration")
ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"
Phase = Literal["add", "promote", "drop"]
REWRITE_ATTEMPTS = 5
REWRITE_PAUSE_SECONDS = 5


def key_name(generation: int) -> str:
    return f"key-{generation}"


@dataclass(frozen=True)
class Key:
    name: str
    secret: bytes = field(repr=False)  # 32 bytes; never in a repr (a traceback's arguments)

    def __post_init__(self) -> None:
        if len(self.secret) != 32:
            raise ValueError(f"{self.name}: a secretbox key is 32 bytes, not {len(self.secret)}")


def entries(phase: Phase, old: str, new: str) -> tuple[str, ...]:
    """The file's entries, in order, for `phase` of the move from `old` to `new`."""
    if phase == "add":
        middle: tuple[str, ...] = (old, new)
    elif phase == "promote":
        middle = (new, old)
    else:
        middle = (new,)
    return tuple(dict.fromkeys((*middle, IDENTITY)))


def configuration(order: Sequence[str], keys: Sequence[Key]) -> str:
    """The EncryptionConfiguration with `order` (key names and `identity`), from `keys` (every key named)."""
    by_name = {key.name: key for key in keys}
    providers: list[dict[str, object]] = []
    keyed: list[dict[str, str]] = []  # consecutive keys share one provider, as the documentation's examples do
    for name in order:
        if name == IDENTITY:
            if keyed:
                providers.append({PROVIDER: {"keys": keyed}})
                keyed = []
            providers.append({IDENTITY: {}})
        else:
            keyed.append({"name": name, "secret": base64.b64encode(by_name[name].secret).decode()})
    if keyed:
        providers.append({PROVIDER: {"keys": keyed}})
    document = {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{"resources": list(RESOURCES), "providers": providers}],
    }
    return f"{HEADER} {' '.join(order)}\n" + yamldoc.dump(document)


def _functions() -> tuple[str, ...]:
    return (
        *INSTALL_BUNDLE_FUNCTION,
        *static_pods.functions(),
        # The entries the node's file has, in order ("" without a file).
        "encryption_keys() {",
        f"  sed -n {quote('s/^' + HEADER + ' //p')} {quote(CONFIG_PATH)} 2>/dev/null | head -n 1",
        "}",
        "encryption_restart_finished() {",
        f"  [ ! -e {quote(HELD_DIR + '/kube-apiserver.yaml')} ] && [ ! -e {quote(PENDING_DIR + '/kube-apiserver')} ]",
        "}",
    )


def _done(phase: Phase, new: str) -> str:
    """The condition under which `phase` has happened on the node, read from the file's entry list."""
    if phase == "add":
        return f'case " $(encryption_keys) " in *{quote(" " + new + " ")}*) true;; *) false;; esac'
    if phase == "promote":
        return f'case "$(encryption_keys) " in {quote(new + " ")}*) true;; *) false;; esac'
    return f'[ "$(encryption_keys)" = {quote(f"{new} {IDENTITY}")} ]'


def phase_script(host: str, phase: Phase, old: str, new: str) -> Script:
    """`phase` of the move from `old` to `new` on control plane `host`. Its stdin bundle holds CONFIG_PATH for
    that phase; it is read only when the node needs it."""
    manifest = f"{STATIC_POD_DIR}/kube-apiserver.yaml"
    body = [
        shell("install", "-d", "-m", "0700", CONFIG_DIR_ON_NODE, HELD_DIR, PENDING_DIR),
        # A restart a stopped run left held is finished first.
        *static_pods.put_back(RESTARTS, stacked_etcd=False, only="kube-apiserver"),
        f"if ! {{ {_done(phase, new)}; }}; then",
        "  install_bundle",
        f'  echo "kubeadm-ha: {phase}: encryption entries on ${{KUBEADM_HA_HOST}} are now $(encryption_keys)"',
        # An API server without the flag reads the file when the settings step gives it the flag.
        f"  if grep -q -- {quote('--' + FLAG + '=')} {quote(manifest)} 2>/dev/null; then",
        "    " + shell("touch", f"{PENDING_DIR}/kube-apiserver"),
        "  fi",
        "fi",
        *static_pods.restart(RESTARTS, "kube-apiserver", host),
    ]
    return Script(
        step=f"encryption-{phase}",
        host=host,
        done_when=f"encryption_restart_finished && {{ {_done(phase, new)}; }}",
        functions=_functions(),
        body=tuple(body),
    )


def rewrite_script(host: str, new: str) -> Script:
    """Phase 3, on one control plane once every API server writes with `new`: every Secret read and written
    back (the Kubernetes documentation's `kubectl get secrets -A -o json | kubectl replace -f -`), retried on
    a conflict with a concurrent writer; the marker names the key it was done for."""
    get = shell(
        "kubectl",
        "--kubeconfig",
        ADMIN_KUBECONFIG,
        "--request-timeout=120s",
        "get",
        "secrets",
        "--all-namespaces",
        "-o",
        "json",
    )
    replace = shell("kubectl", "--kubeconfig", ADMIN_KUBECONFIG, "--request-timeout=300s", "replace", "-f", "-")
    log = '>>"${KUBEADM_HA_LOG_DIR}/encryption-rewrite.log" 2>&1'
    return Script(
        step="encryption-rewrite",
        host=host,
        done_when=f'[ "$(cat {quote(REWRITTEN_MARKER)} 2>/dev/null)" = {quote(new)} ]',
        functions=(
            *retry_function(REWRITE_PAUSE_SECONDS),
            "rewrite_secrets() {",
            f"  {get} | {replace} {log}",
            "}",
        ),
        body=(
            f"if ! kha_retry {REWRITE_ATTEMPTS} {quote(f're-writing every Secret with {new}')} rewrite_secrets; then",
            '  echo "kubeadm-ha: see ${KUBEADM_HA_LOG_DIR}/encryption-rewrite.log on ${KUBEADM_HA_HOST}" >&2',
            "  exit 1",
            "fi",
            f"printf '%s\\n' {quote(new)} >{quote(REWRITTEN_MARKER)}",
        ),
    )


def restore_order(current: str, names: Sequence[str]) -> tuple[str, ...]:
    """After a restore: write with `current`, read every key the stack ever had (newest first), then identity.
    A snapshot from before a rotation holds Secrets written with a key the control planes have since dropped."""
    older = sorted((name for name in names if name != current), key=lambda name: -int(name.removeprefix("key-")))
    return (current, *older, IDENTITY)


def restore_file_script(host: str) -> Script:
    """tools/etcd_restore.py, while the control plane's static pods are held: the restore file from stdin,
    and the re-write marker gone, so that the next re-write (the tool's) runs. Always runs."""
    return Script(
        step="encryption-restore",
        host=host,
        done_when="false",
        functions=_functions(),
        body=(
            shell("install", "-d", "-m", "0700", CONFIG_DIR_ON_NODE),
            "install_bundle",
            shell("rm", "-f", REWRITTEN_MARKER),
            'echo "kubeadm-ha: encryption entries on ${KUBEADM_HA_HOST} are now $(encryption_keys)"',
        ),
    )
