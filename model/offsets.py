"""Where each node sits in the network: fixed offsets from the network address, by role.

Each role owns a fixed block of offsets, so adding or removing nodes of one role never moves a node of
another role, and the VIP and the gateway have offsets of their own. Pure arithmetic on addresses.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

Role = Literal["lb", "etcd", "cp", "worker"]

GATEWAY_OFFSET = 1
VIP_OFFSET = 10
# First offset of each role's block, and the block's size (None: to the end of the network).
ROLE_BLOCKS: dict[Role, tuple[int, int | None]] = {
    "lb": (11, 9),
    "etcd": (21, 9),
    "cp": (31, 19),
    "worker": (51, None),
}


def default_vip(network: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return network.network_address + VIP_OFFSET


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered QEMU MAC derived from the address: unique within the network, stable forever."""
    last_three = address.packed[1:]
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in last_three)


def role_address(network: ipaddress.IPv4Network, role: Role, index: int) -> ipaddress.IPv4Address:
    """The address of node `index` (1-based) of `role`, planned or not (e.g. an etcd member removed since)."""
    start, size = ROLE_BLOCKS[role]
    if index < 1 or (size is not None and index > size):
        raise ValueError(f"{role} node {index} is outside its block of {size} addresses")
    return network.network_address + start + index - 1
