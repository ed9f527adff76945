"""kubeadm's own init phases on the program's documents and pre-placed PKI (section 2 of issue 9).

For a stacked-etcd stack with two load balancers, the external-etcd stack and the smallest shape, at
the default and the oldest supported Kubernetes, the first control plane's `place-pki` bundle and
`init.yaml` are put where the program puts them, and real kubeadm runs `init phase certs all`,
`kubeconfig all`, `control-plane all` (and `etcd local` when stacked) in a private mount namespace
(tests/real/node_root.py: /etc and /var are overlays in the test's directory; the host is untouched).

Proven: kubeadm reuses the shared CAs and the service-account key byte for byte (it would otherwise make
its own, and the control planes would not trust each other); every certificate it issues chains to the
program's CA; the API server's certificate names the VIP, api.<cluster>.<domain> and the node; with
external etcd kubeadm makes no etcd certificate and keeps the program's etcd client pair; the
kubeconfigs and the static-pod flags carry the program's endpoint, subnets, cluster name and etcd.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from components.etcd import plan_membership
from components.pki import APISERVER_ETCD_CLIENT, CLUSTER_CA, ETCD_CA, FRONT_PROXY_CA, SA_KEY_PATH, SA_PUB_PATH
from model.addressing import AddressPlan, NodePlan, plan_addresses
from model.config import ClusterConfig
from model.previous import NEW_STACK
from model.versions import release_for
from render.kubeadm import INIT_CONFIG_PATH, PKI_DIR, first_service_ip
from tests.real.binaries import KUBEADM_VERSIONS, binary
from tests.real.documents import evaluated_at, init_step, step_files
from tests.real.node_root import NodeRoot
from tests.stacks import stack_config

pytestmark = pytest.mark.real

PHASE_STACKS = ("staging", "prod", "smallest")
MANIFESTS = "/etc/kubernetes/manifests"
PHASE_TIMEOUT = 120
ETCD_LEAVES = ("etcd/server", "etcd/peer", "etcd/healthcheck-client", "apiserver-etcd-client")


@dataclasses.dataclass
class Phased:
    stack: str
    version: str
    config: ClusterConfig
    plan: AddressPlan
    node: NodePlan
    placed: dict[str, tuple[int, str]]
    root: NodeRoot

    @property
    def external(self) -> bool:
        return self.config.etcd.external

    def pem(self, path: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root.read(path).encode())

    def manifest(self, component: str) -> dict[str, Any]:
        return yaml.safe_load(self.root.read(f"{MANIFESTS}/{component}.yaml"))

    def flags(self, component: str) -> dict[str, str]:
        command = self.manifest(component)["spec"]["containers"][0]["command"]
        assert command[0] == component
        return dict(flag.removeprefix("--").split("=", 1) for flag in command[1:])

    def kubeconfig(self, name: str) -> dict[str, Any]:
        return yaml.safe_load(self.root.read(f"/etc/kubernetes/{name}"))

    @property
    def vip_endpoint(self) -> str:
        return f"https://{self.plan.vip}:{self.config.load_balancer.port}"


@functools.cache
def _addresses(stack: str) -> tuple[ClusterConfig, AddressPlan]:
    config = stack_config(stack)
    return config, plan_addresses(config)


@pytest.fixture(scope="module", params=[(s, v) for s in PHASE_STACKS for v in KUBEADM_VERSIONS], ids=str)
def phased(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Phased:
    stack, version = request.param
    kubeadm = binary("kubeadm", version)
    evaluation = evaluated_at(stack, version)
    config, plan = _addresses(stack)
    node = plan.control_planes[0]
    placed = step_files(evaluation, f"{node.hostname}-place-pki")
    root = NodeRoot(tmp_path_factory.mktemp(f"{stack}-{version}"))
    root.place(placed)
    root.place({INIT_CONFIG_PATH: step_files(evaluation, init_step(evaluation))[INIT_CONFIG_PATH]})
    phases = [["certs", "all"], ["kubeconfig", "all"], ["control-plane", "all"]]
    if not config.etcd.external:
        phases.append(["etcd", "local"])
    for phase in phases:
        ran = root.run([kubeadm, "init", "phase", *phase, "--config", INIT_CONFIG_PATH], timeout=PHASE_TIMEOUT)
        assert ran.returncode == 0, ran.output
    return Phased(stack, version, config, plan, node, placed, root)


def _verified_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names.get_values_for_type(x509.DNSName)), {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def test_shared_keys_are_reused_byte_for_byte(phased: Phased) -> None:
    shared = [CLUSTER_CA.cert_path, CLUSTER_CA.key_path, FRONT_PROXY_CA.cert_path, FRONT_PROXY_CA.key_path]
    shared += [SA_KEY_PATH, SA_PUB_PATH, ETCD_CA.cert_path]
    if phased.external:
        shared += [APISERVER_ETCD_CLIENT.cert_path, APISERVER_ETCD_CLIENT.key_path]
    else:
        shared.append(ETCD_CA.key_path)
    for path in shared:
        assert phased.root.read(path) == phased.placed[path][1], f"kubeadm replaced {path}"


def test_every_issued_certificate_chains_to_the_programs_cas(phased: Phased) -> None:
    ca, front_proxy = phased.pem(CLUSTER_CA.cert_path), phased.pem(FRONT_PROXY_CA.cert_path)
    etcd_ca = phased.pem(ETCD_CA.cert_path)
    issued = {"apiserver": ca, "apiserver-kubelet-client": ca, "front-proxy-client": front_proxy}
    if not phased.external:
        issued |= {leaf: etcd_ca for leaf in ETCD_LEAVES}
    for name, issuer in issued.items():
        assert _verified_by(phased.pem(f"{PKI_DIR}/{name}.crt"), issuer), f"{name}.crt is not signed by its CA"


def test_apiserver_certificate_names_the_vip_the_api_name_and_the_node(phased: Phased) -> None:
    dns, ips = _sans(phased.pem(f"{PKI_DIR}/apiserver.crt"))
    config = phased.config
    assert f"api.{config.cluster_name}.{config.network.domain}" in dns
    assert {phased.node.hostname, "kubernetes", "kubernetes.default.svc.cluster.local"} <= dns
    service_ip = first_service_ip(str(config.kubernetes.service_subnet))
    assert {str(phased.plan.vip), str(phased.node.address), service_ip} <= ips


def test_etcd_certificates_are_kubeadms_only_when_etcd_is_stacked(phased: Phased) -> None:
    made = {leaf for leaf in ETCD_LEAVES if phased.root.exists(f"{PKI_DIR}/{leaf}.crt")}
    if phased.external:
        # The program's own apiserver-etcd-client pair stays; kubeadm adds nothing of etcd's.
        assert made == {"apiserver-etcd-client"}
        assert not phased.root.exists(ETCD_CA.key_path)
        return
    assert made == set(ETCD_LEAVES)
    for leaf in ("etcd/server", "etcd/peer"):
        dns, ips = _sans(phased.pem(f"{PKI_DIR}/{leaf}.crt"))
        assert phased.node.hostname in dns and str(phased.node.address) in ips, leaf


def test_kubeconfigs_point_at_the_programs_endpoints(phased: Phased) -> None:
    ca_pem = phased.root.read(CLUSTER_CA.cert_path)
    local = f"https://{phased.node.address}:6443"
    servers = {}
    for name in ("admin.conf", "super-admin.conf", "kubelet.conf", "controller-manager.conf", "scheduler.conf"):
        kubeconfig = phased.kubeconfig(name)
        (cluster,) = kubeconfig["clusters"]
        assert cluster["name"] == phased.config.cluster_name, name
        assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]).decode() == ca_pem, name
        servers[name] = cluster["cluster"]["server"]
    # What an operator uses goes through the VIP; a control plane's own components (its kubelet too, since
    # kubeadm's ControlPlaneKubeletLocalMode) talk to the API server next to them.
    assert servers == {
        "admin.conf": phased.vip_endpoint,
        "super-admin.conf": phased.vip_endpoint,
        "kubelet.conf": local,
        "controller-manager.conf": local,
        "scheduler.conf": local,
    }


def test_static_pods_carry_the_programs_values(phased: Phased) -> None:
    config, node, version = phased.config, phased.node, phased.version
    apiserver = phased.flags("kube-apiserver")
    expected = {
        "advertise-address": str(node.address),
        "secure-port": "6443",
        "service-cluster-ip-range": str(config.kubernetes.service_subnet),
        "client-ca-file": CLUSTER_CA.cert_path,
        "enable-bootstrap-token-auth": "true",
        "service-account-key-file": SA_PUB_PATH,
        "service-account-signing-key-file": SA_KEY_PATH,
        "etcd-cafile": ETCD_CA.cert_path,
        "etcd-certfile": APISERVER_ETCD_CLIENT.cert_path,
        "etcd-keyfile": APISERVER_ETCD_CLIENT.key_path,
    }
    if phased.external:
        expected["etcd-servers"] = ",".join(plan_membership(config, phased.plan, NEW_STACK).client_urls)
    else:
        expected["etcd-servers"] = "https://127.0.0.1:2379"
    assert {key: apiserver.get(key) for key in expected} == expected

    controller = phased.flags("kube-controller-manager")
    assert controller["cluster-name"] == config.cluster_name
    assert controller["cluster-cidr"] == str(config.kubernetes.pod_subnet)
    assert controller["allocate-node-cidrs"] == "true"
    assert controller["service-cluster-ip-range"] == str(config.kubernetes.service_subnet)
    # Discovery needs the bootstrap signer (it signs cluster-info); expired tokens need the cleaner.
    assert {"*", "bootstrapsigner", "tokencleaner"} <= set(controller["controllers"].split(","))

    images = {
        name: phased.manifest(name)["spec"]["containers"][0]["image"]
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
    }
    assert images == {name: f"registry.k8s.io/{name}:v{version}" for name in images}

    if phased.external:
        assert not phased.root.exists(f"{MANIFESTS}/etcd.yaml")
        return
    etcd = phased.flags("etcd")
    address = node.address
    assert etcd["name"] == node.hostname
    assert etcd["advertise-client-urls"] == f"https://{address}:2379"
    assert etcd["initial-advertise-peer-urls"] == f"https://{address}:2380"
    assert etcd["initial-cluster"] == f"{node.hostname}=https://{address}:2380"
    assert etcd["data-dir"] == "/var/lib/etcd"
    # model/versions.py's etcd for this minor is the one kubeadm deploys.
    image = phased.manifest("etcd")["spec"]["containers"][0]["image"]
    assert image == f"registry.k8s.io/etcd:{release_for(version).etcd_image_tag}"


def test_the_host_is_untouched(phased: Phased) -> None:
    # Everything kubeadm wrote is in the overlay's upper layer, nothing on the host.
    assert phased.root.exists(f"{MANIFESTS}/kube-apiserver.yaml")
    assert not Path(f"{MANIFESTS}/kube-apiserver.yaml").exists()
