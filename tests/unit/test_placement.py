"""model/placement.py and model/hostkeys.py, as pure functions."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
from pathlib import Path

import pytest

from model.addressing import NodePlan
from model.hostkeys import (
    ed25519_key_problem,
    expand_home,
    known_hosts_line,
    pin_host_key,
    pinned_uri,
    uri_problems,
    write_known_hosts,
)
from model.offsets import Role
from model.placement import host_loss_findings, hosts_needed_for_quorum, moved_nodes, place
from tests.integration.conftest import require_programs

HOSTS = ["a", "b", "c"]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHPidmmC5W1sYMY3FGc9k9hRFGbqH0jIG8LoIcYwxmQo"


def nodes(lb: int = 2, etcd: int = 0, cp: int = 3, worker: int = 3) -> list[NodePlan]:
    counts: dict[Role, int] = {"lb": lb, "etcd": etcd, "cp": cp, "worker": worker}
    found = []
    for role, count in counts.items():
        for index in range(1, count + 1):
            address = ipaddress.IPv4Address("10.0.0.1") + len(found)
            found.append(NodePlan(f"t-{role}-{index}", role, index, address, "52:54:00:00:00:01"))
    return found


def hosts_of(placement: dict[str, str], role: str) -> list[str]:
    return [host for name, host in placement.items() if f"-{role}-" in name]


# ------------------------------------------------------------------------------------------ placement


def test_a_new_cluster_spreads_each_role_and_balances_the_hosts() -> None:
    placement = place(nodes(etcd=3), HOSTS, {})
    for role in ("lb", "etcd", "cp", "worker"):
        assert len(set(hosts_of(placement, role))) == len(hosts_of(placement, role)), role
    load = [list(placement.values()).count(host) for host in HOSTS]
    assert max(load) - min(load) <= 1


def test_placement_is_deterministic_and_ignores_the_order_nodes_come_in() -> None:
    planned = nodes(etcd=3, worker=7)
    assert place(planned, HOSTS, {}) == place(list(reversed(planned)), HOSTS, {})


@pytest.mark.parametrize(
    ("workers", "more_workers", "more_hosts"), list(itertools.product([0, 2, 5], [0, 1, 4], [0, 1, 2]))
)
def test_running_nodes_never_move_when_hosts_or_workers_are_added(
    workers: int, more_workers: int, more_hosts: int
) -> None:
    before = place(nodes(worker=workers), HOSTS, {})
    hosts = ["d", "e"][:more_hosts] + HOSTS  # new hosts listed first: order must not matter
    after = place(nodes(worker=workers + more_workers), hosts, before)
    assert {name: after[name] for name in before} == before


def test_running_nodes_keep_even_a_clumped_placement() -> None:
    clumped = {node.hostname: "a" for node in nodes()}
    assert place(nodes(), HOSTS, clumped) == clumped


def test_a_host_gone_from_the_config_with_vms_on_it_is_reported() -> None:
    running = place(nodes(), HOSTS, {})
    (finding,) = moved_nodes(running, ["a", "b"])
    assert finding.path == "hypervisors" and "'c' is gone" in finding.rule
    assert all(name in finding.rule for name, host in running.items() if host == "c")
    assert moved_nodes(running, ["c", "b", "a", "d"]) == []


@pytest.mark.parametrize(("members", "hosts"), [(1, None), (3, 3), (5, 3), (7, 3)])
def test_hosts_needed_for_an_etcd_quorum_to_survive_one_loss(members: int, hosts: int | None) -> None:
    assert hosts_needed_for_quorum(members) == hosts


def test_three_hosts_survive_any_one_loss() -> None:
    for etcd in (0, 3):
        placed = place(nodes(etcd=etcd), HOSTS, {})
        assert host_loss_findings(nodes(etcd=etcd), placed, HOSTS, external_etcd=bool(etcd)) == []


def test_stacked_etcd_on_two_hosts_does_not_survive() -> None:
    placed = place(nodes(), ["a", "b"], {})
    (finding,) = host_loss_findings(nodes(), placed, ["a", "b"], external_etcd=False)
    assert finding.path == "hypervisors"
    assert "losing hypervisor 'a'" in finding.rule and "leaves 1 of 3" in finding.rule
    assert "need at least 3 hypervisors" in finding.rule


def test_a_lone_load_balancer_or_worker_survives_no_host_loss_whatever_the_hosts() -> None:
    planned = nodes(lb=1, worker=1)
    paths = {f.path for f in host_loss_findings(planned, place(planned, HOSTS, {}), HOSTS, external_etcd=False)}
    assert paths == {"loadBalancer.replicas", "workers.replicas"}


def test_clumped_running_nodes_are_named_with_the_way_out() -> None:
    clumped = {node.hostname: "a" for node in nodes()}
    findings = host_loss_findings(nodes(), clumped, HOSTS, external_etcd=False)
    assert {f.path for f in findings} == {"hypervisors"}
    assert all("lower the replicas and raise them again" in f.rule for f in findings)


# ------------------------------------------------------------------------------------------ host keys


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("qemu+ssh://root@hv.example/system?no_verify=0", "no_verify"),
        ("qemu+ssh://root@hv.example/system?known_hosts_verify=ignore", "known_hosts_verify"),
        ("qemu+ssh://root@hv.example:22/system", "port"),
        ("qemu+ssh:///system", "host name"),
        ("qemu+ssh://root@[::1]/system", "IPv6"),
    ],
)
def test_uris_the_pinned_key_cannot_protect_are_refused(uri: str, words: str) -> None:
    (problem,) = uri_problems(uri)
    assert words in problem


def test_a_plain_ssh_uri_with_its_own_options_is_accepted_and_pinned() -> None:
    uri = "qemu+ssh://kube@hv.example/system?keyfile=/k&socket=/run/libvirt/libvirt-sock"
    assert uri_problems(uri) == []
    assert pinned_uri(uri, "$HOME/k") == uri + "&knownhosts=$HOME/k"
    assert pinned_uri("qemu+ssh://hv/system", "$HOME/k") == "qemu+ssh://hv/system?knownhosts=$HOME/k"
    assert known_hosts_line(uri, KEY + " comment") == f"hv.example {KEY}\n"


@pytest.mark.parametrize("text", [KEY, KEY + " root@hv-b"])
def test_an_ed25519_public_key_is_accepted(text: str) -> None:
    assert ed25519_key_problem(text) is None


def test_write_known_hosts_is_atomic_private_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts" / "stack" / "hv"
    assert write_known_hosts(path, "a\n") is True
    assert path.read_text() == "a\n" and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    mtime = path.stat().st_mtime_ns
    assert write_known_hosts(path, "a\n") is False and path.stat().st_mtime_ns == mtime
    assert write_known_hosts(path, "b\n") is True and path.read_text() == "b\n"
    assert [p.name for p in path.parent.iterdir()] == ["hv"]


def test_home_must_be_absolute_for_the_provider_to_find_the_file() -> None:
    assert expand_home("$HOME/x", {"HOME": "/home/op"}) == Path("/home/op/x")
    with pytest.raises(RuntimeError, match="HOME"):
        expand_home("$HOME/x", {})


def test_openssh_reads_the_written_file_as_that_hosts_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ssh-keygen -F` finds the host with the pinned key: the line is in known_hosts format."""
    ssh_keygen = require_programs("ssh-keygen")["ssh-keygen"]
    monkeypatch.setenv("HOME", str(tmp_path))
    uri = pin_host_key("qemu+ssh://kube@hv-b.example/system", KEY, project="p", stack="s", hypervisor="hv-b")
    path = tmp_path / ".cache/kubeadm-ha/known_hosts/p/s/hv-b"
    assert uri.endswith("?knownhosts=$HOME/.cache/kubeadm-ha/known_hosts/p/s/hv-b")
    found = subprocess.run(
        [ssh_keygen, "-F", "hv-b.example", "-f", str(path)], capture_output=True, text=True, check=False, timeout=10
    )
    assert found.returncode == 0 and KEY in found.stdout, found.stdout + found.stderr
    other = subprocess.run(
        [ssh_keygen, "-F", "hv-a.example", "-f", str(path)], capture_output=True, text=True, check=False, timeout=10
    )
    assert other.returncode != 0
