"""HA across physical hosts (issue 12): the program under mocks for a three-hypervisor bridged stack.

Placement, providers, NICs, seed documents and pinned host keys as the program registers them; placement
stable across day-2 changes (judged against the last deployment's `nodes` output); and every refused
configuration refused with its key path.
"""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.hostkeys import expand_home
from model.rules import ConfigError
from tests.program.test_platform import problems
from tools.graph import DeploymentGraph
from tools.offline import Evaluation, Registration, evaluate
from tools.plan import render_summary

ROOT = Path(__file__).resolve().parents[2]
STACK = "prod-multihost"
PROVIDER = "pulumi:providers:libvirt"
DOMAIN = "libvirt:index/domain:Domain"
DISK = "libvirt:index/cloudInitDisk:CloudInitDisk"
# A fourth host's key (ssh-keygen -t ed25519; the private half was thrown away).
HV_D_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNRD9Vxq/Q9nEU7N3mfastFsfJ4HtOMR5LhV6vRppOj"


def stack_config(**overrides: Any) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / f"Pulumi.{STACK}.yaml").read_text())["config"]
    for key, value in overrides.items():
        current = config.get(f"kubeadm-ha:{key}")
        config[f"kubeadm-ha:{key}"] = {**current, **value} if isinstance(current, dict) else value
    return config


def hypervisors(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*stack_config()["kubeadm-ha:hypervisors"], *extra]


def run(previous: Evaluation | None = None, **overrides: Any) -> Evaluation:
    return evaluate(
        STACK,
        project_dir=ROOT,
        config=stack_config(**overrides),
        previous_outputs={name: out.value for name, out in previous.outputs.items()} if previous else None,
    )


def refused(previous: Evaluation | None = None, **overrides: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        run(previous, **overrides)
    return problems(caught)


@functools.cache
def multihost() -> Evaluation:
    return evaluate(STACK, project_dir=ROOT)


def placement(ev: Evaluation) -> dict[str, str]:
    return {name: node["hypervisor"] for name, node in ev.outputs["nodes"].value.items()}


def by_role(ev: Evaluation) -> dict[str, list[str]]:
    """role -> the hypervisors of its nodes, in index order."""
    nodes = ev.outputs["nodes"].value
    found: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(nodes, key=lambda n: int(n.rsplit("-", 1)[1])):
        found[nodes[name]["role"]].append(nodes[name]["hypervisor"])
    return found


def node_of(resource: Registration, ev: Evaluation) -> str | None:
    hostnames = sorted(ev.outputs["nodes"].value, key=len, reverse=True)
    return next((h for h in hostnames if resource.name == h or resource.name.startswith(h + "-")), None)


# ------------------------------------------------------------------------------------------ placement


def test_every_role_is_spread_over_the_three_hypervisors() -> None:
    roles = by_role(multihost())
    for role in ("lb", "etcd", "cp"):
        assert len(set(roles[role])) == len(roles[role]), (role, roles[role])
    assert sorted(roles["etcd"]) == sorted(roles["cp"]) == ["hv-a", "hv-b", "hv-c"]
    # Round-robin workers: one per host.
    assert sorted(roles["worker"]) == ["hv-a", "hv-b", "hv-c"]
    # Placement is part of the deployment record, and it survives a host loss: no warning.
    assert not [log for log in multihost().logs if log.severity == "warning"]


def test_one_provider_per_hypervisor_and_every_libvirt_resource_uses_its_nodes_host() -> None:
    ev = multihost()
    providers = {p.name.removesuffix("-libvirt"): p for p in ev.by_type(PROVIDER)}
    assert set(providers) == {"hv-a", "hv-b", "hv-c"}
    reference = {name: f"{p.urn}::{p.id}" for name, p in providers.items()}
    where = placement(ev)
    libvirt_resources = [r for r in ev.resources if r.type.startswith("libvirt:")]
    assert len(libvirt_resources) == 4 * len(where) + 3  # root, key, seed, domain per node; a base image per host
    for resource in libvirt_resources:
        node = node_of(resource, ev)
        host = where[node] if node else resource.name.removesuffix("-base-image")
        assert resource.provider == reference[host], resource.name


def test_bridged_nodes_attach_to_their_hosts_bridge_and_no_libvirt_network_exists() -> None:
    ev = multihost()
    assert not ev.by_type("libvirt:index/network:Network")
    where = placement(ev)
    nodes = ev.outputs["nodes"].value
    for domain in ev.by_type(DOMAIN):
        (nic,) = domain.inputs["networkInterfaces"]
        hostname = domain.inputs["name"]
        expected_bridge = "br-lan" if where[hostname] == "hv-c" else "br0"
        assert nic == {"bridge": expected_bridge, "mac": nodes[hostname]["mac"], "waitForLease": False}


def test_seed_documents_carry_the_static_address_gateway_and_dns() -> None:
    ev = multihost()
    nodes = ev.outputs["nodes"].value
    disks = ev.by_type(DISK)
    assert len(disks) == len(nodes)
    for disk in disks:
        hostname = disk.name.removesuffix("-cloud-init")
        eth0 = yaml.safe_load(disk.inputs["networkConfig"])["network"]["ethernets"]["eth0"]
        assert eth0["match"] == {"macaddress": nodes[hostname]["mac"]} and eth0["set-name"] == "eth0"
        assert eth0["dhcp4"] is False and eth0["dhcp6"] is False
        assert eth0["addresses"] == [f"{nodes[hostname]['address']}/24"]
        assert eth0["routes"] == [{"to": "0.0.0.0/0", "via": "10.40.0.1"}]
        assert eth0["nameservers"] == {"addresses": ["10.40.0.1", "10.40.0.2"]}


def test_membership_steps_go_with_their_hosts_base_image_not_a_network() -> None:
    ev = multihost()
    where = placement(ev)
    images = {r.name.removesuffix("-base-image"): r.urn for r in ev.by_type("libvirt:index/volume:Volume")}
    anchored = [r for r in ev.resources if r.deleted_with]
    assert anchored
    for step in anchored:
        # Steps named after the node they remove (join-token, reset, membership, etcd member) go with its host.
        assert step.deleted_with == images[where[node_of(step, ev) or ""]], step.name


def test_each_remote_hypervisor_is_checked_against_its_pinned_key() -> None:
    ev = multihost()
    keys = {h["name"]: h["hostKey"] for h in hypervisors()}
    for provider in ev.by_type(PROVIDER):
        name = provider.name.removesuffix("-libvirt")
        path = f"$HOME/.cache/kubeadm-ha/known_hosts/kubeadm-ha/{STACK}/{name}"
        # The same input on every machine: $HOME stays for the provider to expand.
        assert provider.inputs["uri"] == f"qemu+ssh://kubeadm@{name}.lan.example/system?knownhosts={path}"
        known_hosts = expand_home(path)
        assert known_hosts.read_text() == f"{name}.lan.example {keys[name]}\n"
        assert known_hosts.stat().st_mode & 0o777 == 0o600
        assert str(known_hosts).startswith(os.environ["HOME"] + "/")


def test_a_changed_host_key_rewrites_the_file_the_next_run_reads() -> None:
    changed = [dict(h) for h in hypervisors()]
    changed[0]["hostKey"] = changed[1]["hostKey"]
    run(hypervisors=changed)
    path = expand_home(f"$HOME/.cache/kubeadm-ha/known_hosts/kubeadm-ha/{STACK}/hv-a")
    assert path.read_text() == f"hv-a.lan.example {changed[1]['hostKey']}\n"
    multihost.cache_clear()
    multihost()
    assert path.read_text() == f"hv-a.lan.example {hypervisors()[0]['hostKey']}\n"


def test_the_offline_plan_shows_where_each_vm_runs() -> None:
    summary = render_summary(multihost(), DeploymentGraph(multihost()))
    section = summary.split("## Placement", 1)[1].split("##", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| hv-")]
    assert len(rows) == 3
    for host, names in placement_rows(rows).items():
        assert names == sorted(name for name, where in placement(multihost()).items() if where == host)


def placement_rows(rows: list[str]) -> dict[str, list[str]]:
    return {row.split("|")[1].strip(): row.split("|")[2].strip().split(", ") for row in rows}


# ------------------------------------------------------------------------------------------ stability


def test_adding_a_hypervisor_and_workers_moves_no_running_vm() -> None:
    first = multihost()
    fourth = {"name": "hv-d", "uri": "qemu+ssh://kubeadm@hv-d.lan.example/system", "hostKey": HV_D_KEY}
    # The new host listed first: order in the list must not matter to running VMs either.
    grown = run(first, hypervisors=[fourth, *hypervisors()], workers={"replicas": 5})
    before, after = placement(first), placement(grown)
    assert {name: after[name] for name in before} == before
    # The empty host takes the next new nodes: fewest workers, then (a tie at one each) fewest VMs overall.
    assert after[f"{STACK}-worker-4"] == after[f"{STACK}-worker-5"] == "hv-d"
    # And a later run that changes nothing changes no placement.
    assert placement(run(grown, hypervisors=[fourth, *hypervisors()], workers={"replicas": 5})) == after


def test_a_node_removed_and_added_again_is_placed_afresh() -> None:
    first = multihost()
    fewer = run(first, workers={"replicas": 2})
    assert f"{STACK}-worker-3" not in placement(fewer)
    again = run(fewer, workers={"replicas": 3})
    assert placement(again) == placement(first)


# ------------------------------------------------------------------------------------------ refusals


def test_removing_a_hypervisor_that_still_runs_vms_is_refused() -> None:
    found = refused(multihost(), hypervisors=hypervisors()[:2])
    assert "'hv-c' is gone" in found["hypervisors"] and f"{STACK}-cp-1" in found["hypervisors"]


def test_renaming_a_hypervisor_is_refused_because_its_vms_would_move() -> None:
    renamed = [dict(h) for h in hypervisors()]
    renamed[2]["name"] = "hv-z"
    found = refused(multihost(), hypervisors=renamed)
    assert "'hv-c' is gone" in found["hypervisors"]


def test_a_new_stack_on_two_hosts_is_refused_under_strict_and_warned_otherwise() -> None:
    two = hypervisors()[:2]
    found = refused(hypervisors=two)
    # 3 etcd members on 2 hosts: one host runs two of them.
    assert "etcd members" in found["hypervisors"] and "need at least 3 hypervisors" in found["hypervisors"]
    ev = run(hypervisors=two, placement="warn")
    (warning,) = [log.message for log in ev.logs if log.severity == "warning"]
    assert "does not survive the loss of one hypervisor" in warning and "etcd loses its quorum" in warning


def test_one_load_balancer_cannot_survive_a_host_loss_under_strict() -> None:
    found = refused(loadBalancer={"replicas": 1, "vip": "10.40.0.10"})
    assert "raise loadBalancer.replicas" in found["loadBalancer.replicas"]


def test_switching_a_running_cluster_between_nat_and_bridge_is_refused() -> None:
    found = refused(multihost(), network={"mode": "nat"})
    assert "network.mode" in found


@pytest.mark.parametrize(
    ("network", "path", "words"),
    [
        ({"gateway": "10.41.0.1"}, "network.gateway", "not a usable host address"),
        ({"gateway": "10.40.0.31"}, "network.gateway", f"{STACK}-cp-1"),
        ({"gateway": "10.40.0.10"}, "network.gateway", "the VIP"),
        ({"gateway": None}, "network.gateway", "required"),
        ({"dns": []}, "network.dns", "required"),
        ({"dns": ["10.40.0.11"]}, "network.dns.0", f"{STACK}-lb-1"),
        ({"reserved": ["10.40.0.8/29"]}, "network.reserved.0", "the VIP"),
        ({"reserved": ["10.40.0.48/28"]}, "network.reserved.0", f"{STACK}-worker-1"),
        ({"reserved": ["192.168.1.0/24"]}, "network.reserved.0", "outside network.cidr"),
        ({"bridge": None}, "network.bridge", "hv-a, hv-b"),
    ],
)
def test_bridged_network_mistakes_are_refused_with_their_key_path(
    network: dict[str, Any], path: str, words: str
) -> None:
    lan = {
        key: value for key, value in {**stack_config()["kubeadm-ha:network"], **network}.items() if value is not None
    }
    with pytest.raises(ConfigError) as caught:
        evaluate(STACK, project_dir=ROOT, config={**stack_config(), "kubeadm-ha:network": lan})
    assert words in problems(caught)[path]


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"hostKey": None}, "hypervisors.0.hostKey", "ssh-keyscan -t ed25519"),
        ({"uri": "qemu:///system"}, "hypervisors.0.hostKey", "only used with a qemu+ssh"),
        ({"uri": "qemu+ssh://kubeadm@hv-a.lan.example/system?no_verify=0"}, "hypervisors.0.uri", "no_verify"),
        ({"uri": "qemu+ssh://kubeadm@hv-a.lan.example/system?knownhosts=/x"}, "hypervisors.0.uri", "knownhosts"),
        ({"uri": "qemu+ssh://kubeadm@hv-a.lan.example:2222/system"}, "hypervisors.0.uri", "port"),
        ({"hostKey": f"hv-a.lan.example {HV_D_KEY}"}, "hypervisors.0.hostKey", "drop the host name"),
        ({"hostKey": HV_D_KEY[:-8]}, "hypervisors.0.hostKey", "not a complete ssh-ed25519 key"),
        ({"hostKey": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"}, "hypervisors.0.hostKey", "ssh-ed25519"),
    ],
)
def test_hypervisor_access_mistakes_are_refused_with_their_key_path(
    change: dict[str, Any], path: str, words: str
) -> None:
    first = {key: value for key, value in {**hypervisors()[0], **change}.items() if value is not None}
    found = refused(hypervisors=[first, *hypervisors()[1:]])
    assert words in found[path], found


def test_nat_keeps_its_one_hypervisor_and_refuses_the_lan_keys() -> None:
    nat = {"mode": "nat", "cidr": "10.40.0.0/24"}
    config = {**stack_config(), "kubeadm-ha:network": {**nat, "gateway": "10.40.0.1", "bridge": "br0"}}
    with pytest.raises(ConfigError) as caught:
        evaluate(STACK, project_dir=ROOT, config=config)
    found = problems(caught)
    assert "a libvirt NAT network is local to one host" in found["hypervisors"]
    assert "only used with network.mode bridge" in found["network.gateway"]
    assert "only used with network.mode bridge" in found["network.bridge"]
    assert "only used with network.mode bridge" in found["hypervisors.2.bridge"]
