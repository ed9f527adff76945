"""Issue 18, defect 7: what a failed run created is judged by the state, not by the last successful outputs.

The engine keeps a stack's outputs of the last successful run when a run fails, but persists every resource
as its step completes. These tests model exactly that with the offline runtime: `previous_outputs` are the
outputs of the last successful evaluation, `previous_resources` the state of a later run cut where it
"failed" (Evaluation.state(without=...)). Stand-in: the cut is chosen by the test (one node's readiness
wait and every step after it are taken as not created), and the state holds the mocks' outputs; the real
engine persists each step as it completes (pulumi v3.274.0 pkg/backend/snapshot.go) and answers
readStackResourceOutputs from that snapshot. What is real: the program, its placement and refusals, and
the URNs, providers and dependencies it registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model.rules import ConfigError
from tests.program.test_multihost import HV_D_KEY, STACK, hypervisors, placement, stack_config
from tests.program.test_platform import problems
from tools.offline import Evaluation, evaluate

ROOT = Path(__file__).resolve().parents[2]
STASH = "pulumi:index:Stash"
DOMAIN = "libvirt:index/domain:Domain"
FOURTH = {"name": "hv-d", "uri": "qemu+ssh://kubeadm@hv-d.lan.example/system", "hostKey": HV_D_KEY}


def outputs_of(ev: Evaluation | None) -> dict[str, Any] | None:
    return {name: out.value for name, out in ev.outputs.items()} if ev is not None else None


def run(
    stack: str,
    config: dict[str, Any],
    *,
    outputs: Evaluation | None,
    state: dict[str, dict[str, Any]] | None,
) -> Evaluation:
    return evaluate(
        stack, project_dir=ROOT, config=config, previous_outputs=outputs_of(outputs), previous_resources=state
    )


def failed_at(ev: Evaluation, step: str) -> dict[str, dict[str, Any]]:
    """The state `ev` leaves if its step `step` fails: that step and everything after it are not created."""
    failed = ev.named(step)
    later = {r.urn for r in ev.resources if r.urn == failed.urn or ev.depends_on(r, failed)}
    return ev.state(without=later)


def multihost(**overrides: Any) -> dict[str, Any]:
    return stack_config(**overrides)


def domain_provider(ev: Evaluation, hostname: str) -> str | None:
    (domain,) = [d for d in ev.by_type(DOMAIN) if d.inputs["name"] == hostname]
    return domain.provider


def test_vms_created_by_a_failed_run_keep_their_host_when_a_hypervisor_is_added() -> None:
    first = run(STACK, multihost(), outputs=None, state=None)
    # The run that adds two workers creates their VMs, then fails waiting for worker-5's cloud-init.
    grown = run(STACK, multihost(workers={"replicas": 5}), outputs=first, state=first.state())
    state = failed_at(grown, f"{STACK}-worker-5-ready")
    new = [f"{STACK}-worker-4", f"{STACK}-worker-5"]
    assert all(any(d.inputs["name"] == name and d.urn in state for d in grown.by_type(DOMAIN)) for name in new)
    created_on = {name: placement(grown)[name] for name in new}
    # The outputs are still the first run's: they know nothing of the new workers.
    assert not set(new) & set(first.outputs["nodes"].value)

    # The operator then adds a hypervisor (an empty one takes new nodes first) and runs again.
    after = run(
        STACK, multihost(workers={"replicas": 5}, hypervisors=[FOURTH, *hypervisors()]), outputs=first, state=state
    )
    assert {name: placement(after)[name] for name in new} == created_on
    for name in new:
        # Same provider, so the engine keeps the VM instead of replacing it on another host.
        assert domain_provider(after, name) == domain_provider(grown, name)


def test_a_host_running_vms_of_a_failed_run_cannot_be_removed() -> None:
    first = run(STACK, multihost(), outputs=None, state=None)
    four = [*hypervisors(), FOURTH]
    grown = run(STACK, multihost(workers={"replicas": 5}, hypervisors=four), outputs=first, state=first.state())
    assert placement(grown)[f"{STACK}-worker-4"] == "hv-d"
    state = failed_at(grown, f"{STACK}-worker-5-ready")
    with pytest.raises(ConfigError) as caught:
        run(STACK, multihost(workers={"replicas": 5}), outputs=first, state=state)
    found = problems(caught)["hypervisors"]
    assert "'hv-d' is gone" in found and f"{STACK}-worker-4" in found


def test_each_node_is_recorded_in_state_before_any_of_its_disks() -> None:
    ev = run(STACK, multihost(), outputs=None, state=None)
    records = [s for s in ev.by_type(STASH) if s.name.endswith("-placement")]
    assert len(records) == len(ev.outputs["nodes"].value)
    for record in records:
        hostname = record.name.removesuffix("-placement")
        node = ev.outputs["nodes"].value[hostname]
        assert record.outputs["output"]["hypervisor"] == node["hypervisor"]
        assert record.outputs["output"]["address"] == node["address"]
        for disk in (f"{hostname}-root", f"{hostname}-cloud-init", f"{hostname}-domain"):
            assert ev.depends_on(disk, record), disk


def test_vms_created_by_a_failed_first_run_keep_their_host() -> None:
    # The stack's very first `pulumi up` creates every VM, then fails waiting for worker-3's cloud-init: no
    # outputs at all, but the state holds the VMs' records. (With the real pulumi v3.274.0 CLI a stack just
    # made by `pulumi stack init` answers readStackResourceOutputs with no resources, so the program asks on
    # every run, its first included.)
    first = run(STACK, multihost(), outputs=None, state=None)
    state = failed_at(first, f"{STACK}-worker-3-ready")
    created_on = placement(first)
    after = run(STACK, multihost(hypervisors=[FOURTH, *hypervisors()]), outputs=None, state=state)
    created = {
        name for name in created_on if any(d.inputs["name"] == name and d.urn in state for d in first.by_type(DOMAIN))
    }
    assert created
    assert {name: placement(after)[name] for name in created} == {name: created_on[name] for name in created}
