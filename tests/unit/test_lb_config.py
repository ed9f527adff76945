"""The load balancer's rendered HAProxy and keepalived configuration (behaviour, not snapshots)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from model.addressing import AddressPlan, plan_addresses
from model.config import ClusterConfig
from model.stack import config_from_stack_file, parse_config
from render import lb_config

REPO = Path(__file__).resolve().parents[2]
STACKS = ("dev", "staging", "prod")


def stack(name: str) -> ClusterConfig:
    return config_from_stack_file(str(REPO / f"Pulumi.{name}.yaml"), name)


def five_cp_three_lb() -> ClusterConfig:
    return parse_config(
        {
            "network": {"cidr": "10.17.9.0/24"},
            "loadBalancer": {"replicas": 3},
            "controlPlane": {"replicas": 5},
            "workers": {"replicas": 4},
        },
        stack="big",
    )


def configs() -> dict[str, ClusterConfig]:
    return {**{name: stack(name) for name in STACKS}, "big": five_cp_three_lb()}


def servers(text: str) -> list[tuple[str, str]]:
    """(name, address:port) of every `server` line of a rendered haproxy.cfg."""
    return re.findall(r"^\s*server\s+(\S+)\s+(\S+)", text, flags=re.MULTILINE)


def peers_block(text: str) -> list[str]:
    match = re.search(r"unicast_peer \{\n(.*?)\n\s*\}", text, flags=re.DOTALL)
    assert match, text
    return match.group(1).split()


def section(text: str, header: str) -> str:
    """The indented body under the unindented line `header` of a haproxy.cfg."""
    match = re.search(rf"^{re.escape(header)}\n((?:[ \t]+.*\n|\n)*)", text, flags=re.MULTILINE)
    assert match, f"no section {header!r}"
    return match.group(1)


def directive(text: str, name: str) -> list[str]:
    """Values of every line of `text` that is `name <value...>` (comments excluded)."""
    return [
        line.split(None, 1)[1] if " " in line.strip() else ""
        for line in (raw.strip() for raw in text.splitlines())
        if line.split(None, 1)[:1] == [name]
    ]


# ----------------------------------------------------------------------------- HAProxy


@pytest.mark.parametrize("name", [*STACKS, "big"])
def test_haproxy_backends_are_the_control_planes_in_index_order(name: str) -> None:
    config = configs()[name]
    plan = plan_addresses(config)
    settings = lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan)
    expected = [(node.hostname, f"{node.address}:6443") for node in sorted(plan.control_planes, key=lambda n: n.index)]
    assert [(backend.name, f"{backend.address}:{backend.port}") for backend in settings.backends] == expected
    text = lb_config.render_haproxy_cfg(settings)
    assert servers(section(text, f"backend {lb_config.HAPROXY_BACKEND}")) == expected
    # The fail-open backend lists the same servers, unchecked (see test_haproxy_fails_open_...).
    assert servers(section(text, f"backend {lb_config.HAPROXY_FALLBACK_BACKEND}")) == expected
    assert servers(text) == expected * 2
    assert len(expected) == config.control_plane.replicas


@pytest.mark.parametrize("name", [*STACKS, "big"])
def test_haproxy_serves_the_api_port_on_every_address_in_tcp_mode(name: str) -> None:
    config = configs()[name]
    text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    binds = directive(text, "bind")
    assert f"*:{config.load_balancer.port}" in binds
    assert f"127.0.0.1:{lb_config.HAPROXY_HEALTH_PORT}" in binds  # health/stats: local only
    assert len(binds) == 2
    assert directive(text, "mode")[0] == "tcp"  # defaults: TLS passes through untouched
    assert directive(text, "balance") == ["roundrobin", "roundrobin"]


def test_haproxy_asks_each_apiserver_whether_it_is_ready() -> None:
    config = stack("staging")
    text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    assert "httpchk" in directive(section(text, "backend kube-apiserver"), "option")
    send = " ".join(directive(text, "http-check"))
    assert "uri /readyz" in send
    assert "expect status 200" in send
    (default_server,) = directive(text, "default-server")
    words = default_server.split()
    for word in ("check", "check-ssl"):
        assert word in words
    assert words[words.index("verify") + 1] == "none"  # the LB does not hold the cluster CA
    assert words[words.index("inter") + 1] == f"{lb_config.BACKEND_CHECK_INTER_S}s"
    assert words[words.index("fall") + 1] == str(lb_config.BACKEND_CHECK_FALL)
    assert words[words.index("rise") + 1] == str(lb_config.BACKEND_CHECK_RISE)
    # The per-server lines carry nothing that could override the shared check settings.
    assert all(len(line.split()) == 2 for line in directive(text, "server"))


def test_haproxy_fails_open_to_unchecked_servers_only_while_none_is_up() -> None:
    config = stack("staging")
    text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    checked, unchecked = lb_config.HAPROXY_BACKEND, lb_config.HAPROXY_FALLBACK_BACKEND
    frontend = section(text, "frontend kube-apiserver")
    assert directive(frontend, "use_backend") == [f"{unchecked} if {{ nbsrv({checked}) eq 0 }}"]
    assert directive(frontend, "default_backend") == [checked]
    fallback = section(text, f"backend {unchecked}")
    # No check of any kind: a server of this backend counts as up whatever state the checks saw.
    assert not directive(fallback, "default-server") and "check" not in fallback
    assert not [option for option in directive(fallback, "option") if "chk" in option]
    # A refused connection goes to the next server at every retry, not only the last (default -1).
    assert directive(fallback, "option") == ["redispatch 1"]


def test_haproxy_timeouts_suit_long_lived_watches() -> None:
    config = stack("prod")
    text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    timeouts = dict(value.split() for value in directive(section(text, "defaults"), "timeout"))

    def seconds(value: str) -> int:
        number, unit = int(value[:-1]), value[-1]
        return number * {"s": 1, "m": 60, "h": 3600}[unit]

    assert seconds(timeouts["connect"]) <= 10
    assert seconds(timeouts["client"]) >= 300
    assert seconds(timeouts["server"]) >= 300


def test_haproxy_custom_api_port_keeps_backends_on_6443() -> None:
    config = parse_config(
        {"network": {"cidr": "10.17.9.0/24"}, "loadBalancer": {"replicas": 2, "port": 8443}}, stack="custom"
    )
    text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    assert "*:8443" in directive(text, "bind")
    assert all(address.endswith(":6443") for _, address in servers(text))


def test_health_port_moves_aside_when_the_api_uses_it() -> None:
    config = parse_config(
        {"network": {"cidr": "10.17.9.0/24"}, "loadBalancer": {"replicas": 2, "port": lb_config.HAPROXY_HEALTH_PORT}},
        stack="clash",
    )
    settings = lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    assert settings.health_port != settings.frontend_port
    text = lb_config.render_haproxy_cfg(settings)
    assert f"127.0.0.1:{settings.health_port}" in directive(text, "bind")
    assert f"127.0.0.1:{settings.health_port}/" in lb_config.render_keepalived_check_script(settings.health_port)


def test_haproxy_settings_reject_nonsense() -> None:
    backend = lb_config.ApiBackend("c-cp-1", ipaddress.IPv4Address("10.0.0.31"))
    with pytest.raises(ValueError, match="at least one backend"):
        lb_config.HaproxySettings(frontend_port=6443, backends=())
    with pytest.raises(ValueError, match="not unique"):
        lb_config.HaproxySettings(frontend_port=6443, backends=(backend, backend))
    with pytest.raises(ValueError, match="health port"):
        lb_config.HaproxySettings(frontend_port=8404, backends=(backend,))
    with pytest.raises(ValueError, match="DNS label"):
        lb_config.ApiBackend("bad name\n    server evil", ipaddress.IPv4Address("10.0.0.31"))


# ----------------------------------------------------------------------------- keepalived


def test_single_load_balancer_gets_no_keepalived() -> None:
    config = stack("dev")
    plan = plan_addresses(config)
    (lb,) = plan.load_balancers
    assert lb.address == plan.vip  # it owns the API address itself
    assert lb_config.keepalived_settings(config.cluster_name, plan, lb) is None
    files = lb_config.lb_node_files(config.cluster_name, config.load_balancer.port, plan, lb)
    assert [file.path for file in files] == [lb_config.HAPROXY_CFG_PATH]


@pytest.mark.parametrize("name", ["staging", "prod", "big"])
def test_keepalived_peers_are_the_other_load_balancers(name: str) -> None:
    config = configs()[name]
    plan = plan_addresses(config)
    lb_addresses = {node.address for node in plan.load_balancers}
    for node in plan.load_balancers:
        settings = lb_config.keepalived_settings(config.cluster_name, plan, node)
        assert settings is not None
        assert settings.address == node.address
        assert set(settings.peers) == lb_addresses - {node.address}
        assert len(settings.peers) == len(plan.load_balancers) - 1
        text = lb_config.render_keepalived_conf(settings)
        assert directive(text, "unicast_src_ip") == [str(node.address)]
        assert peers_block(text) == [str(peer) for peer in settings.peers]


@pytest.mark.parametrize("name", ["staging", "prod", "big"])
def test_keepalived_priorities_are_distinct_and_favour_the_first(name: str) -> None:
    config = configs()[name]
    plan = plan_addresses(config)
    by_index = sorted(plan.load_balancers, key=lambda node: node.index)
    priorities = []
    for node in by_index:
        settings = lb_config.keepalived_settings(config.cluster_name, plan, node)
        assert settings is not None
        priorities.append(settings.priority)
        assert directive(lb_config.render_keepalived_conf(settings), "priority") == [str(settings.priority)]
    assert priorities == sorted(priorities, reverse=True)
    assert len(set(priorities)) == len(priorities)
    assert all(1 <= priority <= 254 for priority in priorities)


@pytest.mark.parametrize("name", ["staging", "prod", "big"])
def test_keepalived_holds_the_vip_on_eth0_and_tracks_haproxy(name: str) -> None:
    config = configs()[name]
    plan = plan_addresses(config)
    for node in plan.load_balancers:
        settings = lb_config.keepalived_settings(config.cluster_name, plan, node)
        assert settings is not None
        text = lb_config.render_keepalived_conf(settings)
        assert re.search(
            rf"virtual_ipaddress \{{\s*{re.escape(str(plan.vip))}/{plan.network.prefixlen} dev eth0\s*\}}", text
        )
        assert directive(text, "interface") == ["eth0"]
        assert directive(text, "state") == ["BACKUP"]  # every node; priority decides the first election
        assert directive(text, "nopreempt") == [""]
        assert directive(text, "virtual_router_id") == [str(lb_config.virtual_router_id(config.cluster_name))]
        assert directive(text, "enable_script_security") == [""]
        assert directive(text, "script_user")
        (script_name,) = re.findall(r"^vrrp_script (\S+) \{", text, flags=re.MULTILINE)
        track = re.search(r"track_script \{\s*(\S+)\s*\}", text)
        assert track and track.group(1) == script_name
        assert directive(text, "script") == [f'"{lb_config.KEEPALIVED_CHECK_SCRIPT_PATH}"']
        # No weight: a failing check must put the node in FAULT (weights cannot beat nopreempt).
        assert not directive(text, "weight")
        for word in ("pidof", "killall", "pgrep"):
            assert word not in text


def test_track_script_runs_every_3_seconds_and_never_overlaps_itself() -> None:
    """Each run forks a shell and curl: every second that cost the lab's TCG load balancers most of a CPU, and a
    run that outlived its 2 s timeout under a little load faulted the VIP holder for nothing (lab run 15). Every
    3 s as kubeadm's HA guide; a run ends (curl's own --max-time) before its timeout, which ends before the next."""
    config = configs()["staging"]
    plan = plan_addresses(config)
    settings = lb_config.keepalived_settings(config.cluster_name, plan, plan.load_balancers[0])
    assert settings is not None
    text = lb_config.render_keepalived_conf(settings)
    (interval,) = (int(value) for value in directive(text, "interval"))
    (timeout,) = (int(value) for value in directive(text, "timeout"))
    (max_time,) = re.findall(r"--max-time (\d+)", lb_config.render_keepalived_check_script())
    assert interval >= 3
    assert int(max_time) < timeout <= interval
    assert directive(text, "fall") == ["2"]


def test_virtual_router_id_is_stable_per_cluster_and_in_range() -> None:
    ids = {name: lb_config.virtual_router_id(name) for name in ("dev", "staging", "prod", "big", "a", "z" * 40)}
    assert all(1 <= value <= 255 for value in ids.values())
    assert ids["staging"] != ids["prod"]  # the two real multi-LB stacks must not collide
    assert lb_config.virtual_router_id("staging") == ids["staging"]
    config = five_cp_three_lb()
    plan = plan_addresses(config)
    found = set()
    for node in plan.load_balancers:
        settings = lb_config.keepalived_settings(config.cluster_name, plan, node)
        assert settings is not None
        found.add(settings.virtual_router_id)
    assert found == {lb_config.virtual_router_id("big")}


def test_check_script_probes_haproxys_local_monitor_uri() -> None:
    text = lb_config.render_keepalived_check_script()
    assert text.startswith("#!/bin/sh\n")
    assert f"http://127.0.0.1:{lb_config.HAPROXY_HEALTH_PORT}{lb_config.HAPROXY_HEALTH_URI}" in text
    assert "--fail" in text
    assert "--max-time" in text
    config = stack("staging")
    haproxy = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(config.cluster_name, config.load_balancer.port, plan_addresses(config))
    )
    assert directive(haproxy, "monitor-uri") == [lb_config.HAPROXY_HEALTH_URI]


def test_keepalived_settings_reject_nonsense() -> None:
    good = lb_config.KeepalivedSettings(
        hostname="c-lb-1",
        interface="eth0",
        address=ipaddress.IPv4Address("10.0.0.11"),
        peers=(ipaddress.IPv4Address("10.0.0.12"),),
        vip=ipaddress.IPv4Address("10.0.0.10"),
        prefix_length=24,
        virtual_router_id=7,
        priority=150,
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"peers": ()}, "at least one peer"),
        ({"peers": (ipaddress.IPv4Address("10.0.0.11"),)}, "exclude this node"),
        ({"vip": ipaddress.IPv4Address("10.0.0.12")}, "address of a load balancer"),
        ({"peers": (ipaddress.IPv4Address("10.0.1.12"),)}, "outside"),
        ({"virtual_router_id": 0}, "virtual_router_id"),
        ({"priority": 255}, "priority"),
        ({"interface": "eth0 dev lo"}, "interface"),
        ({"check_script": "/etc/keepalived/../x"}, "unsafe"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(good, **change)


def test_keepalived_settings_only_for_load_balancers() -> None:
    config = stack("staging")
    plan = plan_addresses(config)
    with pytest.raises(ValueError, match="not a load balancer"):
        lb_config.keepalived_settings(config.cluster_name, plan, plan.control_planes[0])


# ----------------------------------------------------------------------------- determinism and files


def _shuffled(plan: AddressPlan) -> AddressPlan:
    return dataclasses.replace(plan, nodes=tuple(reversed(plan.nodes)))


@pytest.mark.parametrize("name", [*STACKS, "big"])
def test_rendering_is_deterministic(name: str) -> None:
    first_config, second_config = configs()[name], configs()[name]
    first, second = plan_addresses(first_config), _shuffled(plan_addresses(second_config))
    first_text = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(first_config.cluster_name, first_config.load_balancer.port, first)
    )
    assert first_text == lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(second_config.cluster_name, second_config.load_balancer.port, second)
    )
    assert first_text == lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(first_config.cluster_name, first_config.load_balancer.port, first)
    )
    for node in first.load_balancers:
        other = next(candidate for candidate in second.load_balancers if candidate.hostname == node.hostname)
        assert lb_config.lb_node_files(
            first_config.cluster_name, first_config.load_balancer.port, first, node
        ) == lb_config.lb_node_files(second_config.cluster_name, second_config.load_balancer.port, second, other)


def test_adding_a_control_plane_changes_only_the_backend_list() -> None:
    three = stack("staging")
    five = parse_config(
        {
            "network": {"cidr": "10.17.4.0/24"},
            "loadBalancer": {"replicas": 2, "vip": "10.17.4.10"},
            "controlPlane": {"replicas": 5},
        },
        stack="staging",
    )
    before = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(three.cluster_name, three.load_balancer.port, plan_addresses(three))
    )
    after = lb_config.render_haproxy_cfg(
        lb_config.haproxy_settings(five.cluster_name, five.load_balancer.port, plan_addresses(five))
    )
    assert before != after
    for backend in (lb_config.HAPROXY_BACKEND, lb_config.HAPROXY_FALLBACK_BACKEND):
        assert servers(section(after, f"backend {backend}"))[:3] == servers(section(before, f"backend {backend}"))
    assert [line for line in before.splitlines() if "server " not in line] == [
        line for line in after.splitlines() if "server " not in line
    ]


@pytest.mark.parametrize("name", ["staging", "prod", "big"])
def test_lb_node_files_for_a_vrrp_pair(name: str) -> None:
    config = configs()[name]
    plan = plan_addresses(config)
    node = plan.load_balancers[-1]
    files = {
        file.path: file for file in lb_config.lb_node_files(config.cluster_name, config.load_balancer.port, plan, node)
    }
    assert set(files) == {
        lb_config.HAPROXY_CFG_PATH,
        lb_config.KEEPALIVED_CONF_PATH,
        lb_config.KEEPALIVED_CHECK_SCRIPT_PATH,
    }
    assert files[lb_config.KEEPALIVED_CHECK_SCRIPT_PATH].mode == 0o755
    assert files[lb_config.HAPROXY_CFG_PATH].mode == 0o644
    assert f"router_id {node.hostname}" in files[lb_config.KEEPALIVED_CONF_PATH].content
    for file in files.values():
        assert "$" not in file.content.replace("$$", "")  # no template placeholder left behind
        assert file.content.endswith("\n")
