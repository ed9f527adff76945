"""Kubelet serving certificates: approving the kubelet-serving CSRs of the planned nodes, and no others.

With `serverTLSBootstrap: true` a kubelet asks for its serving certificate with a CSR for the signer
`kubernetes.io/kubelet-serving`, and asks again whenever it rotates it (long after any `pulumi up`).
kube-controller-manager's signer signs such a CSR only once it is approved, and nothing in Kubernetes approves
it (its csrapproving controller approves kubelet *client* CSRs only). So every control plane runs an approver
on a systemd timer, and one step after the joins runs it until every planned kubelet serves a certificate
from the cluster CA.

The approver (`approve_functions`) lists the CSRs with /etc/kubernetes/admin.conf and approves a CSR only when
all of these hold (render/csr_node_program.py decides, reading the CSR's DER):
- its signer is kubernetes.io/kubelet-serving and it is neither approved, denied nor failed;
- its requester is `system:node:<name>` in the group `system:nodes`, and `<name>` is a planned node;
- its subject is exactly CN=system:node:<name>, O=system:nodes;
- its SANs are exactly that node's planned DNS names and IP addresses (`serving_plan`), nothing else;
- its usages are exactly kubelet's: "digital signature", "server auth".
Everything else stays pending and is reported (the CSR, its requester, what it asks for, why); nothing is
ever denied: an operator decides with `kubectl certificate approve|deny`.

Everything here is pure: typed inputs in, scripts and units out. `KubeletServingApproval`
(components/csr_approval.py) wires the steps.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.addressing import NodePlan
from render.admin_node import ADMIN_KUBECONFIG
from render.backup import timer_install_script
from render.kubeadm import PKI_DIR
from render.scripts import Script, bounded_wait_function, quote
from render.scripts import command as shell

# The node-side check, embedded in every approver script (it runs there as `python3 -I -c`).
PROGRAM = (Path(__file__).parent / "csr_node_program.py").read_text(encoding="utf-8")
APPROVER_PATH = "/usr/local/sbin/kubeadm-ha-kubelet-serving-approver"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "kubeadm-ha-kubelet-serving-approver.service"
TIMER = "kubeadm-ha-kubelet-serving-approver.timer"
INTERVAL_MINUTES = 2
RANDOMIZED_DELAY_SECONDS = 20
# Every kubectl call is bounded by this; a sweep makes one list and one call per CSR it approves.
REQUEST_TIMEOUT = "30s"
# The unit's bound: a sweep approving a few hundred CSRs at once (a whole cluster's kubelets rotating together).
UNIT_TIMEOUT_SECONDS = 900
# The one-shot step after the joins: how long every planned kubelet has to serve a certificate from the
# cluster CA. A kubelet asks as soon as it knows its node's addresses; the joins it follows already waited for
# their nodes to be Ready, so this only covers the CSR's round trip and kubelet picking the certificate up.
WAIT_SECONDS = 300
POLL_SECONDS = 10
TLS_CHECK_SECONDS = 10
# kubelet's serving port: k8s.io/kubernetes pkg/cluster/ports/ports.go `KubeletPort`, the KubeletConfiguration
# default (pkg/kubelet/apis/config/v1beta1/defaults.go); the program does not change it.
KUBELET_PORT = 10250
# kubeadm points the controller manager's signer at the cluster CA (cmd/kubeadm/app/phases/controlplane/
# manifests.go: --cluster-signing-cert-file=<certificatesDir>/ca.crt), so kubelet-serving certificates chain to it.
CLUSTER_CA = f"{PKI_DIR}/ca.crt"
_HOSTNAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")

_KUBECTL = ("kubectl", "--kubeconfig", ADMIN_KUBECONFIG, f"--request-timeout={REQUEST_TIMEOUT}")


@dataclass(frozen=True, order=True)
class ServingNames:
    """The names a planned node's kubelet puts in its serving CSR."""

    hostname: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _HOSTNAME.match(self.hostname):
            raise ValueError(f"{self.hostname!r} is not a lowercase DNS label")
        if not self.ips or any(str(ipaddress.ip_address(ip)) != ip for ip in self.ips):
            raise ValueError(f"{self.hostname}: IP addresses must be given, in canonical form: {self.ips!r}")


def serving_plan(nodes: Iterable[NodePlan]) -> tuple[ServingNames, ...]:
    """What each planned node's kubelet asks for, sorted by hostname (so the rendered scripts are deterministic).

    kubelet's CSR template (k8s.io/kubernetes pkg/kubelet/certificate/kubelet.go `newGetTemplateFn` and
    `addressesToHostnamesAndIPs`) takes its node's addresses: Hostname, InternalDNS and ExternalDNS as DNS names,
    InternalIP and ExternalIP (and a Hostname that is an IP) as IP addresses, each once. Without a cloud provider
    and with `--node-ip` the node has exactly two (pkg/kubelet/nodestatus/setters.go `NodeAddress`): InternalIP =
    the node IP, and Hostname = kubelet's hostname, which is the node name (kubeadm passes `--hostname-override`
    when the name differs from the OS hostname: cmd/kubeadm/app/phases/kubelet/flags.go). The program registers
    every node with name = its hostname and `node-ip` = its planned address (render/kubeadm.py `_registration`).
    So each node's SANs are exactly DNS [hostname] and IP [address].
    """
    plan = tuple(sorted(ServingNames(node.hostname, (node.hostname,), (str(node.address),)) for node in nodes))
    names = [entry.hostname for entry in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"a hostname is planned twice: {names}")
    return plan


def plan_json(plan: Iterable[ServingNames]) -> str:
    """The plan as the node program reads it: `{"<hostname>": {"dns": [...], "ips": [...]}}`, keys sorted."""
    table = {entry.hostname: {"dns": list(entry.dns), "ips": list(entry.ips)} for entry in plan}
    return json.dumps(table, sort_keys=True, separators=(",", ":"))


def approve_functions(plan: Sequence[ServingNames]) -> tuple[str, ...]:
    """`kha_approve_kubelet_serving`: one sweep. It approves what the node program allows (printing each), and
    fails only when the API cannot be asked (the list, or an approval); CSRs left pending are reported on
    stderr, and a sweep that leaves some pending still succeeds."""
    kubectl = shell(*_KUBECTL)
    return (
        "kha_csr_decide() {",
        f"  python3 -I -c {quote(PROGRAM)} {quote(plan_json(plan))}",
        "}",
        "kha_approve_kubelet_serving() {",
        "  local listed decisions csr node failed=0",
        f'  if ! listed="$({kubectl} get certificatesigningrequests --output json)"; then',
        (
            '    echo "kubeadm-ha: cannot list the CertificateSigningRequests from ${KUBEADM_HA_HOST}'
            f' with {ADMIN_KUBECONFIG}" >&2'
        ),
        "    return 1",
        "  fi",
        '  if ! decisions="$(printf \'%s\' "$listed" | kha_csr_decide)"; then',
        '    echo "kubeadm-ha: the CSR list read on ${KUBEADM_HA_HOST} could not be checked" >&2',
        "    return 1",
        "  fi",
        "  while read -r csr node; do",
        '    [ -n "$csr" ] || continue',
        f'    if {kubectl} certificate approve "$csr" >/dev/null; then',
        (
            '      echo "kubeadm-ha: approved kubelet-serving CSR ${csr} of node ${node}: requester, subject, SANs and'
            ' usages are the planned ones"'
        ),
        "    else",
        (
            '      echo "kubeadm-ha: could not approve kubelet-serving CSR ${csr} of node ${node}'
            ' from ${KUBEADM_HA_HOST}" >&2'
        ),
        "      failed=1",
        "    fi",
        '  done <<<"$decisions"',
        '  return "$failed"',
        "}",
    )


def approver_script(host: str, plan: Sequence[ServingNames]) -> Script:
    """What the timer runs: one sweep."""
    return Script(
        step="kubelet-serving-approver",
        host=host,
        # A sweep has no state to be done with: every run looks at the CSRs as they are now.
        done_when="false",
        functions=approve_functions(plan),
        body=("kha_approve_kubelet_serving",),
    )


def service_unit() -> str:
    return "\n".join(
        [
            "[Unit]",
            "Description=kubeadm-ha: approve the kubelet-serving CSRs of the planned nodes (others stay pending)",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={APPROVER_PATH}",
            f"TimeoutStartSec={UNIT_TIMEOUT_SECONDS}",
            "UMask=0077",
            "",
        ]
    )


def timer_unit() -> str:
    return "\n".join(
        [
            "[Unit]",
            f"Description=kubeadm-ha: approve planned kubelets' serving CSRs every {INTERVAL_MINUTES} minutes",
            "",
            "[Timer]",
            # Already past when the timer is (re)started by the install step, so it elapses at once then
            # (systemd.timer(5), OnBootSec=).
            f"OnBootSec={INTERVAL_MINUTES}min",
            f"OnUnitActiveSec={INTERVAL_MINUTES}min",
            f"RandomizedDelaySec={RANDOMIZED_DELAY_SECONDS}s",
            "AccuracySec=5s",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def approver_files(host: str, plan: Sequence[ServingNames]) -> dict[str, tuple[str, int]]:
    """path -> (content, mode) of everything the timer needs on `host`."""
    return {
        APPROVER_PATH: (approver_script(host, plan).render(), 0o700),
        f"{UNIT_DIR}/{SERVICE}": (service_unit(), 0o644),
        f"{UNIT_DIR}/{TIMER}": (timer_unit(), 0o644),
    }


def install_approver_script(host: str, plan: Sequence[ServingNames]) -> Script:
    """Write the approver and its units, then enable the timer; a changed plan rewrites the approver."""
    return timer_install_script("kubelet-serving-approver-timer", host, approver_files(host, plan), TIMER)


def _connect(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    return f"[{address}]:{KUBELET_PORT}" if address.version == 6 else f"{address}:{KUBELET_PORT}"


def serving_functions(plan: Sequence[ServingNames]) -> tuple[str, ...]:
    """`kha_unserved` prints the planned nodes whose kubelet does not serve a certificate that the cluster CA
    verifies for the node's name and first address; `kha_all_serving` is true when there are none.

    openssl s_client (OpenSSL >= 1.1.0 for -verify_hostname/-verify_ip; Ubuntu 24.04 has 3.0) fails the
    handshake with -verify_return_error unless the chain, the name and the address all verify. A kubelet with
    serverTLSBootstrap and no certificate yet fails every handshake (pkg/kubelet/kubelet.go: "no serving
    certificate available for the kubelet"); one without serverTLSBootstrap serves a self-signed certificate,
    which fails too.
    """
    checks = []
    for entry in plan:
        probe = shell(
            "timeout", TLS_CHECK_SECONDS, "openssl", "s_client", "-connect", _connect(entry.ips[0]),
            "-CAfile", CLUSTER_CA, "-verify_return_error", "-verify_hostname", entry.hostname,
            "-verify_ip", entry.ips[0],
        )  # fmt: skip
        checks.append(f"  {probe} </dev/null >/dev/null 2>&1 || missing+=({quote(entry.hostname)})")
    return (
        "kha_unserved() {",
        "  local missing=()",
        *checks,
        '  if [ "${#missing[@]}" -gt 0 ]; then echo "${missing[*]}"; fi',
        "}",
        "kha_all_serving() {",
        '  [ -z "$(kha_unserved)" ]',
        "}",
    )


def approve_step_script(host: str, plan: Sequence[ServingNames], *, wait_seconds: int = WAIT_SECONDS) -> Script:
    """The step after the joins: sweep until every planned kubelet serves a certificate from the cluster CA.

    Done (the guard) when every planned kubelet already does, so a re-run for a plan whose nodes all have
    their certificates changes nothing. Each round approves what it may and then probes the kubelets; after
    `wait_seconds` the step fails, naming the kubelets without a certificate and every CSR left pending with
    why, and shows the cluster's newest CSRs. CSRs it leaves pending are printed on success too.
    """
    what = f"every planned kubelet ({len(plan)}) to serve a certificate from the cluster CA"
    report = '"$kha_report"'
    return Script(
        step="kubelet-serving-approve",
        host=host,
        done_when="kha_all_serving",
        functions=(
            *approve_functions(plan),
            *serving_functions(plan),
            *bounded_wait_function(POLL_SECONDS),
            # Approving is the means and the kubelets serving the goal: a round whose CSR listing the API
            # dropped still ends the wait once every kubelet serves (the cluster lab, run 14: both kubelets
            # served while a starved API no longer listed CSRs, and the step gave up all the same).
            "kha_round() {",
            f"  kha_approve_kubelet_serving 2>{report} || true",
            "  kha_all_serving",
            "}",
        ),
        body=(
            'kha_report="$(mktemp)"',
            f"trap {quote('rm -f ' + report)} EXIT",
            f"if ! kha_wait {wait_seconds} {quote(what)} kha_round; then",
            (
                '  echo "kubeadm-ha: no certificate from the cluster CA served for its planned name and address by the'
                ' kubelet of: $(kha_unserved). Its kubelet-serving CSR did not appear, or stayed pending:" >&2'
            ),
            f"  cat {report} >&2",
            (
                f"  {shell(*_KUBECTL, 'get', 'certificatesigningrequests', '--sort-by=.metadata.creationTimestamp')}"
                " 2>&1 | tail -n 20 >&2 || true"
            ),
            "  exit 1",
            "fi",
            f"cat {report} >&2",
        ),
    )
