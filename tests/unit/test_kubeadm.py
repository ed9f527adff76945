"""kubeadm documents: the values the program means to send.

Whether kubeadm accepts them (API versions, kinds, field names and shapes, token and hash formats) is
checked by kubeadm itself in tests/real/test_kubeadm_documents.py, not re-described here.
"""

from __future__ import annotations

import dataclasses

import yaml

from model.timing import EtcdTimingConfig, LeaderElectionConfig
from render.hardening import Hardening
from render.kubeadm import ClusterShape, ExternalEtcd, init_documents, join_documents

SHAPE = ClusterShape(
    cluster_name="prod",
    kubernetes_version="1.34.2",
    endpoint_host="10.17.5.10",
    endpoint_port=6443,
    pod_subnet="10.244.0.0/16",
    service_subnet="10.96.0.0/12",
    extra_sans=("api.prod.k8s.internal",),
)
TOKEN = "abcdef.0123456789abcdef"
HASH = "sha256:" + "a" * 64


def docs(text: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def test_init_documents() -> None:
    found = docs(init_documents(SHAPE, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN))
    assert set(found) == {"InitConfiguration", "ClusterConfiguration", "KubeletConfiguration"}
    init, cluster = found["InitConfiguration"], found["ClusterConfiguration"]
    assert init["bootstrapTokens"][0]["token"] == TOKEN
    assert init["bootstrapTokens"][0]["ttl"] == "24h0m0s"
    assert init["localAPIEndpoint"] == {"advertiseAddress": "10.17.5.31", "bindPort": 6443}
    assert init["nodeRegistration"]["name"] == "prod-cp-1"
    assert init["nodeRegistration"]["kubeletExtraArgs"] == [{"name": "node-ip", "value": "10.17.5.31"}]
    assert cluster["controlPlaneEndpoint"] == "10.17.5.10:6443"
    assert "10.17.5.10" in cluster["apiServer"]["certSANs"]
    assert cluster["kubernetesVersion"] == "v1.34.2"
    assert cluster["networking"] == {
        "podSubnet": "10.244.0.0/16",
        "serviceSubnet": "10.96.0.0/12",
        "dnsDomain": "cluster.local",
    }
    assert cluster["etcd"]["local"]["dataDir"] == "/var/lib/etcd"
    assert {"name": "quota-backend-bytes", "value": str(4 * 2**30)} in cluster["etcd"]["local"]["extraArgs"]
    for component in ("apiServer", "controllerManager", "scheduler"):
        assert {"name": "profiling", "value": "false"} in cluster[component]["extraArgs"], component
    assert "certificateKey" not in init and "uploadCerts" not in str(found)
    assert found["KubeletConfiguration"]["cgroupDriver"] == "systemd"


def test_init_asks_its_new_api_server_as_long_as_kubeadm_waits_for_the_control_plane() -> None:
    """The cluster lab (QEMU TCG): kubeadm init gave up creating its admin ClusterRoleBinding after the default
    1m of `timeouts.kubernetesAPICall`, 10 s before the API server served (70 s after the kubelet started).
    kubeadm v1.37.2 runs that poll before its own waits for the kubelet and the components (4m each by default,
    cmd/kubeadm/app/constants: ControlPlaneComponentHealthCheckTimeout), so it must not be the shorter bound."""
    found = docs(init_documents(SHAPE, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN))
    assert found["InitConfiguration"]["timeouts"] == {"kubernetesAPICall": "4m0s"}
    # Nothing else is bounded differently from kubeadm's defaults, and the joins keep theirs.
    join = docs(
        join_documents(
            SHAPE, hostname="prod-cp-2", address="10.17.5.32", token=TOKEN, ca_cert_hash=HASH, control_plane=True
        )
    )
    assert "timeouts" not in join["JoinConfiguration"]


def test_control_plane_join_has_local_endpoint_and_pinned_ca() -> None:
    join = docs(
        join_documents(
            SHAPE, hostname="prod-cp-2", address="10.17.5.32", token=TOKEN, ca_cert_hash=HASH, control_plane=True
        )
    )["JoinConfiguration"]
    assert join["discovery"]["bootstrapToken"] == {
        "apiServerEndpoint": "10.17.5.10:6443",
        "token": TOKEN,
        "caCertHashes": [HASH],
    }
    assert join["controlPlane"] == {"localAPIEndpoint": {"advertiseAddress": "10.17.5.32", "bindPort": 6443}}
    assert "certificateKey" not in join["controlPlane"]


def test_worker_join_is_not_a_control_plane() -> None:
    join = docs(
        join_documents(
            SHAPE, hostname="prod-worker-1", address="10.17.5.51", token=TOKEN, ca_cert_hash=HASH, control_plane=False
        )
    )["JoinConfiguration"]
    assert "controlPlane" not in join
    assert "taints" not in join["nodeRegistration"]


def test_external_etcd() -> None:
    external = ExternalEtcd(
        endpoints=("https://10.17.5.21:2379", "https://10.17.5.22:2379"),
        ca_file="/etc/kubernetes/pki/etcd/ca.crt",
        cert_file="/etc/kubernetes/pki/apiserver-etcd-client.crt",
        key_file="/etc/kubernetes/pki/apiserver-etcd-client.key",
    )
    shape = ClusterShape(**{**SHAPE.__dict__, "external_etcd": external})
    cluster = docs(init_documents(shape, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN))[
        "ClusterConfiguration"
    ]
    assert cluster["etcd"] == {
        "external": {
            "endpoints": ["https://10.17.5.21:2379", "https://10.17.5.22:2379"],
            "caFile": "/etc/kubernetes/pki/etcd/ca.crt",
            "certFile": "/etc/kubernetes/pki/apiserver-etcd-client.crt",
            "keyFile": "/etc/kubernetes/pki/apiserver-etcd-client.key",
        }
    }


def test_documents_are_byte_identical_for_identical_inputs() -> None:
    first = init_documents(SHAPE, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN)
    assert first == init_documents(SHAPE, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN)


def test_etcd_timing_reaches_stacked_etcd_only_when_the_stack_sets_it() -> None:
    def etcd_args(shape: ClusterShape) -> list[dict[str, str]]:
        cluster = docs(init_documents(shape, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN))
        return cluster["ClusterConfiguration"]["etcd"]["local"]["extraArgs"]

    assert [arg["name"] for arg in etcd_args(SHAPE)] == [
        "quota-backend-bytes",
        "auto-compaction-mode",
        "auto-compaction-retention",
    ]
    timing = EtcdTimingConfig(heartbeatIntervalMs=500, electionTimeoutMs=5000)
    found = etcd_args(dataclasses.replace(SHAPE, hardening=Hardening(etcd_timing=timing)))
    assert found[3:] == [{"name": "heartbeat-interval", "value": "500"}, {"name": "election-timeout", "value": "5000"}]


def test_leader_election_flags_reach_both_components_only_when_the_stack_sets_them() -> None:
    def args(shape: ClusterShape) -> dict[str, list[dict[str, str]]]:
        cluster = docs(init_documents(shape, hostname="prod-cp-1", address="10.17.5.31", token=TOKEN))
        return {name: cluster["ClusterConfiguration"][name]["extraArgs"] for name in ("controllerManager", "scheduler")}

    assert all("leader-elect" not in str(found) for found in args(SHAPE).values())
    timing = LeaderElectionConfig(leaseDurationSeconds=60, renewDeadlineSeconds=40, retryPeriodSeconds=5)
    shape = dataclasses.replace(SHAPE, hardening=Hardening(leader_election=timing))
    for component, found in args(shape).items():
        assert found == [
            {"name": "profiling", "value": "false"},
            {"name": "leader-elect-lease-duration", "value": "60s"},
            {"name": "leader-elect-renew-deadline", "value": "40s"},
            {"name": "leader-elect-retry-period", "value": "5s"},
        ], component
