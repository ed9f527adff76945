"""The API load balancer's configuration files, rendered from the stack config.

Pure functions: typed settings are derived from the cluster name, the API port and
the `AddressPlan`, then rendered through the templates in ``render/templates``. Identical
inputs give byte-identical text, because the remote step that writes these
files re-runs whenever the text changes (e.g. a control plane is added).

HAProxy (every LB node) forwards TCP ``*:loadBalancer.port`` to kube-apiserver on
every control plane, health-checked with ``GET /readyz``; while no control plane passes,
it fails open to all of them unchecked rather than closing every connection. With two or more LB
nodes keepalived holds the VIP over unicast VRRP and tracks HAProxy through a
local monitor URI; a single LB node owns the VIP as its own address and runs
no keepalived.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from render.scripts import BundleFile

if TYPE_CHECKING:
    from model.addressing import AddressPlan, NodePlan

HAPROXY_CFG_PATH = "/etc/haproxy/haproxy.cfg"
KEEPALIVED_CONF_PATH = "/etc/keepalived/keepalived.conf"
KEEPALIVED_CHECK_SCRIPT_PATH = "/etc/keepalived/check_haproxy.sh"

APISERVER_PORT = 6443
# HAProxy's local-only health/stats frontend (127.0.0.1), probed by keepalived.
HAPROXY_HEALTH_PORT = 8404
HAPROXY_HEALTH_URI = "/healthz"
HAPROXY_STATS_URI = "/stats"
# HAProxy's backends: the checked one, and the one clients get while no server of it is UP.
HAPROXY_BACKEND = "kube-apiserver"
HAPROXY_FALLBACK_BACKEND = "kube-apiserver-unchecked"
# cloud-init's network config renames every node's NIC to eth0 (matched by MAC).
LB_INTERFACE = "eth0"
# keepalived runs the track script as this user; it exists on every Debian/Ubuntu.
KEEPALIVED_SCRIPT_USER = "nobody"

# VRRP timing: adverts every second, so a lost load balancer (or a stopped keepalived) moves the VIP within
# about 3 s whatever the track script does. The track script forks a shell and curl each run: every 3 s, as
# kubeadm's HA guide has it (kubernetes/kubeadm docs/ha-considerations.md: `interval 3`), a dead or hung
# HAProxy releases the VIP after 2 failed runs, within about 9 s. Every second, as before, cost a slow LB most
# of a CPU: the cluster lab's LBs (QEMU TCG) took 0.73 s of CPU and 1.4 s per curl run, and with `timeout 2`
# a little extra load there timed the script out and moved the VIP for nothing (lab run 15).
VRRP_ADVERT_INT = 1
CHECK_INTERVAL = 3
CHECK_TIMEOUT = 3
CHECK_FALL = 2
CHECK_RISE = 2
# HAProxy backend checks: a failed apiserver is out of rotation after at most
# inter + (fall - 1) * fastinter seconds, and back after rise * inter.
BACKEND_CHECK_INTER_S = 2
BACKEND_CHECK_FASTINTER_S = 1
BACKEND_CHECK_FALL = 3
BACKEND_CHECK_RISE = 2
# `spread-checks`: each check interval is jittered by up to this many percent.
CHECK_SPREAD_PERCENT = 5


def _stretched(seconds: float) -> int:
    return math.ceil(seconds * (100 + CHECK_SPREAD_PERCENT) / 100)


# What a step that restarts kube-apiserver must allow for, because it cannot see the load balancers:
# a restarted API server listens before it is ready (its RBAC cache still empty, it answers 403), and
# HAProxy keeps sending it clients until `fall` checks have failed. Held down (port closed) this long,
# every HAProxy has marked it DOWN, and takes it back only after `rise` good /readyz. One second of margin.
BACKEND_OUT_OF_ROTATION_S = _stretched(BACKEND_CHECK_INTER_S + (BACKEND_CHECK_FALL - 1) * BACKEND_CHECK_FASTINTER_S) + 1
# Ready (/readyz 200) this long, every HAProxy has it back in rotation.
BACKEND_BACK_IN_ROTATION_S = _stretched(BACKEND_CHECK_RISE * BACKEND_CHECK_INTER_S) + 1

# The first LB gets the highest priority; each next one 10 less (5 LBs max -> 110).
_TOP_PRIORITY = 150
_PRIORITY_STEP = 10

_TEMPLATES = Path(__file__).parent / "templates"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INTERFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_SAFE_FILE = re.compile(r"^/[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class ApiBackend:
    name: str
    address: ipaddress.IPv4Address
    port: int = APISERVER_PORT

    def __post_init__(self) -> None:
        _check_name("backend name", self.name)
        _check_port("backend port", self.port)


@dataclass(frozen=True)
class HaproxySettings:
    frontend_port: int
    backends: tuple[ApiBackend, ...]
    cluster_name: str = "kubernetes"
    health_port: int = HAPROXY_HEALTH_PORT

    def __post_init__(self) -> None:
        _check_name("cluster name", self.cluster_name)
        _check_port("frontend port", self.frontend_port)
        _check_port("health port", self.health_port)
        if self.health_port == self.frontend_port:
            raise ValueError(f"health port {self.health_port} equals the API frontend port")
        if not self.backends:
            raise ValueError("HAProxy needs at least one backend")
        names = [backend.name for backend in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names are not unique: {names}")
        endpoints = [(backend.address, backend.port) for backend in self.backends]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("two backends share one address and port")


@dataclass(frozen=True)
class KeepalivedSettings:
    hostname: str
    interface: str
    address: ipaddress.IPv4Address
    peers: tuple[ipaddress.IPv4Address, ...]
    vip: ipaddress.IPv4Address
    prefix_length: int
    virtual_router_id: int
    priority: int
    check_script: str = KEEPALIVED_CHECK_SCRIPT_PATH

    def __post_init__(self) -> None:
        _check_name("hostname", self.hostname)
        if not _INTERFACE.match(self.interface):
            raise ValueError(f"{self.interface!r} is not an interface name")
        if not 1 <= self.prefix_length <= 32:
            raise ValueError(f"prefix length {self.prefix_length} is outside 1..32")
        if not 1 <= self.virtual_router_id <= 255:
            raise ValueError(f"virtual_router_id {self.virtual_router_id} is outside 1..255")
        # 255 is reserved for the VIP's address owner, which no LB node is.
        if not 1 <= self.priority <= 254:
            raise ValueError(f"priority {self.priority} is outside 1..254")
        if not self.peers:
            raise ValueError("keepalived needs at least one peer; a single LB owns the VIP without VRRP")
        if self.address in self.peers or len(set(self.peers)) != len(self.peers):
            raise ValueError("peers must be distinct and exclude this node's own address")
        if self.vip == self.address or self.vip in self.peers:
            raise ValueError(f"VIP {self.vip} is the address of a load balancer")
        network = ipaddress.IPv4Network(f"{self.vip}/{self.prefix_length}", strict=False)
        outside = [str(a) for a in (self.address, *self.peers) if a not in network]
        if outside:
            raise ValueError(f"{outside} are outside the VIP's network {network}")
        if not _SAFE_FILE.match(self.check_script) or ".." in self.check_script:
            raise ValueError(f"unsafe check script path {self.check_script!r}")


def virtual_router_id(cluster_name: str) -> int:
    """A VRRP router id in 1..255, stable for a cluster name (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(cluster_name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 255 + 1


def vrrp_priority(index: int) -> int:
    """Distinct priorities, highest for the lowest index, so the first election is predictable."""
    if index < 1:
        raise ValueError(f"index {index} must be >= 1")
    return max(_TOP_PRIORITY - _PRIORITY_STEP * (index - 1), 1)


def haproxy_settings(cluster_name: str, frontend_port: int, plan: AddressPlan) -> HaproxySettings:
    """HAProxy's settings: `frontend_port` is `loadBalancer.port`, the API endpoint's port."""
    backends = tuple(
        ApiBackend(name=node.hostname, address=node.address, port=APISERVER_PORT)
        for node in sorted(plan.control_planes, key=lambda node: node.index)
    )
    # If the operator picked the health port for the API itself, move the health
    # frontend aside (deterministically) instead of failing the deployment.
    health_port = HAPROXY_HEALTH_PORT if frontend_port != HAPROXY_HEALTH_PORT else HAPROXY_HEALTH_PORT + 1
    return HaproxySettings(
        frontend_port=frontend_port,
        backends=backends,
        cluster_name=cluster_name,
        health_port=health_port,
    )


def keepalived_settings(cluster_name: str, plan: AddressPlan, node: NodePlan) -> KeepalivedSettings | None:
    """keepalived's settings for LB `node`, or None when a single LB owns the VIP (no VRRP)."""
    if node.role != "lb" or node not in plan.load_balancers:
        raise ValueError(f"{node.hostname} is not a load balancer of this plan")
    if len(plan.load_balancers) < 2:
        return None
    peers = tuple(other.address for other in sorted(plan.load_balancers, key=lambda lb: lb.index) if other != node)
    return KeepalivedSettings(
        hostname=node.hostname,
        interface=LB_INTERFACE,
        address=node.address,
        peers=peers,
        vip=plan.vip,
        prefix_length=plan.network.prefixlen,
        virtual_router_id=virtual_router_id(cluster_name),
        priority=vrrp_priority(node.index),
    )


def render_haproxy_cfg(settings: HaproxySettings) -> str:
    width = max(len(backend.name) for backend in settings.backends)
    servers = "\n".join(
        f"    server {backend.name:<{width}} {backend.address}:{backend.port}" for backend in settings.backends
    )
    return _render(
        "haproxy.cfg.tmpl",
        cluster_name=settings.cluster_name,
        frontend_port=settings.frontend_port,
        health_port=settings.health_port,
        health_uri=HAPROXY_HEALTH_URI,
        stats_uri=HAPROXY_STATS_URI,
        inter=BACKEND_CHECK_INTER_S,
        fastinter=BACKEND_CHECK_FASTINTER_S,
        fall=BACKEND_CHECK_FALL,
        rise=BACKEND_CHECK_RISE,
        spread=CHECK_SPREAD_PERCENT,
        servers=servers,
        backend=HAPROXY_BACKEND,
        fallback_backend=HAPROXY_FALLBACK_BACKEND,
    )


def render_keepalived_conf(settings: KeepalivedSettings) -> str:
    peers = "\n".join(f"        {peer}" for peer in settings.peers)
    return _render(
        "keepalived.conf.tmpl",
        hostname=settings.hostname,
        script_user=KEEPALIVED_SCRIPT_USER,
        script_name="haproxy_alive",
        check_script=settings.check_script,
        script_interval=CHECK_INTERVAL,
        script_timeout=CHECK_TIMEOUT,
        script_fall=CHECK_FALL,
        script_rise=CHECK_RISE,
        instance_name="kube_apiserver_vip",
        interface=settings.interface,
        virtual_router_id=settings.virtual_router_id,
        priority=settings.priority,
        advert_int=VRRP_ADVERT_INT,
        address=settings.address,
        peers=peers,
        vip=settings.vip,
        prefix_length=settings.prefix_length,
    )


def health_url(health_port: int = HAPROXY_HEALTH_PORT) -> str:
    return f"http://127.0.0.1:{health_port}{HAPROXY_HEALTH_URI}"


def render_keepalived_check_script(health_port: int = HAPROXY_HEALTH_PORT) -> str:
    """The POSIX sh track script; pass `HaproxySettings.health_port`. Needs curl on the node."""
    _check_port("health port", health_port)
    # Finish within keepalived's script timeout so a hung HAProxy counts as a failure, not a timeout kill.
    return _render("keepalived-check-haproxy.sh.tmpl", max_time=CHECK_TIMEOUT - 1, url=health_url(health_port))


def lb_node_files(cluster_name: str, frontend_port: int, plan: AddressPlan, node: NodePlan) -> tuple[BundleFile, ...]:
    """Every file the load balancer `node` needs, with its mode (none of them is secret)."""
    haproxy = haproxy_settings(cluster_name, frontend_port, plan)
    files = [BundleFile(HAPROXY_CFG_PATH, render_haproxy_cfg(haproxy), 0o644)]
    keepalived = keepalived_settings(cluster_name, plan, node)
    if keepalived is not None:
        files.append(BundleFile(KEEPALIVED_CONF_PATH, render_keepalived_conf(keepalived), 0o644))
        # Root-owned and not writable by others, or keepalived's script security refuses it.
        files.append(
            BundleFile(KEEPALIVED_CHECK_SCRIPT_PATH, render_keepalived_check_script(haproxy.health_port), 0o755)
        )
    return tuple(files)


@functools.cache
def _template(name: str) -> string.Template:
    return string.Template((_TEMPLATES / name).read_text(encoding="utf-8"))


def _render(name: str, **values: object) -> str:
    # substitute() (not safe_substitute) fails loudly on a placeholder left unfilled.
    return _template(name).substitute({key: str(value) for key, value in values.items()})


def _check_name(what: str, value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} is not a lowercase DNS label")


def _check_port(what: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"{what} {value} is outside 1..65535")
