"""Config validation: every problem, with its key path and the rule it breaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model.addressing import plan_addresses
from model.rules import ConfigError
from model.stack import config_from_stack_file, parse_config

ROOT = Path(__file__).resolve().parents[2]


def problems(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, stack="test")
    return {problem.path: problem.rule for problem in caught.value.problems}


def base(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"network": {"mode": "nat", "cidr": "10.17.3.0/24"}}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_stack_files_are_valid(stack: str) -> None:
    config = config_from_stack_file(str(ROOT / f"Pulumi.{stack}.yaml"), stack)
    assert config.cluster_name == stack
    assert config.control_plane.replicas == 3


def test_defaults_fill_in_and_cluster_name_defaults_to_stack() -> None:
    config = parse_config(base(), stack="lab")
    assert config.cluster_name == "lab"
    assert config.hypervisors[0].uri == "qemu:///system"
    assert str(config.vip) == "10.17.3.10"
    assert config.kubernetes.cni == "calico"


def test_even_control_plane_count_is_refused_with_the_reason() -> None:
    found = problems(base(controlPlane={"replicas": 2}))
    assert "controlPlane.replicas" in found
    assert "even" in found["controlPlane.replicas"] and "quorum" in found["controlPlane.replicas"]


def test_every_field_problem_is_reported_at_once() -> None:
    found = problems(
        base(
            controlPlane={"replicas": 4, "cpus": 1, "memoryMiB": 1024},
            kubernetes={"version": "1.30.4", "cni": "weave"},
            workers={"replicas": -1},
            network={"mode": "nat", "cidr": "10.17.3.0/24", "typo": 1},
        )
    )
    assert set(found) >= {
        "controlPlane.replicas",
        "controlPlane.cpus",
        "controlPlane.memoryMiB",
        "kubernetes.version",
        "kubernetes.cni",
        "workers.replicas",
        "network.typo",
    }
    assert "known: 1.34, 1.35, 1.36, 1.37" in found["kubernetes.version"]


def test_cross_field_rules() -> None:
    found = problems(
        base(
            kubernetes={"podSubnet": "10.17.0.0/16", "serviceSubnet": "10.17.3.0/24"},
            loadBalancer={"vip": "10.17.3.1"},
        )
    )
    assert "overlaps" in found["kubernetes.podSubnet"]
    assert "overlaps" in found["kubernetes.serviceSubnet"]
    assert "gateway" in found["loadBalancer.vip"]


@pytest.mark.parametrize(
    ("vip", "rule"),
    [("10.17.9.10", "inside network.cidr"), ("10.17.3.31", "address of node test-cp-1"), ("10.17.3.255", "usable")],
)
def test_vip_rules(vip: str, rule: str) -> None:
    assert rule in problems(base(loadBalancer={"vip": vip}))["loadBalancer.vip"]


def test_network_too_small() -> None:
    found = problems(base(network={"cidr": "10.17.3.0/26"}, workers={"replicas": 20}))
    assert "too small" in found["network.cidr"]


def test_invalid_cidr_and_version() -> None:
    found = problems(base(network={"cidr": "10.17.3.1/24"}, kubernetes={"version": "latest"}))
    assert "network.cidr" in found
    assert "MAJOR.MINOR.PATCH" in found["kubernetes.version"]


def test_nat_network_with_several_hypervisors_is_refused() -> None:
    found = problems(base(hypervisors=[{"name": "a", "uri": "qemu+ssh://a/system"}, {"name": "b"}]))
    assert "NAT" in found["hypervisors"]


def test_message_lists_each_problem_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(base(controlPlane={"replicas": 2}, workers={"replicas": -1}), stack="test")
    message = str(caught.value)
    assert "controlPlane.replicas: 2 is even; etcd quorum needs an odd count (1, 3, 5, 7)" in message
    assert "workers.replicas" in message


def test_address_plan_is_stable_when_workers_scale() -> None:
    small = plan_addresses(parse_config(base(workers={"replicas": 2}), stack="t"))
    large = plan_addresses(parse_config(base(workers={"replicas": 5}), stack="t"))
    small_addresses = {node.hostname: node.address for node in small.nodes}
    large_addresses = {node.hostname: node.address for node in large.nodes}
    assert all(large_addresses[name] == address for name, address in small_addresses.items())
    addresses = [node.address for node in large.nodes]
    macs = [node.mac for node in large.nodes]
    assert len(set(addresses)) == len(addresses) and len(set(macs)) == len(macs)
    assert large.vip not in addresses and large.gateway not in addresses


def test_hostnames_follow_the_role_scheme() -> None:
    plan = plan_addresses(parse_config(base(loadBalancer={"replicas": 2}), stack="t"))
    assert [node.hostname for node in plan.nodes] == [
        "t-lb-1",
        "t-lb-2",
        "t-cp-1",
        "t-cp-2",
        "t-cp-3",
        "t-worker-1",
        "t-worker-2",
    ]


def test_etcd_timing_is_refused_where_etcd_would_refuse_it() -> None:
    """etcd v3.7.0 embed/config.go Validate: both above 0, election timeout >= 5 x heartbeat and <= 50000 ms."""
    path = "etcd.timing"

    def timing(heartbeat: int, election: int) -> dict[str, Any]:
        return base(etcd={"timing": {"heartbeatIntervalMs": heartbeat, "electionTimeoutMs": election}})

    assert "electionTimeoutMs 499 must be at least 5 x heartbeatIntervalMs 100" in problems(timing(100, 499))[path]
    assert set(problems(timing(100, 50001))) == {f"{path}.electionTimeoutMs"}
    assert set(problems(timing(0, 1000))) == {f"{path}.heartbeatIntervalMs"}
    assert set(problems(base(etcd={"timing": {"heartbeatInterval": "500ms"}}))) == {f"{path}.heartbeatInterval"}
    accepted = parse_config(timing(100, 500), stack="lab").etcd.timing
    assert accepted is not None and (accepted.heartbeat_interval_ms, accepted.election_timeout_ms) == (100, 500)
    assert parse_config(timing(10000, 50000), stack="lab").etcd.timing is not None
    assert parse_config(base(), stack="lab").etcd.timing is None


def test_leader_election_timing_is_refused_where_the_components_would_refuse_it() -> None:
    """client-go v0.37.2 NewLeaderElector: leaseDuration > renewDeadline > 1.2 x retryPeriod."""
    path = "controlPlane.leaderElection"

    def timing(lease: int, renew: int, retry: int) -> dict[str, Any]:
        seconds = {"leaseDurationSeconds": lease, "renewDeadlineSeconds": renew, "retryPeriodSeconds": retry}
        return base(controlPlane={"leaderElection": seconds})

    assert "leaseDurationSeconds 30 must be greater than renewDeadlineSeconds 30" in problems(timing(30, 30, 2))[path]
    too_short = problems(timing(60, 12, 10))[path]
    assert "renewDeadlineSeconds 12 must be greater than 1.2 x retryPeriodSeconds 10" in too_short
    assert set(problems(base(controlPlane={"leaderElection": {"leaseDuration": "60s"}}))) == {f"{path}.leaseDuration"}
    accepted = parse_config(timing(60, 13, 10), stack="lab").control_plane.leader_election
    assert accepted is not None and (accepted.lease_duration_seconds, accepted.retry_period_seconds) == (60, 10)
    assert parse_config(base(), stack="lab").control_plane.leader_election is None
