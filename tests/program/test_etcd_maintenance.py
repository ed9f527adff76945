"""The etcd maintenance timer as the program registers it (components/etcd_maintenance.py).

What the installed script does against a real three-member etcd is proven in
tests/real/test_etcd_maintenance_live.py; here, under the mock runtime: every member (the control planes with
stacked etcd, the etcd VMs with external) gets one `<host>-etcd-maintenance-timer` step, after etcd runs there
and replaced with its VM, writing exactly the rendered script and units; each member ticks at its own minute;
`defragIntervalHours` reaches the script; a second evaluation sends byte-identical inputs.

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model.rules import ConfigError
from model.stack import parse_config
from render.etcd_maintenance import TIMER, install_maintenance_timer_script, maintenance_files, tick_minute
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import script_of

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def program() -> Path:
    return REPO


def run(program: Path, stack: str, **maintenance: Any) -> Evaluation:
    config = load_stack_config(REPO, stack)
    if maintenance:
        config["kubeadm-ha:etcd"] = {**config["kubeadm-ha:etcd"], "maintenance": maintenance}
    return evaluate(stack, project_dir=program, config=config)


def members(ev: Evaluation) -> dict[str, int]:
    """hostname -> index of every etcd member of the evaluated stack."""
    role = "etcd" if ev.outputs["etcdTopology"].value == "external" else "cp"
    nodes = ev.outputs["nodes"].value
    return {name: int(name.rsplit("-", 1)[1]) for name, node in nodes.items() if node["role"] == role}


@pytest.mark.parametrize(("stack", "after"), [("dev", "-kubeadm-"), ("prod", "-etcd-member")])
def test_every_member_gets_the_timer_once_etcd_runs_there(program: Path, stack: str, after: str) -> None:
    ev = run(program, stack)
    found = members(ev)
    assert len(found) == 3
    for host, index in found.items():
        step = ev.named(f"{host}-etcd-maintenance-timer")
        assert script_of(step) == install_maintenance_timer_script(host, index, 24).render()
        etcd_steps = [r.name for r in ev.resources if r.name.startswith(host) and after in r.name]
        assert etcd_steps and all(ev.depends_on(step, name) for name in etcd_steps)
        # Replaced with its VM: a rebuilt member gets its timer again.
        assert step.inputs["triggers"] == [ev.named(f"{host}-domain").id]
    # No timer anywhere else: load balancers, workers and (external) control planes run no etcd member.
    assert {r.name for r in ev.resources if r.name.endswith("-etcd-maintenance-timer")} == {
        f"{host}-etcd-maintenance-timer" for host in found
    }
    # Each member looks at its etcd at a minute of its own.
    assert len({tick_minute(index) for index in found.values()}) == len(found)


def test_the_interval_key_reaches_the_script_and_the_inputs_are_deterministic(program: Path) -> None:
    ev = run(program, "dev", defragIntervalHours=6)
    script = script_of(ev.named("dev-cp-2-etcd-maintenance-timer"))
    assert script == install_maintenance_timer_script("dev-cp-2", 2, 6).render()
    files = maintenance_files("dev-cp-2", 2, 6)
    # Due again after 6 h less the margin: 330 minutes.
    assert "-mmin -330 " in files["/usr/local/sbin/kubeadm-ha-etcd-maintenance"][0]
    assert "OnCalendar=*-*-* *:11:00 UTC" in files[f"/etc/systemd/system/{TIMER}"][0]
    again = run(program, "dev", defragIntervalHours=6)
    steps = [r for r in ev.resources if r.name.endswith("-etcd-maintenance-timer")]
    assert [(r.name, r.inputs) for r in steps] == [
        (r.name, r.inputs) for r in again.resources if r.name.endswith("-etcd-maintenance-timer")
    ]


def test_the_maintenance_keys_are_allowed_with_stacked_etcd_and_sizing_keys_still_refused() -> None:
    """Stacked members get etcd.maintenance through kubeadm's ClusterConfiguration and this timer, so the rule
    that refuses the external-only sizing keys with stacked etcd must let it through."""
    raw = {
        "network": {"cidr": "10.17.9.0/24"},
        "etcd": {"topology": "stacked", "maintenance": {"defragIntervalHours": 6}},
    }
    assert parse_config(raw, stack="dev").etcd.maintenance.defrag_interval_hours == 6
    with pytest.raises(ConfigError) as error:
        parse_config({**raw, "etcd": {**raw["etcd"], "cpus": 4}}, stack="dev")
    assert [problem.path for problem in error.value.problems] == ["etcd.cpus"]
