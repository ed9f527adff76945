"""Stack configuration: parsed once, at the edge, into frozen typed models.

Every problem in a stack file is reported in one error, each with its key path
(as the operator writes it in ``Pulumi.<stack>.yaml``) and the rule it breaks,
so that one edit-and-retry fixes them all.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pulumi
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model.hostkeys import ed25519_key_problem, is_ssh_uri, uri_problems
from model.previous import NEW_STACK, PreviousDeployment, read_previous_deployment
from model.versions import (
    DEFAULT_KUBERNETES,
    RELEASES,
    UnknownRelease,
    etcd_version_of,
    minor_of,
    next_minor,
    release_for,
)

if TYPE_CHECKING:
    from model.addressing import AddressPlan

CONFIG_NAMESPACE = "kubeadm-ha"

# Hostnames are `{cluster}-{role}-{n}`; keep room for "-worker-999" inside a 63-byte DNS label.
_CLUSTER_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,2}( [^\n]*)?$"
)
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
# A Linux interface name (IFNAMSIZ - 1 bytes), without the characters iproute2 refuses.
_INTERFACE_NAME = r"^[A-Za-z0-9_.-]{1,15}$"

DEFAULT_IMAGE = "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
UBUNTU_CLOUD_IMAGES = "https://cloud-images.ubuntu.com/"


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ImageConfig(_Model):
    """The cloud image every VM boots. A plain string in a stack file is taken as `url`."""

    url: Annotated[str, Field(pattern=r"^(https://\S+|/\S+)$")] = DEFAULT_IMAGE
    # Required for a download that is not an Ubuntu cloud image (those are checked against Ubuntu's signed
    # SHA256SUMS instead); optional for a local file.
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None

    @model_validator(mode="before")
    @classmethod
    def _plain_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _verifiable(self) -> ImageConfig:
        if self.downloaded and self.sha256 is None and not self.url.startswith(UBUNTU_CLOUD_IMAGES):
            raise ValueError(
                f"{self.url} is not an Ubuntu cloud image, whose signed SHA256SUMS the program checks; "
                "give image.sha256 so the download can be verified"
            )
        return self

    @property
    def downloaded(self) -> bool:
        return self.url.startswith("https://")


class HypervisorConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")]
    uri: Annotated[str, Field(min_length=1)] = "qemu:///system"
    pool: Annotated[str, Field(min_length=1)] = "default"
    # `kvm` needs hardware virtualisation on the host; `qemu` is plain software emulation (TCG): slow, but it
    # runs where /dev/kvm is missing or unusable (nested labs, CI).
    domain_type: Annotated[Literal["kvm", "qemu"], Field(alias="domainType")] = "kvm"
    # Without a mode libvirt gives guests QEMU's `qemu64` model (no x86-64-v2, no AES-NI), which current
    # distributions refuse to boot. None picks the best the domain type allows: `host-passthrough` under KVM,
    # `maximum` (every feature TCG can emulate) under plain QEMU.
    cpu_mode: Annotated[Literal["host-passthrough", "host-model", "maximum"] | None, Field(alias="cpuMode")] = None
    # network.mode bridge only: this host's bridge, when it is not named network.bridge.
    bridge: Annotated[str | None, Field(pattern=_INTERFACE_NAME)] = None
    # The host's SSH host key (`ssh-ed25519 AAAA...`), required for a qemu+ssh:// URI (model/hostkeys.py).
    host_key: Annotated[str | None, Field(alias="hostKey")] = None

    @field_validator("host_key")
    @classmethod
    def _ed25519_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = ed25519_key_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return " ".join(value.split()[:2])

    @property
    def effective_cpu_mode(self) -> str:
        if self.cpu_mode is not None:
            return self.cpu_mode
        return "host-passthrough" if self.domain_type == "kvm" else "maximum"


class NetworkConfig(_Model):
    # `nat`: a libvirt NAT network on the one hypervisor, addresses by DHCP reservation. `bridge`: every node
    # on an existing Linux bridge of its hypervisor, i.e. on the LAN, with a static address.
    mode: Literal["nat", "bridge"] = "nat"
    cidr: ipaddress.IPv4Network
    domain: str = "k8s.internal"
    # The keys below are bridge mode only: a NAT network is its nodes' gateway and DNS server.
    bridge: Annotated[str | None, Field(pattern=_INTERFACE_NAME)] = None
    gateway: ipaddress.IPv4Address | None = None
    # resolv.conf reads at most three name servers.
    dns: Annotated[tuple[ipaddress.IPv4Address, ...], Field(max_length=3)] = ()
    # Addresses and networks the LAN already uses (other hosts, a DHCP pool): no node or VIP may be in them.
    reserved: tuple[ipaddress.IPv4Network, ...] = ()

    @property
    def bridged(self) -> bool:
        return self.mode == "bridge"

    @field_validator("domain")
    @classmethod
    def _domain_is_dns_name(cls, value: str) -> str:
        if not _DNS_NAME.match(value):
            raise ValueError(f"{value!r} is not a lowercase DNS name")
        return value


class KubernetesConfig(_Model):
    version: str = DEFAULT_KUBERNETES
    pod_subnet: Annotated[ipaddress.IPv4Network, Field(alias="podSubnet")] = ipaddress.IPv4Network("10.244.0.0/16")
    service_subnet: Annotated[ipaddress.IPv4Network, Field(alias="serviceSubnet")] = ipaddress.IPv4Network(
        "10.96.0.0/12"
    )
    cni: Literal["calico", "flannel", "none"] = "calico"

    @field_validator("version")
    @classmethod
    def _version_is_supported(cls, value: str) -> str:
        match = _VERSION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a MAJOR.MINOR.PATCH version")
        try:
            release_for(value)
        except UnknownRelease as error:
            raise ValueError(f"{value}: {error}") from None
        return value.removeprefix("v")

    @property
    def minor(self) -> str:
        """`1.34` for `1.34.2`: the pkgs.k8s.io repository path."""
        return minor_of(self.version)


class _VmSize(_Model):
    cpus: Annotated[int, Field(ge=1, le=64)] = 2
    memory_mib: Annotated[int, Field(alias="memoryMiB", ge=1024, le=262144)] = 4096
    disk_gib: Annotated[int, Field(alias="diskGiB", ge=10, le=4096)] = 40


class LoadBalancerConfig(_VmSize):
    replicas: Annotated[int, Field(ge=1, le=5)] = 2
    vip: ipaddress.IPv4Address | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 6443
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Field(alias="memoryMiB", ge=512, le=262144)] = 1024
    disk_gib: Annotated[int, Field(alias="diskGiB", ge=10, le=4096)] = 10


class EtcdBackupConfig(_Model):
    """The snapshot timer on every etcd member (components/backup.py)."""

    interval_minutes: Annotated[int, Field(alias="intervalMinutes", ge=5, le=1440)] = 60
    # Snapshots kept on each member, newest first; the default is a day of hourly ones.
    keep: Annotated[int, Field(ge=1, le=1000)] = 24


class EtcdConfig(_Model):
    topology: Literal["stacked", "external"] = "stacked"
    backup: EtcdBackupConfig = EtcdBackupConfig()
    # External etcd only: the registry.k8s.io/etcd tag the members run. Unset, a new cluster starts on the tag
    # kubeadm pins for its Kubernetes minor and keeps it across Kubernetes upgrades; setting it (or changing
    # it) rolls the members to it one at a time, each healthy before the next.
    version: Annotated[str | None, Field(pattern=r"^\d+\.\d+\.\d+-\d+$")] = None
    # Only read with topology `external`: stacked etcd has one member per control plane.
    replicas: int = 3
    cpus: Annotated[int, Field(ge=1, le=64)] = 2
    # etcd keeps its whole keyspace in memory and fsyncs every write: below 1 GiB / 10 GiB it is fragile.
    memory_mib: Annotated[int, Field(alias="memoryMiB", ge=1024, le=262144)] = 2048
    disk_gib: Annotated[int, Field(alias="diskGiB", ge=10, le=4096)] = 20

    @field_validator("replicas")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(
                f"{value} is even; an even etcd cluster tolerates no more failures than the odd count below it "
                "and is likelier to split evenly (use 3, 5 or 7)"
            )
        if not 3 <= value <= 7:
            raise ValueError(
                f"{value} is outside 3..7: a dedicated etcd cluster below 3 members survives no failure, "
                "and every member beyond 7 slows every write"
            )
        return value

    @property
    def external(self) -> bool:
        return self.topology == "external"


class ControlPlaneConfig(_VmSize):
    replicas: Annotated[int, Field(ge=1, le=7)] = 3
    # kubeadm's preflight refuses control planes below 2 vCPU / ~1.7 GiB.
    cpus: Annotated[int, Field(ge=2, le=64)] = 2
    memory_mib: Annotated[int, Field(alias="memoryMiB", ge=2048, le=262144)] = 4096
    disk_gib: Annotated[int, Field(alias="diskGiB", ge=20, le=4096)] = 30

    @field_validator("replicas")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"{value} is even; etcd quorum needs an odd count (1, 3, 5, 7)")
        return value


class WorkersConfig(_VmSize):
    replicas: Annotated[int, Field(ge=0, le=1000)] = 2
    # Workers upgraded (drained) at the same time.
    max_unavailable: Annotated[int, Field(alias="maxUnavailable", ge=1, le=1000)] = 1


class SshConfig(_Model):
    user: str = "kube"
    authorized_keys: Annotated[tuple[str, ...], Field(alias="authorizedKeys")] = ()

    @field_validator("user")
    @classmethod
    def _plain_user(cls, value: str) -> str:
        if value == "root" or not _LINUX_USER.match(value):
            raise ValueError(f"{value!r} must be a lowercase login name other than root")
        return value

    @field_validator("authorized_keys")
    @classmethod
    def _public_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [i for i, key in enumerate(value) if not _SSH_PUBLIC_KEY.match(key.strip())]
        if bad:
            raise ValueError(f"entries {bad} are not single-line OpenSSH public keys")
        return tuple(key.strip() for key in value)


class CertificatesConfig(_Model):
    """When `pulumi up` renews the certificates kubeadm made on the nodes (components/certificates.py)."""

    renew_before_days: Annotated[int, Field(alias="renewBeforeDays", ge=7, le=300)] = 60


class PromotionConfig(_Model):
    """Where this stack's release comes from: it may deploy only what `from` runs (components/promotion.py)."""

    source: Annotated[str, Field(alias="from", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
    # `off` lets a release through that the source does not run; only with a reason, logged on every run.
    gate: Literal["on", "off"] = "on"
    reason: str | None = None

    @field_validator("gate", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 readers (PyYAML) load a bare `off`/`on` as a boolean; Pulumi's YAML 1.2 keeps the word.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class ClusterConfig(_Model):
    cluster_name: Annotated[str, Field(alias="clusterName")]
    hypervisors: Annotated[tuple[HypervisorConfig, ...], Field(min_length=1)] = (HypervisorConfig(name="local"),)
    network: NetworkConfig
    image: ImageConfig = ImageConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    load_balancer: Annotated[LoadBalancerConfig, Field(alias="loadBalancer")] = LoadBalancerConfig()
    etcd: EtcdConfig = EtcdConfig()
    control_plane: Annotated[ControlPlaneConfig, Field(alias="controlPlane")] = ControlPlaneConfig()
    workers: WorkersConfig = WorkersConfig()
    ssh: SshConfig = SshConfig()
    certificates: CertificatesConfig = CertificatesConfig()
    promotion: PromotionConfig | None = None
    # What a placement that does not survive the loss of one hypervisor gets: a warning, or (strict) refusal.
    placement: Literal["warn", "strict"] = "warn"

    @field_validator("cluster_name")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        if not _CLUSTER_NAME.match(value):
            raise ValueError(
                f"{value!r} must be lowercase letters, digits and '-', start with a letter, at most 40 characters "
                "(it prefixes every hostname)"
            )
        return value

    @property
    def vip(self) -> ipaddress.IPv4Address:
        from model.addressing import default_vip  # noqa: PLC0415 - the plan owns address offsets

        return self.load_balancer.vip or default_vip(self.network.cidr)


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


_TOP_LEVEL_KEYS = {field.alias or name for name, field in ClusterConfig.model_fields.items()}


def parse_config(
    raw: Mapping[str, Any],
    *,
    stack: str,
    previous: PreviousDeployment = NEW_STACK,
    today: datetime.date | None = None,
) -> ClusterConfig:
    """Validate `raw` (the `kubeadm-ha:` keys without prefix) and return the typed config.

    Raises ConfigError listing every problem: field rules first, then the
    cross-field rules (those only run once every field is individually valid).
    """
    data = dict(raw)
    data.setdefault("clusterName", stack)
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError([_problem_from_pydantic(item) for item in error.errors()]) from None
    problems = (
        cross_field_problems(config)
        + promotion_problems(config, stack)
        + change_problems(config, previous)
        + end_of_life_problems(config, previous, today or datetime.date.today())
    )
    if problems:
        raise ConfigError(problems)
    return config


def load_stack_config(stack: str, previous: PreviousDeployment | None = None) -> ClusterConfig:
    """Read the `kubeadm-ha:` namespace of the current stack's configuration and check it against the last run.

    `previous` is the last run's outputs, read here when not given.
    """
    namespace = pulumi.Config(CONFIG_NAMESPACE)
    raw: dict[str, Any] = {}
    for key in sorted(_TOP_LEVEL_KEYS):
        text = namespace.get(key)
        if text is None:
            continue
        raw[key] = _decode_config_value(text)
    return parse_config(raw, stack=stack, previous=previous if previous is not None else read_previous_deployment())


def _decode_config_value(text: str) -> Any:
    import json  # noqa: PLC0415

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string value such as clusterName or image


def _problem_from_pydantic(item: Mapping[str, Any]) -> Problem:
    path = ".".join(str(part) for part in item["loc"]) or "(root)"
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key (check the spelling against the README)"
    elif item["type"] in {"value_error", "missing"} or "input" not in item:
        pass  # our own rules already quote the offending value
    else:
        message = f"{item['input']!r}: {message}"
    return Problem(path, message)


def cross_field_problems(config: ClusterConfig) -> list[Problem]:
    """Rules that relate several keys to each other."""
    from model.addressing import plan_addresses  # noqa: PLC0415 - avoid an import cycle

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
        sizing = etcd.model_fields_set - {"topology", "backup"}
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


def etcd_image_tag(config: ClusterConfig, previous: PreviousDeployment = NEW_STACK) -> str:
    """The `registry.k8s.io/etcd` tag external etcd members run.

    Explicit `etcd.version` wins; otherwise a running cluster keeps the tag it runs (a Kubernetes upgrade
    does not roll etcd behind the operator's back), and a new one starts on the tag kubeadm pins for its
    minor (model/versions.py).
    """
    if config.etcd.version is not None:
        return config.etcd.version
    if previous.etcd_image_tag is not None:
        return previous.etcd_image_tag
    return release_for(config.kubernetes.version).etcd_image_tag


def end_of_life_problems(config: ClusterConfig, previous: PreviousDeployment, today: datetime.date) -> list[Problem]:
    """A new cluster may not start on a minor upstream no longer patches; a running one may stay and upgrade."""
    if previous.kubernetes_version is not None:
        return []
    release = release_for(config.kubernetes.version)
    if release.end_of_life >= today:
        return []
    following = next_minor(release.minor)
    advice = f"start on {following} ({RELEASES[following].latest_patch})" if following else "start on a newer minor"
    return [
        Problem(
            "kubernetes.version",
            f"Kubernetes {release.minor} reached end of life on {release.end_of_life.isoformat()}; a new cluster must "
            f"{advice}. Running clusters on {release.minor} may stay and upgrade from it.",
        )
    ]


def version_tuple(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"{version!r} is not a MAJOR.MINOR.PATCH version")
    return int(match[1]), int(match[2]), int(match[3])


def address_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """No running node may change address or MAC, and the API endpoint may not move.

    terraform-provider-libvirt 0.8.1 applies a NIC change to a running domain in place without touching the
    guest, so the guest keeps its old address while every step dials the new one (and keepalived could
    raise a VIP another node still holds). Each problem names the key whose change caused it.
    """
    from model.addressing import plan_addresses  # noqa: PLC0415 - avoid an import cycle

    problems: list[Problem] = []
    plan = plan_addresses(config)
    endpoint = f"https://{config.vip}:{config.load_balancer.port}"
    if previous.api_endpoint is not None and previous.api_endpoint != endpoint:
        problems.append(
            Problem(
                "loadBalancer.vip" if str(config.vip) not in previous.api_endpoint else "loadBalancer.port",
                f"the running cluster's API endpoint is {previous.api_endpoint}; this config makes it {endpoint}. "
                "Every certificate, kubeconfig and kubelet names the endpoint, so it cannot move under a running "
                "cluster (build a new stack instead)",
            )
        )
    running = previous.node_addresses
    for node in plan.nodes:
        if node.hostname not in running:
            continue
        address, mac = running[node.hostname]
        if address == str(node.address) and mac in (None, node.mac):
            continue
        if node.role == "lb" and ipaddress.IPv4Address(address) in config.network.cidr:
            path = "loadBalancer.replicas"
            remedy = (
                "a lone load balancer owns the VIP as its own address while several share it through keepalived, "
                "so lb-1 cannot go from one to the other in place; keep the count on the same side of 1, or "
                "build a new stack"
            )
        else:
            path = "network.cidr"
            remedy = "the network of a running cluster cannot change; keep it, or build a new stack"
        problems.append(
            Problem(
                path,
                f"node {node.hostname} runs at {address} ({mac or 'MAC as planned'}); this config would move it to "
                f"{node.address} ({node.mac}). A running node never changes address or MAC: libvirt would update "
                f"its NIC in place while the guest kept its old address. {remedy}",
            )
        )
    return problems


def placement_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """Running VMs whose hypervisor is gone; with `placement: strict`, also a host loss the cluster does not survive."""
    from model.placement import placement_findings  # noqa: PLC0415 - avoid an import cycle

    refused, fragile = placement_findings(config, previous)
    problems = [Problem(finding.path, finding.rule) for finding in refused]
    if config.placement == "strict":
        problems += [Problem(finding.path, f"{finding.rule} (placement: strict)") for finding in fragile]
    return problems


def change_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """Rules about changing a running cluster, judged against the last deployment's outputs."""
    problems: list[Problem] = address_problems(config, previous) + placement_problems(config, previous)
    if previous.network_mode is not None and previous.network_mode != config.network.mode:
        problems.append(
            Problem(
                "network.mode",
                f"the cluster runs on network.mode {previous.network_mode}; switching a running node's NIC to "
                f"{config.network.mode} would leave its guest with the other mode's addressing (cloud-init sets "
                "the network up at first boot only): build a new stack instead",
            )
        )
    if previous.etcd_topology and previous.etcd_topology != config.etcd.topology:
        problems.append(
            Problem(
                "etcd.topology",
                f"the cluster runs {previous.etcd_topology} etcd; changing it to {config.etcd.topology} would need "
                "its data migrated between etcd clusters, which this program does not do (build a new stack instead)",
            )
        )
    if config.etcd.external and previous.etcd_initial_members:
        # Membership is derived from hostnames; names of another cluster mean the names changed under a live etcd.
        pattern = re.compile(rf"^{re.escape(config.cluster_name)}-etcd-[1-9][0-9]*$")
        strangers = [name for name in previous.etcd_initial_members if not pattern.match(name)]
        if strangers:
            problems.append(
                Problem(
                    "clusterName",
                    f"the running etcd cluster's initial members {strangers} are not named "
                    f"{config.cluster_name}-etcd-N; renaming a cluster would rename every etcd member, "
                    "which this program does not do",
                )
            )
    if previous.kubernetes_version:
        running = version_tuple(previous.kubernetes_version)
        wanted = version_tuple(config.kubernetes.version)
        if wanted < running:
            problems.append(
                Problem(
                    "kubernetes.version",
                    f"{config.kubernetes.version} is older than the running {previous.kubernetes_version}; "
                    "kubeadm does not support downgrades",
                )
            )
        elif wanted[:2] > (running[0], running[1] + 1):
            problems.append(
                Problem(
                    "kubernetes.version",
                    f"{config.kubernetes.version} skips a minor version from the running {previous.kubernetes_version};"
                    f" kubeadm upgrades one minor at a time (go to {running[0]}.{running[1] + 1}.x first)",
                )
            )
        elif wanted != running and previous.node_names is not None:
            from model.addressing import plan_addresses  # noqa: PLC0415 - avoid an import cycle

            planned = {node.hostname for node in plan_addresses(config).nodes}
            if planned != set(previous.node_names):
                problems.append(
                    Problem(
                        "kubernetes.version",
                        f"upgrading to {config.kubernetes.version} while nodes are added or removed; one change at a "
                        "time: a node joining mid-upgrade would get a version the control plane does not run yet",
                    )
                )
    return problems


def config_from_stack_file(path: str, stack: str) -> ClusterConfig:
    """Parse a `Pulumi.<stack>.yaml` file directly (tests and offline tools; the program uses `load_stack_config`)."""
    import yaml  # noqa: PLC0415

    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    prefix = CONFIG_NAMESPACE + ":"
    raw = {
        key.removeprefix(prefix): value
        for key, value in (document.get("config") or {}).items()
        if key.startswith(prefix)
    }
    return parse_config(raw, stack=stack)
