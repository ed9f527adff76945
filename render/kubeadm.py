"""kubeadm v1beta4 configuration documents as typed objects, serialised to YAML.

Field names follow the kubeadm API (snake_case here, camelCase on the wire);
`None` means "leave kubeadm's default" and is omitted from the output.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from render import hardening, yamldoc

KUBEADM_API = "kubeadm.k8s.io/v1beta4"
KUBELET_API = "kubelet.config.k8s.io/v1beta1"
CRI_SOCKET = "unix:///var/run/containerd/containerd.sock"
API_SERVER_PORT = 6443
TOKEN_TTL = "24h0m0s"
PKI_DIR = "/etc/kubernetes/pki"
CONFIG_DIR = "/etc/kubernetes/kubeadm-ha"
INIT_CONFIG_PATH = f"{CONFIG_DIR}/init.yaml"
JOIN_CONFIG_PATH = f"{CONFIG_DIR}/join.yaml"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        wire: dict[str, Any] = {}
        for item in dataclasses.fields(value):
            field_value = getattr(value, item.name)
            if field_value is None:
                continue
            wire[item.metadata.get("wire", _camel(item.name))] = _to_wire(field_value)
        return wire
    if isinstance(value, (list, tuple)):
        return [_to_wire(item) for item in value]
    return value


@dataclass(frozen=True)
class Arg:
    name: str
    value: str


@dataclass(frozen=True)
class NodeRegistration:
    name: str
    cri_socket: str = CRI_SOCKET
    kubelet_extra_args: tuple[Arg, ...] | None = None
    taints: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class APIEndpoint:
    advertise_address: str
    bind_port: int = API_SERVER_PORT


@dataclass(frozen=True)
class BootstrapToken:
    token: str
    ttl: str = TOKEN_TTL
    description: str = "kubeadm-ha node joins; re-created by the program when expired"
    usages: tuple[str, ...] = ("signing", "authentication")
    groups: tuple[str, ...] = ("system:bootstrappers:kubeadm:default-node-token",)


# How long `kubeadm init` keeps asking its new API server. kubeadm v1.37.2's wait-control-plane phase
# (cmd/kubeadm/app/cmd/phases/init/waitcontrolplane.go) first builds its client, which creates the
# kubeadm:cluster-admins ClusterRoleBinding through the local API server
# (phases/kubeconfig/kubeconfig.go EnsureAdminClusterRoleBinding), polling only for `timeouts.kubernetesAPICall`
# (default 1m, constants.KubernetesAPICallTimeout), and only then waits for the kubelet and the components
# (4m each by default). So the API server had to answer within a minute of the kubelet's start: the cluster lab's
# cp-1 (QEMU TCG) served 70 s after it, 10 s after kubeadm gave up. 4m gives the API server the time kubeadm's
# own control-plane wait (controlPlaneComponentHealthCheck) gives the components.
INIT_API_CALL_TIMEOUT = "4m0s"


@dataclass(frozen=True)
class Timeouts:
    kubernetes_api_call: str = field(metadata={"wire": "kubernetesAPICall"})


@dataclass(frozen=True)
class InitConfiguration:
    node_registration: NodeRegistration
    local_api_endpoint: APIEndpoint = field(metadata={"wire": "localAPIEndpoint"})
    bootstrap_tokens: tuple[BootstrapToken, ...] | None
    timeouts: Timeouts | None = None
    api_version: str = KUBEADM_API
    kind: str = "InitConfiguration"


@dataclass(frozen=True)
class Networking:
    pod_subnet: str
    service_subnet: str
    dns_domain: str = "cluster.local"


@dataclass(frozen=True)
class ControlPlaneComponent:
    extra_args: tuple[Arg, ...] | None = None
    extra_volumes: tuple[hardening.HostPathMount, ...] | None = None


@dataclass(frozen=True)
class APIServer:
    cert_sans: tuple[str, ...] = field(metadata={"wire": "certSANs"})
    extra_args: tuple[Arg, ...] | None = None
    extra_volumes: tuple[hardening.HostPathMount, ...] | None = None


@dataclass(frozen=True)
class LocalEtcd:
    data_dir: str = "/var/lib/etcd"
    extra_args: tuple[Arg, ...] | None = None


@dataclass(frozen=True)
class ExternalEtcd:
    endpoints: tuple[str, ...]
    ca_file: str
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class Etcd:
    local: LocalEtcd | None = None
    external: ExternalEtcd | None = None


@dataclass(frozen=True)
class ClusterConfiguration:
    cluster_name: str
    kubernetes_version: str
    control_plane_endpoint: str
    networking: Networking
    api_server: APIServer
    etcd: Etcd
    controller_manager: ControlPlaneComponent | None = None
    scheduler: ControlPlaneComponent | None = None
    certificates_dir: str = PKI_DIR
    # The shared CAs and the service-account key are ECDSA P-256; kubeadm makes
    # the keys it generates itself (leaf certificates) of the same kind.
    encryption_algorithm: str = "ECDSA-P256"
    api_version: str = KUBEADM_API
    kind: str = "ClusterConfiguration"


@dataclass(frozen=True)
class BootstrapTokenDiscovery:
    api_server_endpoint: str
    token: str
    ca_cert_hashes: tuple[str, ...]


@dataclass(frozen=True)
class Discovery:
    bootstrap_token: BootstrapTokenDiscovery


@dataclass(frozen=True)
class JoinControlPlane:
    local_api_endpoint: APIEndpoint = field(metadata={"wire": "localAPIEndpoint"})


@dataclass(frozen=True)
class JoinConfiguration:
    node_registration: NodeRegistration
    discovery: Discovery
    control_plane: JoinControlPlane | None = None
    api_version: str = KUBEADM_API
    kind: str = "JoinConfiguration"


@dataclass(frozen=True)
class KubeletConfiguration:
    cgroup_driver: str = "systemd"
    # Nodes have no swap (node preparation turns it off); say so explicitly.
    fail_swap_on: bool = True
    # The wire name is `serverTLSBootstrap`; camel-casing the field would give `serverTlsBootstrap`, which
    # kubeadm's strict decoding refuses as an unknown field.
    # True: the kubelet's serving certificate comes from the cluster CA through a CSR the program approves
    # (render/csr_approval.py), so kube-apiserver can verify it (`--kubelet-certificate-authority`).
    server_tls_bootstrap: bool = field(default=True, metadata={"wire": "serverTLSBootstrap"})
    api_version: str = KUBELET_API
    kind: str = "KubeletConfiguration"


def to_yaml(*documents: object) -> str:
    """Serialise documents as one multi-document YAML stream, in the given order."""
    return "---\n".join(yamldoc.dump(_to_wire(document)) for document in documents)


# --- builders: the documents this program actually sends -------------------------------------------


@dataclass(frozen=True)
class ClusterShape:
    """The cluster-wide facts every kubeadm document is built from (plain values, no Outputs)."""

    cluster_name: str
    kubernetes_version: str
    endpoint_host: str
    endpoint_port: int
    pod_subnet: str
    service_subnet: str
    extra_sans: tuple[str, ...]
    external_etcd: ExternalEtcd | None = None
    hardening: hardening.Hardening = hardening.DEFAULT

    @property
    def endpoint(self) -> str:
        return f"{self.endpoint_host}:{self.endpoint_port}"


def _registration(hostname: str, address: str, *, control_plane: bool) -> NodeRegistration:
    return NodeRegistration(
        name=hostname,
        kubelet_extra_args=(Arg("node-ip", address),),
        # kubeadm's default taint for control planes; stated so the intent is visible in the document.
        taints=({"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},) if control_plane else None,
    )


def cluster_configuration(shape: ClusterShape) -> ClusterConfiguration:
    sans = _unique((shape.endpoint_host, *shape.extra_sans))
    settings = shape.hardening
    etcd = (
        Etcd(external=shape.external_etcd)
        if shape.external_etcd
        else Etcd(local=LocalEtcd(extra_args=_args(hardening.etcd_args(settings.etcd, settings.etcd_timing))))
    )
    volumes = hardening.apiserver_volumes(settings)
    return ClusterConfiguration(
        cluster_name=shape.cluster_name,
        kubernetes_version=f"v{shape.kubernetes_version}",
        control_plane_endpoint=shape.endpoint,
        networking=Networking(pod_subnet=shape.pod_subnet, service_subnet=shape.service_subnet),
        api_server=APIServer(
            cert_sans=sans, extra_args=_args(hardening.apiserver_args(settings)), extra_volumes=volumes
        ),
        etcd=etcd,
        controller_manager=ControlPlaneComponent(extra_args=_args(hardening.controller_manager_args(settings))),
        scheduler=ControlPlaneComponent(extra_args=_args(hardening.scheduler_args(settings))),
    )


def _args(pairs: Sequence[tuple[str, str]]) -> tuple[Arg, ...]:
    return tuple(Arg(name, value) for name, value in pairs)


def renewal_document(shape: ClusterShape) -> str:
    """The ClusterConfiguration `kubeadm certs renew --config` reads, without `kubernetesVersion`: the renewal
    step adds its own kubeadm's version when it runs (kubeadm would look `stable-1` up on dl.k8s.io), so an
    upgrade leaves the step unchanged."""
    wire = _to_wire(cluster_configuration(shape))
    del wire["kubernetesVersion"]
    return yamldoc.dump(wire)


def init_documents(shape: ClusterShape, *, hostname: str, address: str, token: str) -> str:
    init = InitConfiguration(
        node_registration=_registration(hostname, address, control_plane=True),
        local_api_endpoint=APIEndpoint(advertise_address=address),
        bootstrap_tokens=(BootstrapToken(token=token),),
        timeouts=Timeouts(kubernetes_api_call=INIT_API_CALL_TIMEOUT),
    )
    return to_yaml(init, cluster_configuration(shape), KubeletConfiguration())


def settings_documents(shape: ClusterShape, *, hostname: str, address: str) -> str:
    """What the control-plane settings step (render/control_plane_config.py) gives `kubeadm init phase
    control-plane` and `upload-config` on a running control plane: this node's registration and endpoint, as
    `kubeadm init`/`join` had them, and the ClusterConfiguration. No token: those phases use none."""
    init = InitConfiguration(
        node_registration=_registration(hostname, address, control_plane=True),
        local_api_endpoint=APIEndpoint(advertise_address=address),
        bootstrap_tokens=None,
    )
    return to_yaml(init, cluster_configuration(shape), KubeletConfiguration())


def join_documents(
    shape: ClusterShape, *, hostname: str, address: str, token: str, ca_cert_hash: str, control_plane: bool
) -> str:
    join = JoinConfiguration(
        node_registration=_registration(hostname, address, control_plane=control_plane),
        discovery=Discovery(
            BootstrapTokenDiscovery(api_server_endpoint=shape.endpoint, token=token, ca_cert_hashes=(ca_cert_hash,))
        ),
        control_plane=JoinControlPlane(local_api_endpoint=APIEndpoint(advertise_address=address))
        if control_plane
        else None,
    )
    return to_yaml(join)


def first_service_ip(service_subnet: str) -> str:
    """kube-apiserver's ClusterIP (`kubernetes.default`), which kubeadm puts in the serving certificate."""
    return str(ipaddress.IPv4Network(service_subnet).network_address + 1)


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class TokenConfiguration:
    """The part of an InitConfiguration `kubeadm token create --config` reads: the token and its TTL."""

    bootstrap_tokens: tuple[BootstrapToken, ...]
    api_version: str = KUBEADM_API
    kind: str = "InitConfiguration"


def token_documents(token: str, kubernetes_version: str) -> str:
    """What `kubeadm token create --config` reads: the token, and the version so kubeadm looks nothing up.

    kubeadm loads the file as an InitConfiguration plus a ClusterConfiguration and defaults a missing
    `kubernetesVersion` to `stable-1`, which it resolves from dl.k8s.io; naming the cluster's version here
    keeps the refresh offline.
    """
    version_only = {
        "apiVersion": KUBEADM_API,
        "kind": "ClusterConfiguration",
        "kubernetesVersion": f"v{kubernetes_version}",
    }
    return to_yaml(TokenConfiguration(bootstrap_tokens=(BootstrapToken(token=token),)), version_only)
