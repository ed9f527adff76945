"""Certificate renewal as the program plans it, run by run (components/certificates.py, render/renewal.py).

Each "run" is an offline evaluation whose previous outputs are what the run before exported, with the
expiries the nodes would have printed. Proven: nothing is re-run while every recorded expiry is outside
`certificates.renewBeforeDays`; the control planes whose certificates are due get a new renewal generation
(their step runs again) and no others; the steps are chained, one control plane after another; the run after
a renewal is a no-op (every step input byte-identical); pulumi-tls re-issues within the same window; the
exported expiries of external etcd members are their certificates' own end times.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from components.certificates import (
    CERTIFICATE_RENEWALS_OUTPUT,
    CERTIFICATES_EXPIRE_OUTPUT,
    earliest,
    plan_renewals,
)
from model.addressing import plan_addresses
from model.stack import config_from_stack_file
from render import lb_config
from render.renewal import parse_expiry, renewal_script
from render.static_pods import STATIC_PODS
from tests.stacks import evaluated
from tools.offline import Evaluation, evaluate, load_stack_config

REPO = Path(__file__).resolve().parents[2]
TODAY = datetime.date.today()
CPS = ("dev-cp-1", "dev-cp-2", "dev-cp-3")
COMPONENTS = [name for name, _ in STATIC_PODS]


def _in(days: int) -> str:
    return f"{TODAY + datetime.timedelta(days=days)}T12:00:00Z"


def _outputs(ev: Evaluation) -> dict[str, Any]:
    return {key: output.value for key, output in ev.outputs.items()}


def _run(previous: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> Evaluation:
    return evaluate("dev", project_dir=REPO, previous_outputs=previous, config=config)


def _after(ev: Evaluation, expires: Mapping[str, str]) -> dict[str, Any]:
    """What the next run reads back: this run's outputs, with the expiries its steps printed."""
    return {**_outputs(ev), CERTIFICATES_EXPIRE_OUTPUT: dict(expires)}


def _trigger(ev: Evaluation, host: str) -> str:
    (trigger,) = ev.named(f"{host}-certificates").inputs["triggers"]
    return str(trigger)


def _steps(ev: Evaluation) -> dict[str, Any]:
    return {r.name: r.inputs for r in ev.resources if r.name.endswith("-certificates")}


def test_the_decision_raises_a_generation_only_inside_the_window() -> None:
    previous = {
        CERTIFICATES_EXPIRE_OUTPUT: {"a": "2027-03-02T00:00:01Z", "b": "2027-06-01T00:00:00Z", "c": None},
        CERTIFICATE_RENEWALS_OUTPUT: {"a": 2, "b": 0},
    }
    midnight = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    plans = plan_renewals(["a", "b", "c", "d"], previous, 60, midnight)
    assert {host: (plan.generation, plan.due) for host, plan in plans.items()} == {
        "a": (2, False),  # 60 days and a second left: not yet inside a 60-day window
        "b": (0, False),
        "c": (0, False),  # nothing recorded: its step checks when it is created
        "d": (0, False),
    }
    plans = plan_renewals(["a", "b"], previous, 60, midnight + datetime.timedelta(seconds=1))
    assert plans["a"].generation == 3 and plans["a"].due and not plans["b"].due


def test_the_program_decides_in_utc_whatever_the_machines_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18, defect 9: the run's clock is UTC, compared to the second as the step's guard compares it.

    The machine running Pulumi is put in a zone whose date differs from UTC's right now (UTC+14 from 12:00
    UTC, UTC-12 before). dev-cp-1's recorded expiry is 2 minutes inside the window, dev-cp-2's 2 minutes
    outside (the evaluation takes seconds): by the step's guard the first is stale and the second fresh.
    By the local date both used to be 59 days away east of UTC (both "due": dev-cp-2's step would run only
    to say "already done", on every run that day) or 61 days west (neither due, a day late). Within the two
    minutes before midnight UTC the two expiries fall on different dates and the old decision happened to
    agree; at any other time it did not."""
    now = datetime.datetime.now(datetime.UTC)
    zone = "Etc/GMT-14" if now.hour >= 12 else "Etc/GMT+12"  # POSIX signs: Etc/GMT-14 is UTC+14
    window = datetime.timedelta(days=60)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    expires = {
        "dev-cp-1": (now + window - datetime.timedelta(minutes=2)).strftime(stamp),
        "dev-cp-2": (now + window + datetime.timedelta(minutes=2)).strftime(stamp),
        "dev-cp-3": (now + 2 * window).strftime(stamp),
    }
    first = evaluated("dev")
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert datetime.date.today() != datetime.datetime.now(datetime.UTC).date(), zone
        due = _run(_after(first, expires))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert due.outputs[CERTIFICATE_RENEWALS_OUTPUT].value == {"dev-cp-1": 1, "dev-cp-2": 0, "dev-cp-3": 0}


def test_the_step_prints_the_expiry_the_next_run_reads() -> None:
    assert parse_expiry("kubeadm-ha: x\ncertificates-expire: 2027-12-02T10:00:00Z\ndone\n") == "2027-12-02T10:00:00Z"
    assert parse_expiry("certificates-expire: nonsense") is None
    assert earliest(["2027-12-02T10:00:00Z", None, "2027-11-30T09:00:00+00:00"]) == "2027-11-30T09:00:00Z"
    script = renewal_script("dev-cp-1", 60, stacked_etcd=True, cluster_config="kind: ClusterConfiguration\n").render()
    assert "certificates_fresh" in script.split("kubeadm certs renew", 1)[0]  # the guard checks first
    assert "/etc/kubernetes/pki/etcd/server.crt" in script
    external = renewal_script("prod-cp-1", 60, stacked_etcd=False, cluster_config="kind: ClusterConfiguration\n")
    assert "/etc/kubernetes/pki/etcd/server.crt" not in external.render()


def test_kubeadm_renews_from_the_programs_cluster_configuration_not_the_clusters() -> None:
    """`kubeadm certs renew` without --config reads the cluster, and falls back to defaults (a local etcd)
    when it cannot: with external etcd that failed against real kubeadm (tests/real/test_renewal_live.py)."""
    for stack, external in (("prod", True), ("dev", False)):
        ev = evaluated(stack)
        step = ev.named(f"{stack}-cp-1-certificates")
        script = step.inputs["create"]
        assert "kubeadm certs renew all --config /etc/kubernetes/kubeadm-ha/renew.yaml" in script
        document = script.split("/etc/kubernetes/kubeadm-ha/renew.yaml.kubeadm-ha.tmp", 1)[0]
        assert "kind: ClusterConfiguration" in document and "bootstrapTokens" not in document
        assert ("external:" in document) is external
        assert "controlPlaneEndpoint:" in document
        # The node's kubeadm names its version (an upgrade leaves the step unchanged; nothing is looked up).
        assert "kubernetesVersion" not in document
        assert "kubernetesVersion: %s" in script.split("kubeadm certs renew", 1)[0]


def test_renewal_runs_only_when_due_one_control_plane_at_a_time_then_nothing() -> None:
    first = evaluated("dev")
    # Run 2: nothing is due (a year left everywhere): every step input is as in run 1.
    quiet = _run(_after(first, dict.fromkeys(CPS, _in(365))))
    assert _steps(quiet) == _steps(first)
    assert quiet.outputs[CERTIFICATE_RENEWALS_OUTPUT].value == dict.fromkeys(CPS, 0)

    # Run 3: cp-1 and cp-3 expire within 60 days, cp-2 does not: only theirs run again.
    due = _run(_after(quiet, {"dev-cp-1": _in(59), "dev-cp-2": _in(200), "dev-cp-3": _in(10)}))
    assert due.outputs[CERTIFICATE_RENEWALS_OUTPUT].value == {"dev-cp-1": 1, "dev-cp-2": 0, "dev-cp-3": 1}
    changed = {host for host in CPS if _trigger(due, host) != _trigger(quiet, host)}
    assert changed == {"dev-cp-1", "dev-cp-3"}
    assert _trigger(due, "dev-cp-1").endswith("/renewal-1")
    # Serial: each control plane's step waits for the one before it (and for that node's own join).
    assert due.depends_on("dev-cp-2-certificates", "dev-cp-1-certificates")
    assert due.depends_on("dev-cp-3-certificates", "dev-cp-2-certificates")
    assert not due.depends_on("dev-cp-1-certificates", "dev-cp-2-certificates")
    assert due.depends_on("dev-cp-3-certificates", "dev-cp-3-kubeadm-join")

    # Run 4: the renewed nodes printed a new expiry a year out; the generation stays, nothing changes.
    renewed = _run(_after(due, {"dev-cp-1": _in(365), "dev-cp-2": _in(200), "dev-cp-3": _in(365)}))
    assert _steps(renewed) == _steps(due)
    assert renewed.outputs[CERTIFICATE_RENEWALS_OUTPUT].value == {"dev-cp-1": 1, "dev-cp-2": 0, "dev-cp-3": 1}


def test_the_window_is_the_stack_setting_and_pulumi_tls_uses_it_too() -> None:
    config = load_stack_config(REPO, "dev")
    config["kubeadm-ha:certificates"] = {"renewBeforeDays": 90}
    first = _run({}, config)
    due = _run(_after(first, {"dev-cp-1": _in(80), "dev-cp-2": _in(100), "dev-cp-3": _in(100)}), config)
    assert due.outputs[CERTIFICATE_RENEWALS_OUTPUT].value == {"dev-cp-1": 1, "dev-cp-2": 0, "dev-cp-3": 0}
    assert first.named("admin-client-cert").inputs["earlyRenewalHours"] == 90 * 24
    assert evaluated("prod").named("prod-etcd-1-etcd-server-cert").inputs["earlyRenewalHours"] == 60 * 24


def test_external_etcd_members_report_their_own_certificates_end() -> None:
    ev = evaluated("prod")
    expires = ev.outputs[CERTIFICATES_EXPIRE_OUTPUT].value
    for host in ("prod-etcd-1", "prod-etcd-2", "prod-etcd-3"):
        ends = [ev.named(f"{host}-etcd-{kind}-cert").outputs["validityEndTime"] for kind in ("server", "peer")] + [
            ev.named("etcd-healthcheck-client-cert").outputs["validityEndTime"]
        ]
        assert expires[host] == earliest(ends)
    # Control planes have a certificates step; the etcd VMs do not (pulumi-tls renews theirs).
    assert {r.name for r in ev.resources if r.name.endswith("-certificates")} == {
        f"prod-cp-{index}-certificates" for index in (1, 2, 3)
    }


@pytest.mark.parametrize("days", [6, 301])
def test_a_window_outside_the_certificates_life_is_refused(days: int) -> None:
    from model.rules import ConfigError
    from model.stack import parse_config

    with pytest.raises(ConfigError, match=r"certificates\.renewBeforeDays"):
        parse_config({"network": {"cidr": "10.17.9.0/24"}, "certificates": {"renewBeforeDays": days}}, stack="dev")


def test_the_restarted_api_server_is_out_of_every_load_balancer_until_ready_and_back_before_the_step_moves_on() -> None:
    """A restarted kube-apiserver listens before its RBAC cache is filled and answers 403 meanwhile; HAProxy
    routes to it until `fall` checks fail. tests/real/test_renewal_live.py saw those 403s through the VIP.
    The step holds the API server down for as long as the rendered HAProxy needs to take it out of rotation
    (every interval stretched by `spread-checks`), and waits after /readyz as long as it needs to take it back."""
    config = config_from_stack_file(str(REPO / "Pulumi.prod.yaml"), "prod")
    haproxy = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    spread = 1 + int(re.search(r"^\s*spread-checks (\d+)$", haproxy, re.M).group(1)) / 100  # type: ignore[union-attr]
    check = re.search(r"inter (\d+)s fastinter (\d+)s fall (\d+) rise (\d+)", haproxy)
    assert check is not None
    inter, fastinter, fall, rise = (int(value) for value in check.groups())
    out_within = (inter + (fall - 1) * fastinter) * spread
    back_within = rise * inter * spread

    script = renewal_script("prod-cp-1", 60, stacked_etcd=False, cluster_config="kind: ClusterConfiguration\n").render()
    blocks = _restart_blocks(script)
    # Each component's restart is rendered twice: finishing one an interrupted run left held, and its own.
    assert [name for name, _ in blocks] == [*COMPONENTS, *COMPONENTS]
    for name, restart in blocks:
        if name != "kube-apiserver":
            # Only the API server is behind the load balancers: the others restart without waiting.
            assert "sleep" not in restart, restart
            continue
        held_down = re.search(r"^\s*sleep (\d+)\n\s*mv -f \S+/renewal-held/kube-apiserver\.yaml ", restart, re.M)
        assert held_down is not None, restart
        assert int(held_down.group(1)) > out_within
        settle = re.search(r"'kube-apiserver to be healthy again' answers \S+\n\s*sleep (\d+)\n", restart)
        assert settle is not None, restart
        assert int(settle.group(1)) > back_within

    # Stacked: the API server reads only its own etcd member. A request HAProxy sent it while that member was
    # down failed (tests/real/test_stacked_control_plane_live.py saw one through the VIP), so the API server
    # is held, and out of every load balancer, before etcd's manifest moves; it comes back after etcd answers.
    stacked = renewal_script("dev-cp-1", 60, stacked_etcd=True, cluster_config="kind: ClusterConfiguration\n").render()
    names = [name for name, _ in _restart_blocks(stacked)]
    # Putting back what a stopped run left held: etcd first, or the API server would never become ready.
    assert names[:4] == ["etcd", *COMPONENTS], names
    own = stacked.split("if [ -f /var/lib/kubeadm-ha/renewal-pending/etcd ]; then\n", 1)[1]
    order = [
        "mv -f /etc/kubernetes/manifests/kube-apiserver.yaml /etc/kubernetes/kubeadm-ha/renewal-held/",
        "kha_wait 120 'kube-apiserver to stop' container_gone kube-apiserver\n",
        "sleep ",
        "mv -f /etc/kubernetes/manifests/etcd.yaml /etc/kubernetes/kubeadm-ha/renewal-held/",
        "'etcd to be healthy again'",
        "mv -f /etc/kubernetes/kubeadm-ha/renewal-held/kube-apiserver.yaml /etc/kubernetes/manifests/",
        "'kube-apiserver to be healthy again' answers",
        "sleep ",
    ]
    at = 0
    for text in order:
        found = own.find(text, at)
        assert found >= 0, f"{text!r} not after position {at} of:\n{own}"
        at = found + len(text)
        if text == "sleep ":
            seconds = int(own[at:].split("\n", 1)[0])
            assert seconds > (back_within if "healthy again" in own[:found][-200:] else out_within), own


def _restart_blocks(script: str) -> list[tuple[str, str]]:
    """Each `if [ -f …/renewal-held/NAME.yaml ]; then … fi` of a renewal script: (NAME, the block), in order."""
    found = re.finditer(r"^( *)if \[ -f \S+/renewal-held/(\S+)\.yaml \]; then\n(.*?)^\1fi$", script, re.M | re.S)
    return [(match.group(2), match.group(3)) for match in found]
