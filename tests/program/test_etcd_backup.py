"""The etcd snapshot timer as the program registers it, and the outputs the operator tools read.

What the installed script does against a real etcd is proven in tests/integration/test_etcd_backup_live.py;
here: every member (the control planes with stacked etcd, the etcd VMs with external) gets the timer step,
after etcd runs there, writing exactly the rendered script and units; the policy keys reach it; the tools'
outputs (`hostKeys`, `etcdBackups`) are what the stack plans.
"""

from __future__ import annotations

import pytest

from model.rules import ConfigError
from model.stack import parse_config
from render.backup import BACKUP_DIR, BackupPolicy, backup_files, install_timer_script
from tests.stacks import evaluated
from tools.access import access_from_outputs
from tools.etcd_backup import backup_interval
from tools.offline import evaluate, load_stack_config
from tools.plan import script_of

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _members(stack: str) -> list[str]:
    ev = evaluated(stack)
    role = "etcd" if ev.outputs["etcdTopology"].value == "external" else "cp"
    return sorted(name for name, node in ev.outputs["nodes"].value.items() if node["role"] == role)


@pytest.mark.parametrize(("stack", "after"), [("dev", "kubeadm"), ("prod", "etcd-member")])
def test_every_member_gets_the_timer_once_etcd_runs_there(stack: str, after: str) -> None:
    ev = evaluated(stack)
    members = _members(stack)
    assert len(members) == 3
    for host in members:
        step = ev.named(f"{host}-etcd-backup-timer")
        assert script_of(step) == install_timer_script(host, BackupPolicy(60, 24)).render()
        earlier = [
            name
            for name in (f"{host}-kubeadm-init", f"{host}-kubeadm-join", f"{host}-etcd-member")
            if after in name and any(r.name == name for r in ev.resources)
        ]
        assert earlier and all(ev.depends_on(step, name) for name in earlier)
    # No timer anywhere else: load balancers, workers and (external) control planes run no etcd member.
    timers = {r.name.removesuffix("-etcd-backup-timer") for r in ev.resources if r.name.endswith("-etcd-backup-timer")}
    assert timers == set(members)


def test_the_policy_keys_reach_the_installed_units() -> None:
    config = load_stack_config(REPO, "dev")
    config["kubeadm-ha:etcd"] = {**config["kubeadm-ha:etcd"], "backup": {"intervalMinutes": 15, "keep": 96}}
    ev = evaluate("dev", project_dir=REPO, config=config)
    script = script_of(ev.named("dev-cp-2-etcd-backup-timer"))
    files = backup_files("dev-cp-2", BackupPolicy(15, 96))
    assert script == install_timer_script("dev-cp-2", BackupPolicy(15, 96)).render()
    assert "OnUnitActiveSec=15min" in files["/etc/systemd/system/kubeadm-ha-etcd-backup.timer"][0]
    assert "head -n -96" in files["/usr/local/sbin/kubeadm-ha-etcd-backup"][0]
    assert ev.outputs["etcdBackups"].value["intervalMinutes"] == 15


@pytest.mark.parametrize(
    ("backup", "key"),
    [({"intervalMinutes": 1}, "etcd.backup.intervalMinutes"), ({"keep": 0}, "etcd.backup.keep"), ({"every": 5}, "")],
)
def test_bad_policy_keys_are_refused(backup: dict[str, int], key: str) -> None:
    raw = {"network": {"cidr": "10.17.9.0/24"}, "etcd": {"topology": "stacked", "backup": backup}}
    with pytest.raises(ConfigError) as error:
        parse_config(raw, stack="dev")
    assert key in str(error.value)


def test_backup_keys_are_allowed_with_stacked_etcd() -> None:
    raw = {"network": {"cidr": "10.17.9.0/24"}, "etcd": {"topology": "stacked", "backup": {"keep": 3}}}
    assert parse_config(raw, stack="dev").etcd.backup.keep == 3


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_the_tools_find_members_snapshots_and_pinned_host_keys_in_the_outputs(stack: str) -> None:
    ev = evaluated(stack)
    outputs = {key: output.value for key, output in ev.outputs.items()}
    access = access_from_outputs(stack, outputs)
    assert [node.hostname for node in access.etcd_nodes] == _members(stack)
    assert access.backup_directory == BACKUP_DIR == outputs["etcdBackups"]["directory"]
    assert outputs["etcdBackups"]["members"] == _members(stack)
    # Every node's pinned host key is the public half of the key its cloud-init installs.
    assert set(access.host_keys) == set(outputs["nodes"])
    for host, key in access.host_keys.items():
        assert key.startswith("ssh-ed25519 ") and len(key.split()) == 2
        assert key in ev.named(f"{host}-ssh-host-key").outputs["publicKeyOpenssh"]
    assert not ev.outputs["hostKeys"].secret and not ev.outputs["etcdBackups"].secret


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_the_backup_tool_reads_the_timer_interval_from_the_outputs(stack: str) -> None:
    """tools.etcd_backup calls a member's backups OVERDUE past two of the timer's intervals, read from `etcdBackups`."""
    ev = evaluated(stack)
    outputs = {key: output.value for key, output in ev.outputs.items()}
    config = load_stack_config(REPO, stack).get("kubeadm-ha:etcd") or {}
    expected = (config.get("backup") or {}).get("intervalMinutes", 60)
    assert backup_interval(outputs) == outputs["etcdBackups"]["intervalMinutes"] == expected
    assert backup_interval({}) is None
