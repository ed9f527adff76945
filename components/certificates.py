"""Certificate renewal through `pulumi up`: kubeadm's node certificates, within `certificates.renewBeforeDays`.

Two kinds of certificate, two mechanisms:

* The certificates kubeadm makes on each control plane (API server serving and client certificates, the
  front-proxy client, the stacked etcd member's server/peer/healthcheck pair, the client certificates inside
  admin.conf, super-admin.conf, controller-manager.conf and scheduler.conf; one year). The program never
  holds their keys, and should not: keeping every node's keys in the state would put a dozen more secrets
  per control plane there, and every renewal would be a re-issue the program has to place and restart for.
  Instead each control plane has one permanent `certificates` step that checks them and, when they expire
  within `renewBeforeDays`, runs `kubeadm certs renew all` and restarts the control-plane static pods one at
  a time, each healthy before the next. It prints the earliest expiry, which the stack exports
  (`certificatesExpire`). The next run reads that back (with `readStackOutputs`, like every other judgement
  about the running cluster) and, once today is within `renewBeforeDays` of it, raises the step's renewal
  generation (`certificateRenewals`), a trigger that makes Pulumi run the step again. The steps are chained,
  so control planes renew one at a time. Between renewals the generation is re-exported unchanged, so a
  second `pulumi up` is a no-op: the decision is keyed to the recorded expiry and the day, not to a clock
  inside a resource.
* The certificates the program issues with pulumi-tls (external etcd members' server, peer and healthcheck
  certificates, the API server's etcd client pair, the admin kubeconfig's certificate): their keys are in the
  state already, and pulumi-tls re-issues them on the first `pulumi up` within `renewBeforeDays` of expiry
  (`early_renewal_hours`); the member chain re-places them one member at a time, and etcd reads certificate
  files at every handshake. Their expiry comes straight from the certificates (`validity_end_time`).

The trade-off: one more moving part on the nodes (a step that runs kubeadm and restarts pods), instead of
every node's keys in the state. Everything here is pure except the component, which only wires the steps.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pulumi
import pulumi_command as command

from components.remote import run_step
from render import lb_config
from render.kubeadm import CONFIG_DIR, PKI_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import Script, bounded_wait_function, logged, quote, write_file
from render.scripts import command as shell

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from components.pki import ClusterPki
    from components.vm import Vm
    from model.addressing import NodePlan

CERTIFICATES_EXPIRE_OUTPUT = "certificatesExpire"
CERTIFICATE_RENEWALS_OUTPUT = "certificateRenewals"
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


# --- the decision ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewalPlan:
    generation: int
    due: bool
    recorded_expiry: str | None


def parse_expiry(stdout: str) -> str | None:
    """The `certificates-expire: ...Z` line a certificates step prints (the last one wins)."""
    found = _EXPIRY.findall(stdout or "")
    return found[-1] if found else None


def plan_renewals(
    hosts: Sequence[str], previous_outputs: Mapping[str, Any], renew_before_days: int, today: datetime.date
) -> dict[str, RenewalPlan]:
    """Each control plane's renewal generation: raised by one when its recorded expiry is within the window.

    A host without a record (a new node, or the first run of this program version) keeps generation 0:
    creating its step checks, renews if needed, and records.
    """
    expires = previous_outputs.get(CERTIFICATES_EXPIRE_OUTPUT) or {}
    generations = previous_outputs.get(CERTIFICATE_RENEWALS_OUTPUT) or {}
    plans = {}
    for host in hosts:
        generation = int(generations.get(host, 0)) if isinstance(generations, Mapping) else 0
        recorded = expires.get(host) if isinstance(expires, Mapping) else None
        due = False
        if isinstance(recorded, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}T.*", recorded):
            due = (datetime.date.fromisoformat(recorded[:10]) - today).days < renew_before_days
        plans[host] = RenewalPlan(generation + 1 if due else generation, due, recorded if due else None)
    return plans


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


# --- the component ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewalTarget:
    node: NodePlan
    vm: Vm
    after: pulumi.Resource


@dataclass(frozen=True)
class CertificateRenewalArgs:
    context: NodeContext
    targets: Sequence[RenewalTarget]  # control planes, in order
    plans: Mapping[str, RenewalPlan]
    stacked_etcd: bool
    cluster_config: str  # the program's ClusterConfiguration document, which `kubeadm certs renew` reads
    after: Sequence[pulumi.Resource] = ()


class CertificateRenewal(pulumi.ComponentResource):
    """One `certificates` step per control plane, chained so renewals run one node at a time."""

    def __init__(self, name: str, args: CertificateRenewalArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:CertificateRenewal", name, None, opts)
        days = args.context.config.certificates.renew_before_days
        self.steps: dict[str, command.remote.Command] = {}
        previous: list[pulumi.Resource] = list(args.after)
        for target in args.targets:
            host = target.node.hostname
            step = run_step(
                f"{host}-certificates",
                args.context.access(target.node),
                renewal_script(host, days, stacked_etcd=args.stacked_etcd, cluster_config=args.cluster_config),
                parent=self,
                depends_on=[target.after, *previous],
                # A new generation runs the step again: the renewal the previous run found due.
                replace_with=pulumi.Output.all(target.vm.domain.id, args.plans[host].generation).apply(
                    lambda values: f"{values[0]}/renewal-{values[1]}"
                ),
            )
            self.steps[host] = step
            previous = [step]
        self.expires: pulumi.Output[dict[str, str | None]] = pulumi.Output.all(
            *(step.stdout for step in self.steps.values())
        ).apply(lambda outs: {host: parse_expiry(out) for host, out in zip(self.steps, outs, strict=True)})
        self.register_outputs({})


def earliest(times: Sequence[str | None]) -> str | None:
    """The earliest of RFC 3339 UTC times (`...Z`), in the form the steps print; None if none is known."""
    known = sorted(
        datetime.datetime.fromisoformat(time.replace("Z", "+00:00")).astimezone(datetime.UTC) for time in times if time
    )
    return known[0].strftime("%Y-%m-%dT%H:%M:%SZ") if known else None


def certificate_expiries(renewal: CertificateRenewal, pki: ClusterPki) -> pulumi.Output[dict[str, str | None]]:
    """`certificatesExpire`: what each control plane's step printed, and each external etcd member's
    earliest pulumi-tls certificate end (its server and peer certificates, and the shared healthcheck client)."""
    if pki.etcd is None:
        return renewal.expires
    etcd = pki.etcd
    ends = {
        host: pulumi.Output.all(
            member.server.cert.validity_end_time,
            member.peer.cert.validity_end_time,
            etcd.healthcheck_client.cert.validity_end_time,
        ).apply(earliest)
        for host, member in etcd.members.items()
    }
    hosts = list(ends)
    return pulumi.Output.all(renewal.expires, *ends.values()).apply(
        lambda values: {**values[0], **dict(zip(hosts, values[1:], strict=True))}
    )
