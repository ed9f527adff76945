"""Deterministic address and name plan: every node of a stack with its hostname, address and MAC.

Addresses are the role offsets of model/offsets.py. Workers are numbered from the start of their block,
so scaling the pool only adds or drops the highest-numbered ones.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from model.config import ClusterConfig
from model.offsets import GATEWAY_OFFSET, ROLE_BLOCKS, Role, mac_for, role_address


@dataclass(frozen=True)
class NodePlan:
    hostname: str
    role: Role
    index: int  # 1-based, as in the hostname
    address: ipaddress.IPv4Address
    mac: str

    @property
    def resource_name(self) -> str:
        return self.hostname


@dataclass(frozen=True)
class AddressPlan:
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    vip: ipaddress.IPv4Address
    nodes: tuple[NodePlan, ...]
    shortfall: str  # empty when every node fits in the network

    def role(self, role: Role) -> tuple[NodePlan, ...]:
        return tuple(node for node in self.nodes if node.role == role)

    @property
    def load_balancers(self) -> tuple[NodePlan, ...]:
        return self.role("lb")

    @property
    def control_planes(self) -> tuple[NodePlan, ...]:
        return self.role("cp")

    @property
    def etcd_members(self) -> tuple[NodePlan, ...]:
        return self.role("etcd")

    @property
    def workers(self) -> tuple[NodePlan, ...]:
        return self.role("worker")


def plan_addresses(config: ClusterConfig) -> AddressPlan:
    network = config.network.cidr
    vip = config.vip
    counts: dict[Role, int] = {
        "lb": config.load_balancer.replicas,
        # Stacked etcd members live on the control planes: no VMs of their own.
        "etcd": config.etcd.replicas if config.etcd.external else 0,
        "cp": config.control_plane.replicas,
        "worker": config.workers.replicas,
    }
    last_usable = int(network.broadcast_address) - int(network.network_address) - 1
    nodes: list[NodePlan] = []
    missing: list[str] = []
    for role, (start, size) in ROLE_BLOCKS.items():
        count = counts[role]
        capacity = (last_usable - start + 1) if size is None else min(size, last_usable - start + 1)
        if count > max(capacity, 0):
            missing.append(f"{count} {role} node(s) (room for {max(capacity, 0)} from offset {start})")
            continue
        for index in range(1, count + 1):
            # A lone load balancer needs no VRRP: it simply owns the API endpoint address.
            lone_lb = role == "lb" and count == 1
            address = vip if lone_lb else role_address(network, role, index)
            nodes.append(
                NodePlan(
                    hostname=f"{config.cluster_name}-{role}-{index}",
                    role=role,
                    index=index,
                    address=address,
                    mac=mac_for(address),
                )
            )
    return AddressPlan(
        network=network,
        # A NAT network's gateway is the host at .1; on a bridged LAN it is the LAN's router.
        gateway=config.network.gateway or network.network_address + GATEWAY_OFFSET,
        vip=vip,
        nodes=tuple(nodes),
        shortfall="; ".join(missing),
    )
