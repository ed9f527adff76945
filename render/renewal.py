"""The certificate renewal step's script: check kubeadm's certificates on a control plane, renew them within
the window, restart the static pods that read them one at a time, and print the earliest expiry.

A renewal can stop halfway (a health wait that times out, a dropped SSH session, a killed `pulumi up`), and
Pulumi then runs the same script again: a failed create records nothing, so the next run computes the same
renewal generation. Files on disk are renewed before anything restarts, so freshness alone cannot say the
renewal is finished. The script therefore records, before `kubeadm certs renew`, one marker per static pod
(PENDING_DIR): "this component may still run with the old certificates in memory", removed only once that
component was restarted and answers its health check again. A manifest moved out for a restart waits in
HELD_DIR. The step is done when no manifest is held, no marker is left and the certificates are fresh. A
re-run first puts back anything held (finishing that restart), renews only if the files are not fresh, then
restarts every component still marked, in the same order and with the same load-balancer waits.

Why the renewal works this way, and how the program decides when a control plane is due, is told in
components/certificates.py, which runs this script as each control plane's `certificates` step.
"""

from __future__ import annotations

import re

from render import static_pods
from render.kubeadm import CONFIG_DIR, PKI_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import STATE_DIR, Script, logged, quote, write_file
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
HELD_DIR = f"{CONFIG_DIR}/renewal-held"
# One empty file per static pod not yet restarted on the renewed files; written before `kubeadm certs renew`.
PENDING_DIR = f"{STATE_DIR}/renewal-pending"
RENEW_CONFIG_PATH = f"{CONFIG_DIR}/renew.yaml"
RESTARTS = static_pods.Restarts(HELD_DIR, PENDING_DIR, "restarted with the renewed certificates")


# --- what the script prints -----------------------------------------------------------------------------


def parse_expiry(stdout: str) -> str | None:
    """The `certificates-expire: ...Z` line a certificates step prints (the last one wins)."""
    found = _EXPIRY.findall(stdout or "")
    return found[-1] if found else None


# --- the script -----------------------------------------------------------------------------------------


def _functions(renew_before_days: int, *, stacked_etcd: bool) -> tuple[str, ...]:
    files = (*LEAF_CERTIFICATES, *(STACKED_ETCD_CERTIFICATES if stacked_etcd else ()))
    names = " ".join(quote(name) for name, _ in static_pods.pods(stacked_etcd))
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
        # True when no earlier run left a restart unfinished (a manifest held, or a component still marked as
        # running on the old certificates); otherwise says what it finds, for the step's output.
        "restarts_finished() {",
        "  local name",
        f"  for name in {names}; do",
        f'    if [ -e {quote(HELD_DIR)}/"$name.yaml" ]; then',
        '      echo "kubeadm-ha: an earlier renewal on ${KUBEADM_HA_HOST} left ${name}\'s manifest held; finishing it"',
        "      return 1",
        "    fi",
        f'    if [ -e {quote(PENDING_DIR)}/"$name" ]; then',
        '      echo "kubeadm-ha: ${name} on ${KUBEADM_HA_HOST} was not restarted since the renewal; restarting it"',
        "      return 1",
        "    fi",
        "  done",
        "}",
        *static_pods.functions(),
    )


def renewal_script(host: str, renew_before_days: int, *, stacked_etcd: bool, cluster_config: str) -> Script:
    """Renew kubeadm's certificates on `host` when any expires within `renew_before_days`, then restart the
    static pods that read them, one at a time. Prints `certificates-expire: <UTC time>` either way.

    kubeadm is given the program's ClusterConfiguration (`cluster_config`, no secrets, without
    `kubernetesVersion`: the node's kubeadm adds its own) with `--config`.
    Without it, `kubeadm certs renew` reads the configuration from the cluster, and when it cannot (the API
    does not answer, admin.conf's own certificate has already expired, or this node's Node object or mirror
    pod is missing) it falls back to kubeadm's defaults: a local etcd, whose certificates do not exist with
    external etcd, so `renew all` failed there after renewing only the first two."""
    body: list[str] = [shell("install", "-d", "-m", "0700", HELD_DIR, PENDING_DIR)]
    # 1. A manifest an interrupted run left held goes back first (that restart finished), so nothing stays
    #    down while this run renews, or if it fails.
    body += static_pods.put_back(RESTARTS, stacked_etcd=stacked_etcd)
    # 2. Renew only what is not fresh. Every static pod is marked first: from the renew on, each runs with the
    #    old certificates in memory until it is restarted, and a run that stops in between leaves the marks.
    marks = [
        f"  if [ -f {quote(f'{STATIC_POD_DIR}/{name}.yaml')} ]; then {shell('touch', f'{PENDING_DIR}/{name}')}; fi"
        for name, _ in static_pods.pods(stacked_etcd)
    ]
    body += [
        "if ! certificates_fresh; then",
        *marks,
        *("  " + line for line in write_file(RENEW_CONFIG_PATH, cluster_config, 0o600)),
        f"  printf 'kubernetesVersion: %s\\n' \"$(kubeadm version -o short)\" >>{quote(RENEW_CONFIG_PATH)}",
        "  " + logged("kubeadm-certs-renew", "kubeadm", "certs", "renew", "all", "--config", RENEW_CONFIG_PATH),
        "fi",
    ]
    # 3. Restart every component still marked, one at a time, in order.
    for name, _ in static_pods.pods(stacked_etcd):
        body += static_pods.restart(RESTARTS, name, host)
    still = quote(f"kubeadm-ha: certificates on {host} still expire within {renew_before_days} days after renewal")
    body += [f"if ! certificates_fresh; then echo {still} >&2; exit 1; fi"]
    return Script(
        step="certificates",
        host=host,
        # Fresh files alone are not enough: an interrupted run renews them before anything restarts.
        done_when="restarts_finished && certificates_fresh",
        functions=_functions(renew_before_days, stacked_etcd=stacked_etcd),
        body=tuple(body),
    )
