"""The certificate renewal step's script: check kubeadm's certificates on a control plane, renew them within
the window, restart the static pods that read them one at a time, and print the earliest expiry.

Why the renewal works this way, and how the program decides when a control plane is due, is told in
components/certificates.py, which runs this script as each control plane's `certificates` step.
"""

from __future__ import annotations

import re

from render import lb_config
from render.kubeadm import CONFIG_DIR, PKI_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import Script, bounded_wait_function, logged, quote, write_file
from render.scripts import command as shell

EXPIRY_LINE = "certificates-expire:"
_EXPIRY = re.compile(rf"^{EXPIRY_LINE} (\d{{4}}-\d{{2}}-\d{{2}}T\d{{2}}:\d{{2}}:\d{{2}}Z)$", re.M)

# kubeadm's leaf certificates (`kubeadm certs check-expiration` lists these). With external etcd the etcd
# ones are not kubeadm's: the API server's etcd client pair is pulumi-tls's, renewed by the program.
LEAF_CERTIFICATES = (
    f"{PKI_DIR}/apiserver.crt",
    f"{PKI_DIR}/apiserver-kubelet-client.crt",
    f"{PKI_DIR}/front-proxy-client.crt",
)
STACKED_ETCD_CERTIFICATES = (
    f"{PKI_DIR}/apiserver-etcd-client.crt",
    f"{PKI_DIR}/etcd/server.crt",
    f"{PKI_DIR}/etcd/peer.crt",
    f"{PKI_DIR}/etcd/healthcheck-client.crt",
)
KUBECONFIGS = tuple(
    f"/etc/kubernetes/{name}.conf" for name in ("admin", "super-admin", "controller-manager", "scheduler")
)
# Restarted in this order after a renewal, each healthy before the next: the API server first, so the others
# reconnect to a server presenting the new certificate; etcd last (stacked only), once nothing depends on it.
STATIC_PODS = (
    ("kube-apiserver", "https://127.0.0.1:6443/readyz"),
    ("kube-controller-manager", "https://127.0.0.1:10257/healthz"),
    ("kube-scheduler", "https://127.0.0.1:10259/healthz"),
)
HELD_DIR = f"{CONFIG_DIR}/renewal-held"
RENEW_CONFIG_PATH = f"{CONFIG_DIR}/renew.yaml"
STOP_TIMEOUT_SECONDS = 120
HEALTHY_TIMEOUT_SECONDS = 300
POLL_SECONDS = 2


# --- what the script prints -----------------------------------------------------------------------------


def parse_expiry(stdout: str) -> str | None:
    """The `certificates-expire: ...Z` line a certificates step prints (the last one wins)."""
    found = _EXPIRY.findall(stdout or "")
    return found[-1] if found else None


# --- the script -----------------------------------------------------------------------------------------


def _expiry_functions(renew_before_days: int, *, stacked_etcd: bool) -> tuple[str, ...]:
    files = (*LEAF_CERTIFICATES, *(STACKED_ETCD_CERTIFICATES if stacked_etcd else ()))
    certificates = " ".join(quote(path) for path in files)
    kubeconfigs = " ".join(quote(path) for path in KUBECONFIGS)
    return (
        # Every end date, one per line, as seconds since the epoch.
        "end_dates() {",
        "  local file conf",
        f"  for file in {certificates}; do",
        '    [ -f "$file" ] || continue',
        '    date -u -d "$(openssl x509 -noout -enddate -in "$file" | cut -d= -f2)" +%s',
        "  done",
        f"  for conf in {kubeconfigs}; do",
        '    [ -f "$conf" ] || continue',
        "    sed -nE 's/^[[:space:]]*client-certificate-data:[[:space:]]*//p' \"$conf\" | head -n 1 | base64 -d |",
        "      openssl x509 -noout -enddate | cut -d= -f2 | xargs -I{} date -u -d {} +%s",
        "  done",
        "}",
        "earliest_end() {",
        "  end_dates | sort -n | head -n 1",
        "}",
        # True (and says when they expire) while every certificate outlives the renewal window.
        "certificates_fresh() {",
        "  local earliest",
        '  earliest="$(earliest_end)"',
        '  [ -n "$earliest" ] || return 1',
        f'  echo "{EXPIRY_LINE} $(date -u -d "@$earliest" +%Y-%m-%dT%H:%M:%SZ)"',
        f'  [ "$earliest" -gt "$(($(date -u +%s) + {renew_before_days} * 86400))" ]',
        "}",
        *bounded_wait_function(POLL_SECONDS),
        "container_gone() {",
        '  [ -z "$(crictl ps --quiet --name "^$1\\$" 2>/dev/null)" ]',
        "}",
        "answers() {",
        f'  curl --silent --fail --max-time 5 --cacert {quote(PKI_DIR + "/ca.crt")} "$1" >/dev/null 2>&1 ||',
        # The controller manager and scheduler serve self-signed certificates on loopback.
        '    curl --silent --fail --max-time 5 --insecure "$1" >/dev/null 2>&1',
        "}",
        "etcd_answers() {",
        "  curl --silent --fail --max-time 5 http://127.0.0.1:2381/readyz >/dev/null 2>&1",
        "}",
    )


def _restart(name: str, check: str, *, held_down: int = 0, settle: int = 0) -> list[str]:
    """Restart static pod `name`: manifest out, container gone, `held_down` seconds, manifest back, healthy,
    `settle` seconds."""
    manifest = f"{STATIC_POD_DIR}/{name}.yaml"
    held = f"{HELD_DIR}/{name}.yaml"
    lines = [
        f"if [ -f {quote(manifest)} ]; then",
        "  " + shell("mv", "-f", manifest, held),
        "  " + shell("kha_wait", STOP_TIMEOUT_SECONDS, f"{name} to stop", "container_gone", name),
    ]
    if held_down:
        lines.append("  " + shell("sleep", held_down))
    lines += [
        "  " + shell("mv", "-f", held, manifest),
        "  " + f"kha_wait {HEALTHY_TIMEOUT_SECONDS} {quote(f'{name} to be healthy again')} {check}",
    ]
    if settle:
        lines.append("  " + shell("sleep", settle))
    return [*lines, f"  echo {quote(f'kubeadm-ha: {name} restarted with the renewed certificates')}", "fi"]


def renewal_script(host: str, renew_before_days: int, *, stacked_etcd: bool, cluster_config: str) -> Script:
    """Renew kubeadm's certificates on `host` when any expires within `renew_before_days`, then restart the
    static pods that read them, one at a time. Prints `certificates-expire: <UTC time>` either way.

    kubeadm is given the program's ClusterConfiguration (`cluster_config`, no secrets, without
    `kubernetesVersion`: the node's kubeadm adds its own) with `--config`.
    Without it, `kubeadm certs renew` reads the configuration from the cluster, and when it cannot (the API
    does not answer, admin.conf's own certificate has already expired, or this node's Node object or mirror
    pod is missing) it falls back to kubeadm's defaults: a local etcd, whose certificates do not exist with
    external etcd, so `renew all` failed there after renewing only the first two."""
    body: list[str] = [
        shell("install", "-d", "-m", "0700", HELD_DIR),
        *write_file(RENEW_CONFIG_PATH, cluster_config, 0o600),
        f"printf 'kubernetesVersion: %s\\n' \"$(kubeadm version -o short)\" >>{quote(RENEW_CONFIG_PATH)}",
        logged("kubeadm-certs-renew", "kubeadm", "certs", "renew", "all", "--config", RENEW_CONFIG_PATH),
    ]
    for name, url in STATIC_PODS:
        if name == "kube-apiserver":
            # Out of every load balancer before it comes back, so no client reaches it before it is ready
            # (a 403 from its empty RBAC cache otherwise), and back in before the step moves on.
            body += _restart(
                name,
                shell("answers", url),
                held_down=lb_config.BACKEND_OUT_OF_ROTATION_S,
                settle=lb_config.BACKEND_BACK_IN_ROTATION_S,
            )
        else:
            body += _restart(name, shell("answers", url))
    if stacked_etcd:
        body += _restart("etcd", "etcd_answers")
        # The API server here reads only its own member: it turned unready with it, and the load balancers
        # took it out. Like after its own restart, the step moves on once they have it back.
        apiserver = dict(STATIC_PODS)["kube-apiserver"]
        body += [
            f"kha_wait {HEALTHY_TIMEOUT_SECONDS} {quote('kube-apiserver to be ready on the restarted etcd')} "
            + shell("answers", apiserver),
            shell("sleep", lb_config.BACKEND_BACK_IN_ROTATION_S),
        ]
    still = quote(f"kubeadm-ha: certificates on {host} still expire within {renew_before_days} days after renewal")
    body += [f"if ! certificates_fresh; then echo {still} >&2; exit 1; fi"]
    return Script(
        step="certificates",
        host=host,
        done_when="certificates_fresh",
        functions=_expiry_functions(renew_before_days, stacked_etcd=stacked_etcd),
        body=tuple(body),
    )
