"""The stack configuration schema: every `kubeadm-ha:` key as a frozen, typed model, with its field rules.

Rules that relate several keys live in model/rules.py, rules against the running cluster in
model/running.py, and reading a stack's configuration in model/stack.py.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from model.artifacts import ArtifactsConfig
from model.base import StrictModel
from model.hostkeys import ed25519_key_problem
from model.offsets import default_vip
from model.timing import EtcdTimingConfig, LeaderElectionConfig
from model.versions import (
    DEFAULT_KUBERNETES,
    UnknownRelease,
    minor_of,
    release_for,
)

CONFIG_NAMESPACE = "kubeadm-ha"

# Hostnames are `{cluster}-{role}-{n}`; keep room for "-worker-999" inside a 63-byte DNS label.
_CLUSTER_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,2}( [^\n]*)?$"
)
VERSION_PATTERN = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
# A Linux interface name (IFNAMSIZ - 1 bytes), without the characters iproute2 refuses.
_INTERFACE_NAME = r"^[A-Za-z0-9_.-]{1,15}$"

DEFAULT_IMAGE = "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
UBUNTU_CLOUD_IMAGES = "https://cloud-images.ubuntu.com/"


_Model = StrictModel


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
        match = VERSION_PATTERN.match(value)
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


class EtcdMaintenanceConfig(_Model):
    """What keeps an etcd database from filling up (NOSPACE, the commonest etcd outage): its size limit, etcd's
    own compaction, and the defragmentation timer on every member (components/etcd_maintenance.py)."""

    # etcd's default is 2 GiB and etcd's docs call 8 GiB the suggested maximum; the default leaves room for a
    # busy cluster while staying well under the control planes' memory (etcd maps the whole file).
    quota_backend_bytes: Annotated[int, Field(alias="quotaBackendBytes", ge=2**29, le=2**33)] = 2**32
    # kube-apiserver already compacts every 5 minutes (`--etcd-compaction-interval`), so etcd's own
    # compaction is off by default ("0"); `periodic` takes a duration ("1h"), `revision` a revision count.
    auto_compaction_mode: Annotated[Literal["periodic", "revision"], Field(alias="autoCompactionMode")] = "periodic"
    auto_compaction_retention: Annotated[
        str, Field(alias="autoCompactionRetention", pattern=r"^(0|[1-9][0-9]*|[1-9][0-9]*(ms|s|m|h))$")
    ] = "0"
    # Hours between two defragmentations of each member; the members take turns (never two at once).
    defrag_interval_hours: Annotated[int, Field(alias="defragIntervalHours", ge=1, le=720)] = 24

    @model_validator(mode="after")
    def _retention_fits_mode(self) -> EtcdMaintenanceConfig:
        if self.auto_compaction_mode == "revision" and not self.auto_compaction_retention.isdigit():
            raise ValueError(
                f"autoCompactionRetention {self.auto_compaction_retention!r}: with autoCompactionMode revision "
                "it is a number of revisions to keep"
            )
        return self


class EtcdConfig(_Model):
    topology: Literal["stacked", "external"] = "stacked"
    backup: EtcdBackupConfig = EtcdBackupConfig()
    maintenance: EtcdMaintenanceConfig = EtcdMaintenanceConfig()
    # Unset: etcd's own heartbeat and election timeout, and no flag (stacked and external members alike).
    timing: EtcdTimingConfig | None = None
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
    # Unset: the components' own defaults, and no flag in the documents.
    leader_election: Annotated[LeaderElectionConfig | None, Field(alias="leaderElection")] = None
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


class AuditConfig(_Model):
    """kube-apiserver's audit log on every control plane (render/hardening.py holds the policy)."""

    # Its directory is mounted into the API server's static pod, so it must be a directory of its own under
    # /var/log (mounting /var/log itself, or anything outside it, would hand the pod far more than its log).
    log_path: Annotated[
        str, Field(alias="logPath", pattern=r"^/var/log/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/[A-Za-z0-9._-]+$")
    ] = "/var/log/kubernetes/audit/audit.log"
    max_age_days: Annotated[int, Field(alias="maxAgeDays", ge=1, le=3650)] = 30
    max_backups: Annotated[int, Field(alias="maxBackups", ge=1, le=1000)] = 10
    max_size_mib: Annotated[int, Field(alias="maxSizeMiB", ge=1, le=102400)] = 100

    @field_validator("log_path")
    @classmethod
    def _no_dot_dot(cls, value: str) -> str:
        if "/../" in value or "/./" in value or value.endswith(("/..", "/.")):
            raise ValueError(f"{value!r} must not contain '.' or '..' components")
        return value

    @property
    def log_dir(self) -> str:
        return self.log_path.rsplit("/", 1)[0]


class EncryptionConfig(_Model):
    """Secrets encrypted at rest (render/encryption.py): raising `rotation` moves every Secret to a new key."""

    # The key generation: 0 is the first key. Only ever raised, by one or more; each raise is one rotation.
    rotation: Annotated[int, Field(ge=0, le=100000)] = 0


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
    audit: AuditConfig = AuditConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
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
        return self.load_balancer.vip or default_vip(self.network.cidr)
