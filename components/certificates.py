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
  about the running cluster) and, once the run's time is within `renewBeforeDays` of it, raises the step's
  renewal generation (`certificateRenewals`), a trigger that makes Pulumi run the step again. "Within" is
  the step's own test, in UTC and to the second (earliest end <= now + days × 86400), so a node the program
  finds due is one its step renews, and a second `pulumi up` finds nothing due, whatever the time zone of the
  machine running Pulumi. The steps are chained, so control planes renew one at a time. Between renewals the
  generation is re-exported unchanged, so a second `pulumi up` is a no-op: the decision is keyed to the
  recorded expiry and the run's time, not to a clock inside a resource.
  A renewal that fails halfway (a restart that does not become healthy, a dropped connection) fails the step;
  the next `pulumi up` runs the same step again (a failed create records nothing), and the step is not done
  until nothing is held and every static pod was restarted on the renewed files: it puts back what was held,
  then finishes the restarts (render/renewal.py keeps that record on the node).
* The certificates the program issues with pulumi-tls (external etcd members' server, peer and healthcheck
  certificates, the API server's etcd client pair, the admin kubeconfig's certificate): their keys are in the
  state already, and pulumi-tls re-issues them on the first `pulumi up` within `renewBeforeDays` of expiry
  (`early_renewal_hours`); the member chain re-places them one member at a time, and etcd reads certificate
  files at every handshake. Their expiry comes straight from the certificates (`validity_end_time`).

The trade-off: one more moving part on the nodes (a step that runs kubeadm and restarts pods), instead of
every node's keys in the state. The step's script is rendered in render/renewal.py; everything here is pure
except the component, which only wires the steps.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pulumi
import pulumi_command as command

from components.nodes import StepTarget
from components.remote import run_step
from render.renewal import parse_expiry, renewal_script

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from components.pki import ClusterPki

CERTIFICATES_EXPIRE_OUTPUT = "certificatesExpire"
CERTIFICATE_RENEWALS_OUTPUT = "certificateRenewals"


# --- the decision ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewalPlan:
    generation: int
    due: bool
    recorded_expiry: str | None


def plan_renewals(
    hosts: Sequence[str], previous_outputs: Mapping[str, Any], renew_before_days: int, now: datetime.datetime
) -> dict[str, RenewalPlan]:
    """Each control plane's renewal generation: raised by one when its recorded expiry is within the window.

    `now` is the run's time, with its time zone (the program passes UTC). The boundary is the step's own
    (`certificates_fresh` in render/renewal.py): the certificates are fresh while their earliest end is later
    than `date -u +%s` + renew_before_days × 86400, in whole seconds; due is exactly "not fresh" at `now`.
    Because the step runs after the decision, a node found due is still stale when its step runs (with the
    node's clock and this machine's in step), and a node not due has no step run. (Comparing the local
    calendar date instead made a node east of UTC "due" whose step then found it fresh, on every run of
    that day.)

    A host without a record (a new node, or the first run of this program version) keeps generation 0:
    creating its step checks, renews if needed, and records.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("plan_renewals needs the run's time with its time zone (UTC), not a naive local time")
    # `date +%s` counts whole seconds: the clock the step compares against.
    window_end = int(now.timestamp()) + renew_before_days * 86400
    expires = previous_outputs.get(CERTIFICATES_EXPIRE_OUTPUT) or {}
    generations = previous_outputs.get(CERTIFICATE_RENEWALS_OUTPUT) or {}
    plans = {}
    for host in hosts:
        generation = int(generations.get(host, 0)) if isinstance(generations, Mapping) else 0
        recorded = expires.get(host) if isinstance(expires, Mapping) else None
        end = _recorded_end(recorded)
        due = end is not None and end <= window_end
        plans[host] = RenewalPlan(generation + 1 if due else generation, due, recorded if due else None)
    return plans


def _recorded_end(recorded: object) -> int | None:
    """A recorded expiry (`...Z`, as the step prints it) as seconds since the epoch; None if it is not one."""
    if not isinstance(recorded, str) or not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})", recorded
    ):
        return None
    try:
        moment = datetime.datetime.fromisoformat(recorded.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(moment.timestamp())


# --- the component ----------------------------------------------------------------------------------------


RenewalTarget = StepTarget


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
