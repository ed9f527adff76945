"""What a real libvirt host and a real calendar need of the program (issue: today's platforms and defects).

Each test here failed before its fix: a domain without a CPU mode (QEMU's `qemu64`), the provider's
default SPICE graphics, volume names that a leftover of an earlier deployment would be adopted under,
running nodes whose address moved when the load balancer count or the network changed, and a new
cluster allowed on a Kubernetes minor past its end of life.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.previous import PreviousDeployment
from model.rules import ConfigError
from model.stack import config_from_stack_file, parse_config
from model.versions import RELEASES
from tools.offline import Evaluation, evaluate

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "libvirt:index/domain:Domain"
VOLUME = "libvirt:index/volume:Volume"
DISK = "libvirt:index/cloudInitDisk:CloudInitDisk"


def stack_config(stack: str, **overrides: Any) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    for key, value in overrides.items():
        config[f"kubeadm-ha:{key}"] = value
    return config


def run(stack: str, previous: dict[str, Any] | None = None, **overrides: Any) -> Evaluation:
    return evaluate(stack, project_dir=ROOT, config=stack_config(stack, **overrides), previous_outputs=previous)


def deployed(ev: Evaluation) -> dict[str, Any]:
    return {name: output.value for name, output in ev.outputs.items()}


def problems(error: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    found: dict[str, str] = {}
    for problem in error.value.problems:
        found[problem.path] = " | ".join(filter(None, (found.get(problem.path), problem.rule)))
    return found


# ------------------------------------------------------------------------------------------ domains


def test_domains_get_a_real_cpu_model_and_vnc_on_loopback() -> None:
    for domain in run("dev").by_type(DOMAIN):
        assert domain.inputs["type"] == "kvm"
        assert domain.inputs["cpu"] == {"mode": "host-passthrough"}
        assert domain.inputs["graphics"] == {"type": "vnc", "listenType": "address", "listenAddress": "127.0.0.1"}


def test_a_hypervisor_without_kvm_runs_plain_qemu_with_its_best_cpu() -> None:
    hypervisors = [{"name": "lab", "uri": "qemu:///system", "domainType": "qemu"}]
    for domain in run("dev", hypervisors=hypervisors).by_type(DOMAIN):
        assert domain.inputs["type"] == "qemu" and domain.inputs["cpu"] == {"mode": "maximum"}
    chosen = [{"name": "old", "cpuMode": "host-model"}]
    assert {d.inputs["cpu"]["mode"] for d in run("dev", hypervisors=chosen).by_type(DOMAIN)} == {"host-model"}


def test_an_unknown_cpu_mode_is_refused_with_its_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        run("dev", hypervisors=[{"name": "h", "cpuMode": "qemu64"}])
    assert "hypervisors.0.cpuMode" in problems(caught)


def test_the_providers_read_back_quirks_are_no_diff() -> None:
    ev = run("dev")
    for domain in ev.by_type(DOMAIN):
        # By index: the real engine lets the provider's read-back diff through `[*]` (tests/real/engine/
        # test_domain_readback.py); every domain has exactly one NIC.
        assert list(domain.ignore_changes) == ["networkInterfaces[0].addresses"]
        assert len(domain.inputs["networkInterfaces"]) == 1
    for network in ev.by_type("libvirt:index/network:Network"):
        assert "dns" in network.ignore_changes


# ------------------------------------------------------------------------------------------ volumes


def volume_names(ev: Evaluation) -> list[str]:
    return [r.inputs["name"] for r in ev.by_type(VOLUME)] + [r.inputs["name"] for r in ev.by_type(DISK)]


def test_volume_names_carry_the_deployment_id_so_no_leftover_is_adopted() -> None:
    ev = run("dev")
    ident = ev.outputs["deploymentId"].value
    assert len(ident) == 8 and int(ident, 16) >= 0
    names = volume_names(ev)
    assert names and all(f"-{ident}." in name for name in names), names
    assert "dev-base-" + ident + ".qcow2" in names and "dev-cp-1-root-" + ident + ".qcow2" in names
    # The id is kept: the next run of the same deployment names the same volumes.
    assert volume_names(run("dev", previous=deployed(ev))) == names


def test_a_deployment_from_before_the_id_keeps_its_volume_names() -> None:
    legacy = deployed(run("dev"))
    del legacy["deploymentId"]
    ev = run("dev", previous=legacy)
    assert "dev-cp-1-root.qcow2" in volume_names(ev) and "dev-base.qcow2" in volume_names(ev)
    assert not [r for r in ev.resources if r.name == "deployment-id"]


# ------------------------------------------------------------------------------------------ addresses


def test_nodes_output_names_each_nodes_mac() -> None:
    nodes = run("dev").outputs["nodes"].value
    assert nodes["dev-cp-1"]["mac"].startswith("52:54:00:")


def test_going_from_one_load_balancer_to_two_is_refused_because_lb_1_would_move() -> None:
    single = stack_config("dev", loadBalancer={"replicas": 1})
    one = evaluate("dev", project_dir=ROOT, config=single)
    with pytest.raises(ConfigError) as caught:
        run("dev", previous=deployed(one), loadBalancer={"replicas": 2})
    rule = problems(caught)["loadBalancer.replicas"]
    assert "dev-lb-1 runs at 10.17.3.10" in rule and "10.17.3.11" in rule


def test_changing_the_network_of_a_running_cluster_is_refused() -> None:
    running = deployed(run("dev"))
    with pytest.raises(ConfigError) as caught:
        run("dev", previous=running, network={"mode": "nat", "cidr": "10.17.8.0/24"})
    found = problems(caught)
    assert "node dev-cp-1 runs at 10.17.3.31" in found["network.cidr"] and "10.17.8.31" in found["network.cidr"]


def test_moving_the_vip_of_a_running_cluster_is_refused() -> None:
    running = deployed(run("staging"))
    lb = dict(stack_config("staging")["kubeadm-ha:loadBalancer"], vip="10.17.4.9")
    with pytest.raises(ConfigError) as caught:
        run("staging", previous=running, loadBalancer=lb)
    assert set(problems(caught)) == {"loadBalancer.vip"}


def test_adding_workers_moves_no_running_node() -> None:
    running = deployed(run("dev"))
    run("dev", previous=running, workers={"replicas": 4})


# ------------------------------------------------------------------------------------------ versions


def test_a_new_cluster_on_an_end_of_life_minor_is_refused_with_the_date_and_next_minor() -> None:
    eol = RELEASES["1.34"]
    raw = {"network": {"cidr": "10.17.5.0/24"}, "kubernetes": {"version": eol.latest_patch}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, stack="t", today=eol.end_of_life + datetime.timedelta(days=1))
    rule = problems(caught)["kubernetes.version"]
    assert "end of life on 2026-10-27" in rule and "1.35" in rule
    # The day before, and for a running cluster on it (which may stay, and upgrade), it is accepted.
    parse_config(raw, stack="t", today=eol.end_of_life)
    running = PreviousDeployment({"kubernetesVersion": eol.latest_patch})
    parse_config(raw, stack="t", previous=running, today=eol.end_of_life + datetime.timedelta(days=400))
    upgrade = {**raw, "kubernetes": {"version": RELEASES["1.35"].latest_patch}}
    parse_config(upgrade, stack="t", previous=running, today=eol.end_of_life + datetime.timedelta(days=1))


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_the_stack_files_run_a_maintained_minor(stack: str) -> None:
    config = config_from_stack_file(str(ROOT / f"Pulumi.{stack}.yaml"), stack)
    assert RELEASES[config.kubernetes.minor].end_of_life >= datetime.date(2026, 12, 2)
