"""Stack configuration: parsed once, at the edge, into frozen typed models.

Every problem in a stack file is reported in one error, each with its key path
(as the operator writes it in ``Pulumi.<stack>.yaml``) and the rule it breaks,
so that one edit-and-retry fixes them all.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pulumi
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from components.previous import NEW_STACK, PreviousDeployment, read_previous_deployment

CONFIG_NAMESPACE = "kubeadm-ha"

# kubeadm's v1beta4 API (the only one we emit) arrived in 1.31.
MIN_KUBERNETES = (1, 31)
# The etcd image kubeadm itself deploys for each Kubernetes minor (its `constants.SupportedEtcdVersion`).
# External etcd runs exactly that build, so the API server talks to the etcd it was tested against; a
# minor missing here is refused for external etcd rather than guessed.
ETCD_VERSIONS: dict[str, str] = {
    "1.31": "3.5.15-0",
    "1.32": "3.5.16-0",
    "1.33": "3.5.21-0",
    "1.34": "3.6.4-0",
}
# Hostnames are `{cluster}-{role}-{n}`; keep room for "-worker-999" inside a 63-byte DNS label.
_CLUSTER_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,2}( [^\n]*)?$"
)
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")

DEFAULT_IMAGE = "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HypervisorConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")]
    uri: Annotated[str, Field(min_length=1)] = "qemu:///system"
    pool: Annotated[str, Field(min_length=1)] = "default"


class NetworkConfig(_Model):
    mode: Literal["nat"] = "nat"
    cidr: ipaddress.IPv4Network
    domain: str = "k8s.internal"

    @field_validator("domain")
    @classmethod
    def _domain_is_dns_name(cls, value: str) -> str:
        if not _DNS_NAME.match(value):
            raise ValueError(f"{value!r} is not a lowercase DNS name")
        return value


class KubernetesConfig(_Model):
    version: str = "1.34.2"
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
        if (int(match[1]), int(match[2])) < MIN_KUBERNETES:
            raise ValueError(f"{value} is older than 1.31; kubeadm's v1beta4 configuration API needs >= 1.31")
        return value.removeprefix("v")

    @property
    def minor(self) -> str:
        """`1.34` for `1.34.2`: the pkgs.k8s.io repository path."""
        return ".".join(self.version.split(".")[:2])


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


class EtcdConfig(_Model):
    topology: Literal["stacked", "external"] = "stacked"
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
    image: Annotated[str, Field(pattern=r"^(https?://\S+|/\S+)$")] = DEFAULT_IMAGE
    kubernetes: KubernetesConfig = KubernetesConfig()
    load_balancer: Annotated[LoadBalancerConfig, Field(alias="loadBalancer")] = LoadBalancerConfig()
    etcd: EtcdConfig = EtcdConfig()
    control_plane: Annotated[ControlPlaneConfig, Field(alias="controlPlane")] = ControlPlaneConfig()
    workers: WorkersConfig = WorkersConfig()
    ssh: SshConfig = SshConfig()
    promotion: PromotionConfig | None = None

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
        from components.addressing import default_vip  # noqa: PLC0415 - the plan owns address offsets

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


def parse_config(raw: Mapping[str, Any], *, stack: str, previous: PreviousDeployment = NEW_STACK) -> ClusterConfig:
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
    problems = cross_field_problems(config) + promotion_problems(config, stack) + change_problems(config, previous)
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
    from components.addressing import plan_addresses  # noqa: PLC0415 - avoid an import cycle

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
        ignored = sorted(EtcdConfig.model_fields[name].alias or name for name in etcd.model_fields_set - {"topology"})
        return [
            Problem(
                f"etcd.{key}",
                "only used with etcd.topology external; stacked etcd runs one member on each control plane "
                "(size it with controlPlane)",
            )
            for key in ignored
        ]
    minor = config.kubernetes.minor
    if minor not in ETCD_VERSIONS:
        known = ", ".join(sorted(ETCD_VERSIONS, key=lambda m: tuple(int(p) for p in m.split("."))))
        return [
            Problem(
                "kubernetes.version",
                f"{config.kubernetes.version}: external etcd runs the etcd release kubeadm {minor} expects, and none "
                f"is known for {minor} (known minors: {known}; add it to ETCD_VERSIONS in components/config.py)",
            )
        ]
    return []


def etcd_image_tag(config: ClusterConfig) -> str:
    """The `registry.k8s.io/etcd` tag for the configured Kubernetes minor (validated to exist)."""
    return ETCD_VERSIONS[config.kubernetes.minor]


def version_tuple(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"{version!r} is not a MAJOR.MINOR.PATCH version")
    return int(match[1]), int(match[2]), int(match[3])


def change_problems(config: ClusterConfig, previous: PreviousDeployment) -> list[Problem]:
    """Rules about changing a running cluster, judged against the last deployment's outputs."""
    problems: list[Problem] = []
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
            from components.addressing import plan_addresses  # noqa: PLC0415 - avoid an import cycle

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
