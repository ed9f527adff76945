"""Rules that relate several keys of one stack's configuration to each other, and the error that lists them.

Every problem in a stack file is reported in one error, each with its key path
(as the operator writes it in ``Pulumi.<stack>.yaml``) and the rule it breaks,
so that one edit-and-retry fixes them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from model.addressing import AddressPlan, plan_addresses
from model.config import ClusterConfig, EtcdConfig, NetworkConfig
from model.hostkeys import is_ssh_uri, uri_problems
from model.versions import etcd_version_of, release_for


@dataclass(frozen=True)
class Problem:
    path: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}"


class ConfigError(pulumi.RunError):
    """Raised before any resource is registered; lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid stack configuration ({len(problems)} problem(s)):\n{listing}")


def cross_field_problems(config: ClusterConfig) -> list[Problem]:
    """Rules that relate several keys to each other."""
    problems: list[Problem] = []
    network = config.network.cidr
    if config.network.mode == "nat" and len(config.hypervisors) > 1:
        problems.append(
            Problem(
                "hypervisors",
                f"{len(config.hypervisors)} hypervisors with network.mode nat; a libvirt NAT network is local to one "
                "host, so nodes on different hypervisors could not reach each other (use one hypervisor)",
            )
        )
    names = [hypervisor.name for hypervisor in config.hypervisors]
    for duplicate in sorted({name for name in names if names.count(name) > 1}):
        problems.append(Problem("hypervisors", f"name {duplicate!r} is used more than once"))
    problems.extend(_hypervisor_problems(config))

    subnets = {
        "network.cidr": network,
        "kubernetes.podSubnet": config.kubernetes.pod_subnet,
        "kubernetes.serviceSubnet": config.kubernetes.service_subnet,
    }
    keys = list(subnets)
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            if subnets[first].overlaps(subnets[second]):
                problems.append(
                    Problem(second, f"{subnets[second]} overlaps {first} {subnets[first]}; they must be disjoint")
                )

    problems.extend(_etcd_problems(config))

    plan = plan_addresses(config)
    if plan.shortfall:
        problems.append(
            Problem(
                "network.cidr",
                f"{network} is too small for {plan.shortfall}; use a larger prefix or fewer workers",
            )
        )
    problems.extend(_bridge_problems(config, plan))
    vip = config.vip
    if vip not in network or vip in (network.network_address, network.broadcast_address):
        problems.append(
            Problem("loadBalancer.vip", f"{vip} is not a usable host address inside network.cidr {network}")
        )
    elif vip == plan.gateway:
        problems.append(Problem("loadBalancer.vip", f"{vip} is the network gateway"))
    else:
        lone_lb_owns_vip = config.load_balancer.replicas == 1
        clash = [
            node.hostname for node in plan.nodes if node.address == vip and not (lone_lb_owns_vip and node.role == "lb")
        ]
        if clash:
            problems.append(Problem("loadBalancer.vip", f"{vip} is the address of node {clash[0]}"))
    return problems


def _hypervisor_problems(config: ClusterConfig) -> list[Problem]:
    problems: list[Problem] = []
    for position, hypervisor in enumerate(config.hypervisors):
        path = f"hypervisors.{position}"
        if not config.network.bridged and hypervisor.bridge is not None:
            problems.append(Problem(f"{path}.bridge", "only used with network.mode bridge"))
        if not is_ssh_uri(hypervisor.uri):
            if hypervisor.host_key is not None:
                problems.append(
                    Problem(f"{path}.hostKey", "only used with a qemu+ssh:// URI; this URI does not connect over SSH")
                )
            continue
        problems.extend(Problem(f"{path}.uri", rule) for rule in uri_problems(hypervisor.uri))
        if hypervisor.host_key is None:
            problems.append(
                Problem(
                    f"{path}.hostKey",
                    f"required for {hypervisor.uri}: the provider checks the host's SSH key against it, and no "
                    "connection trusts on first use (read it with `ssh-keyscan -t ed25519 HOST`, and compare its "
                    "fingerprint with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` run on the host)",
                )
            )
    return problems


def _bridge_problems(config: ClusterConfig, plan: AddressPlan) -> list[Problem]:
    """The LAN settings of network.mode bridge: present in that mode, absent otherwise, and clear of the nodes."""
    network = config.network
    bridge_keys = sorted(
        NetworkConfig.model_fields[name].alias or name
        for name in network.model_fields_set & {"bridge", "gateway", "dns", "reserved"}
    )
    if not network.bridged:
        return [
            Problem(f"network.{key}", "only used with network.mode bridge; a NAT network is its nodes' gateway and DNS")
            for key in bridge_keys
        ]
    problems: list[Problem] = []
    unbridged = [hypervisor.name for hypervisor in config.hypervisors if hypervisor.bridge is None]
    if network.bridge is None and unbridged:
        problems.append(
            Problem(
                "network.bridge",
                f"bridge mode attaches every node to a Linux bridge on its hypervisor; name it here, or as "
                f"hypervisors[].bridge for {', '.join(unbridged)}",
            )
        )
    nodes_at = {node.address: node.hostname for node in plan.nodes}
    taken = {**nodes_at, config.vip: "the VIP (loadBalancer.vip)"}
    if network.gateway is None:
        problems.append(Problem("network.gateway", "required with network.mode bridge: the LAN's router"))
    elif network.gateway not in network.cidr or network.gateway in (
        network.cidr.network_address,
        network.cidr.broadcast_address,
    ):
        problems.append(
            Problem(
                "network.gateway", f"{network.gateway} is not a usable host address inside network.cidr {network.cidr}"
            )
        )
    elif network.gateway in taken:
        problems.append(Problem("network.gateway", f"{network.gateway} is the address of {taken[network.gateway]}"))
    if not network.dns:
        problems.append(
            Problem("network.dns", "required with network.mode bridge: 1-3 name servers the nodes can reach")
        )
    problems.extend(
        Problem(f"network.dns.{i}", f"{server} is the address of {taken[server]}")
        for i, server in enumerate(network.dns)
        if server in taken
    )
    for i, entry in enumerate(network.reserved):
        if not entry.overlaps(network.cidr):
            problems.append(
                Problem(f"network.reserved.{i}", f"{entry} is outside network.cidr {network.cidr}; list this LAN's")
            )
            continue
        inside = [name for address, name in taken.items() if address in entry]
        if inside:
            problems.append(
                Problem(
                    f"network.reserved.{i}",
                    f"{entry} is in use on the LAN, but the plan puts {', '.join(inside)} there. Addresses are "
                    "fixed offsets of network.cidr (see README, Addresses and names) and never skip a reserved "
                    "one, so no running node moves when this list changes: use fewer nodes of that role, another "
                    "loadBalancer.vip, or a network where those offsets are free",
                )
            )
    return problems


def promotion_problems(config: ClusterConfig, stack: str) -> list[Problem]:
    """Rules of the `promotion` key that relate its fields to each other and to the stack."""
    promotion = config.promotion
    if promotion is None:
        return []
    problems: list[Problem] = []
    if promotion.source == stack:
        problems.append(
            Problem(
                "promotion.from",
                f"{promotion.source!r} is this stack itself; name the stack before it in the chain "
                "(dev -> staging -> prod)",
            )
        )
    reason = (promotion.reason or "").strip()
    if promotion.gate == "off" and not reason:
        problems.append(
            Problem(
                "promotion.reason",
                "gate: off needs a non-empty reason (every run logs it as a warning, and exports it)",
            )
        )
    elif promotion.gate == "on" and promotion.reason is not None:
        problems.append(Problem("promotion.reason", "only used with gate: off; with the gate on nothing is overridden"))
    return problems


def _etcd_problems(config: ClusterConfig) -> list[Problem]:
    etcd = config.etcd
    if not etcd.external:
        # Sizing keys would silently do nothing: stacked members live on the control planes.
        sizing = etcd.model_fields_set - {"topology", "backup", "maintenance", "timing"}
        ignored = sorted(EtcdConfig.model_fields[name].alias or name for name in sizing)
        return [
            Problem(
                f"etcd.{key}",
                "only used with etcd.topology external; stacked etcd runs one member on each control plane "
                "(size it with controlPlane)",
            )
            for key in ignored
        ]
    release = release_for(config.kubernetes.version)
    if config.etcd.version is not None and _etcd_tuple(config.etcd.version) < _etcd_tuple(release.min_external_etcd):
        return [
            Problem(
                "etcd.version",
                f"{config.etcd.version} is older than {release.min_external_etcd}, the oldest external etcd kubeadm "
                f"{release.minor} accepts (MinExternalEtcdVersion); use {release.etcd_image_tag}, the one it pins",
            )
        ]
    return []


def _etcd_tuple(tag: str) -> tuple[int, ...]:
    return tuple(int(part) for part in etcd_version_of(tag).split("."))
