"""An external etcd member: its topology types, its flags and its static pod manifest.

Each member runs etcd as a kubelet static pod (`registry.k8s.io/etcd`), as
kubeadm's guide for an external etcd cluster does, rather than as a systemd
service: the image is the exact etcd build kubeadm pins for the configured
Kubernetes minor (Ubuntu's `etcd-server` is a 3.4 release, older than any
kubeadm this program supports, and a release tarball would need its own
download and verification path), kubelet supervises and restarts it, and an
upgrade is a new image tag in one file.

Everything that decides how a member starts is pure: its flags (`etcd_member_flags`, also used by the
live test against a real etcd) and its static pod are here, its steps' scripts in render/etcd_scripts.py,
and the membership plan that picks each member's start (`plan_membership`) in components/etcd.py.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from model.config import EtcdMaintenanceConfig
from model.timing import EtcdTimingConfig
from render import yamldoc
from render.hardening import etcd_args
from render.kubeadm import CONFIG_DIR, PKI_DIR
from render.node_prep import STATIC_POD_DIR

CLIENT_PORT = 2379
PEER_PORT = 2380
# Plain-HTTP /livez, /readyz and /metrics on loopback only, for kubelet's probes.
METRICS_PORT = 2381
DATA_DIR = "/var/lib/etcd"
# kubeadm's value: a snapshot (and WAL compaction) every 10k writes.
SNAPSHOT_COUNT = 10000
ETCD_IMAGE_REPOSITORY = "registry.k8s.io/etcd"
MANIFEST_PATH = f"{STATIC_POD_DIR}/etcd.yaml"
# The manifest arrives here first: kubelet starts whatever lands in STATIC_POD_DIR, and an added member
# must not start before `member add`.
STAGED_MANIFEST_PATH = f"{CONFIG_DIR}/etcd.yaml"
STOPPED_MANIFEST_PATH = f"{CONFIG_DIR}/etcd.yaml.stopped"

# kubeadm's layout of etcd's certificates; components/pki.py issues them at these paths.
ETCD_PKI_DIR = f"{PKI_DIR}/etcd"

MemberState = Literal["new", "existing"]


@dataclass(frozen=True)
class EtcdPaths:
    """Where a member's data and certificates are; kubeadm's layout unless a test remaps them."""

    data_dir: str = DATA_DIR
    trusted_ca: str = f"{ETCD_PKI_DIR}/ca.crt"
    server_cert: str = f"{ETCD_PKI_DIR}/server.crt"
    server_key: str = f"{ETCD_PKI_DIR}/server.key"
    peer_cert: str = f"{ETCD_PKI_DIR}/peer.crt"
    peer_key: str = f"{ETCD_PKI_DIR}/peer.key"
    healthcheck_cert: str = f"{ETCD_PKI_DIR}/healthcheck-client.crt"
    healthcheck_key: str = f"{ETCD_PKI_DIR}/healthcheck-client.key"


@dataclass(frozen=True)
class EtcdMember:
    name: str
    index: int
    address: ipaddress.IPv4Address

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"


@dataclass(frozen=True)
class MemberStart:
    """How a member joins: bootstrapping a new cluster, or added to an existing one."""

    state: MemberState
    initial_cluster: tuple[EtcdMember, ...]


@dataclass(frozen=True)
class EtcdClusterSpec:
    token: str
    image: str
    members: tuple[EtcdMember, ...]  # planned, by index
    starts: Mapping[str, MemberStart]
    initial_members: tuple[str, ...]  # exported and re-exported forever
    # etcd.maintenance: the size limit and compaction every member starts with (render/hardening.py `etcd_args`).
    maintenance: EtcdMaintenanceConfig
    # etcd.timing: the Raft heartbeat and election timeout, when the stack sets them.
    timing: EtcdTimingConfig | None = None
    paths: EtcdPaths = field(default_factory=EtcdPaths)

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"{name} is not a planned etcd member")

    @property
    def client_urls(self) -> tuple[str, ...]:
        return tuple(member.client_url for member in self.members)


def etcd_member_flags(member: EtcdMember, cluster: EtcdClusterSpec) -> tuple[str, ...]:
    """etcd's command-line flags for `member`: the static pod's command, and what the live test runs.

    Only flags etcd 3.4 through 3.6 all accept, so Debian's etcd 3.4 can prove them.
    """
    start = cluster.starts[member.name]
    paths = cluster.paths
    return (
        f"--name={member.name}",
        f"--data-dir={paths.data_dir}",
        # Loopback too, for etcdctl on the node; clients elsewhere use the member address.
        f"--listen-client-urls=https://127.0.0.1:{CLIENT_PORT},{member.client_url}",
        f"--advertise-client-urls={member.client_url}",
        f"--listen-peer-urls={member.peer_url}",
        f"--initial-advertise-peer-urls={member.peer_url}",
        "--initial-cluster=" + ",".join(f"{peer.name}={peer.peer_url}" for peer in start.initial_cluster),
        f"--initial-cluster-state={start.state}",
        f"--initial-cluster-token={cluster.token}",
        "--client-cert-auth=true",
        f"--trusted-ca-file={paths.trusted_ca}",
        f"--cert-file={paths.server_cert}",
        f"--key-file={paths.server_key}",
        "--peer-client-cert-auth=true",
        f"--peer-trusted-ca-file={paths.trusted_ca}",
        f"--peer-cert-file={paths.peer_cert}",
        f"--peer-key-file={paths.peer_key}",
        f"--snapshot-count={SNAPSHOT_COUNT}",
        f"--listen-metrics-urls=http://127.0.0.1:{METRICS_PORT}",
        # The same quota and compaction as a stacked member gets through kubeadm's etcd.local.extraArgs.
        *(f"--{name}={value}" for name, value in etcd_args(cluster.maintenance, cluster.timing)),
    )


def _probe(path: str, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"host": "127.0.0.1", "path": path, "port": METRICS_PORT, "scheme": "HTTP"},
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "timeoutSeconds": 15,
        "failureThreshold": failure_threshold,
    }


def etcd_static_pod(member: EtcdMember, cluster: EtcdClusterSpec) -> dict[str, Any]:
    """The member's static Pod, shaped like kubeadm's own etcd manifest."""
    paths = cluster.paths
    cert_dir = posixpath.dirname(paths.trusted_ca)
    files = (paths.trusted_ca, paths.server_cert, paths.server_key, paths.peer_cert, paths.peer_key)
    if any(posixpath.dirname(path) != cert_dir for path in files):
        raise ValueError(f"etcd's certificates and keys must share one directory (mounted into the pod): {files}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "etcd",
            "namespace": "kube-system",
            "labels": {"component": "etcd", "tier": "control-plane"},
            "annotations": {"kubeadm.kubernetes.io/etcd.advertise-client-urls": member.client_url},
        },
        "spec": {
            "hostNetwork": True,
            "priority": 2000001000,
            "priorityClassName": "system-node-critical",
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "etcd",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["etcd", *etcd_member_flags(member, cluster)],
                    "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}},
                    # kubeadm's probes: /livez ignores quorum (a restart cannot bring a leader back, and a
                    # crash loop would make things worse); /readyz gates the start-up period only.
                    "livenessProbe": _probe("/livez", 8),
                    "startupProbe": _probe("/readyz", 24),
                    "volumeMounts": [
                        {"name": "etcd-data", "mountPath": paths.data_dir},
                        {"name": "etcd-certs", "mountPath": cert_dir, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "etcd-data", "hostPath": {"path": paths.data_dir, "type": "DirectoryOrCreate"}},
                {"name": "etcd-certs", "hostPath": {"path": cert_dir, "type": "DirectoryOrCreate"}},
            ],
        },
    }


def render_manifest(member: EtcdMember, cluster: EtcdClusterSpec) -> str:
    return yamldoc.dump(etcd_static_pod(member, cluster))
