"""The kubelet-serving approver against a real API server and controller manager (components/csr_approval.py).

The lab (tests/real/control_plane_lab.py) runs the `smallest` shape at the default Kubernetes version: one
control plane from kubeadm's own init phases on the program's init.yaml and placed PKI, its stacked etcd,
kube-apiserver and kube-controller-manager from kubeadm's manifests (the controller manager's signer is the
cluster CA, as kubeadm configures it), and the lone load balancer's HAProxy from the program's files.

A real kubelet identity asks: the client certificate kubeadm's `kubeconfig` phase put in the control plane's
kubelet.conf (CN=system:node:smallest-cp-1, O=system:nodes, signed by the program's cluster CA) creates, through
the VIP, the CSR its kubelet would (ECDSA P-256, DNS [hostname], IP [address], "digital signature" and
"server auth", signer kubernetes.io/kubelet-serving), and a forged one with one more SAN; the program's admin
creates a third with the node's exact names (a requester that is not the node).

Proven, with the scripts of render/csr_approval.py run unmodified on the control plane as a step runs (bash -c,
as root, in its network and mount namespaces, the real kubectl on PATH, its admin.conf from kubeadm):
1. the timer's approver approves the right CSR only, and the controller manager's signer then issues a
   certificate that the cluster CA verifies, for exactly the planned names, serverAuth; the forged and the
   admin's CSRs stay pending, without a certificate, each reported with why; the run exits 0;
2. the one-shot step fails after its bound while nothing on the node serves a certificate from the cluster CA
   (nothing on kubelet's port 10250, then a self-signed certificate with the right names, as a kubelet without
   serverTLSBootstrap serves), naming the kubelet and the CSRs left pending with why, and the CSR table. When
   the kubelet rotates (a new CSR from the node identity) and a stand-in kubelet serves the certificate on
   10250 as soon as the signer issued it, the step approves that CSR itself, waits for the kubelet to serve
   it, and succeeds; a second run is "already done".

Binaries: tests/real/build-binaries kubeadm kube-apiserver kube-controller-manager kubectl etcd. Debian: haproxy
curl iproute2 openssl python3. Root.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from model.versions import DEFAULT_KUBERNETES
from render.csr_approval import KUBELET_PORT, approve_step_script, approver_script, serving_plan
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, Process, cleanup_stale, poll_until
from tests.real.binaries import binary
from tests.real.control_plane_lab import ControlPlaneLab, Node, report
from tests.real.documents import init_step, step_files
from tools.plan import mask

pytestmark = pytest.mark.real

STACK = "smallest"
VERSION = DEFAULT_KUBERNETES
REQUIRED = ("kubeadm", "kube-apiserver", "kube-controller-manager", "kubectl", "etcd")
COMPONENTS = ("kube-apiserver", "kube-controller-manager")
INIT = "/etc/kubernetes/kubeadm-ha/init.yaml"
CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
SIGNER = "kubernetes.io/kubelet-serving"
SIGN_BOUND = 60.0
STEP_BOUND = 240.0


@dataclass
class CsrLab:
    lab: ControlPlaneLab
    node: Node
    key: ec.EllipticCurvePrivateKey  # the right CSR's key
    names: dict[str, str]  # case -> CSR name
    identity: tuple[Path, Path]  # the kubelet's client certificate and key


def node_identity(lab: ControlPlaneLab, node: Node) -> tuple[Path, Path]:
    """The kubelet client pair kubeadm's `kubeconfig` phase embedded in the node's kubelet.conf, as files."""
    kubeconfig = yaml.safe_load(node.root.read("/etc/kubernetes/kubelet.conf"))
    user = kubeconfig["users"][0]["user"]
    directory = lab.work / "kubelet-identity"
    directory.mkdir(mode=0o700, exist_ok=True)
    cert, key = directory / "client.crt", directory / "client.key"
    cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
    key.write_bytes(base64.b64decode(user["client-key-data"]))
    key.chmod(0o600)
    subject = {(a.oid, a.value) for a in x509.load_pem_x509_certificate(cert.read_bytes()).subject}
    assert subject == {(NameOID.COMMON_NAME, f"system:node:{node.name}"), (NameOID.ORGANIZATION_NAME, "system:nodes")}
    return cert, key


def kubelet_request(key: ec.EllipticCurvePrivateKey, node: Node, dns: list[str], ips: list[str]) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node.name}")])  # fmt: skip
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def csr_body(name: str, pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": base64.b64encode(pem).decode(),
            "signerName": SIGNER,
            "usages": ["digital signature", "server auth"],
        },
    }


def post_as_node(lab: ControlPlaneLab, identity: tuple[Path, Path], body: dict[str, Any]) -> dict[str, Any]:
    """POST a CSR through the VIP with the kubelet's client certificate (the API server records who asked)."""
    context = ssl.create_default_context(cafile=str(lab.ca_file))
    context.load_cert_chain(str(identity[0]), str(identity[1]))
    with lab.client.entered():
        connection = http.client.HTTPSConnection(
            str(lab.plan.vip), lab.config.load_balancer.port, timeout=10, context=context
        )
        connection.connect()
    try:
        connection.request("POST", CSR_PATH, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    assert response.status == 201, (response.status, text[:500])
    created: dict[str, Any] = json.loads(text)
    return created


def csr(lab: ControlPlaneLab, name: str) -> dict[str, Any]:
    response = lab.request("GET", f"{CSR_PATH}/{name}")
    assert response.status == 200, (response.status, response.body[:300])
    found: dict[str, Any] = response.json()
    return found


def conditions(found: dict[str, Any]) -> set[str]:
    return {condition["type"] for condition in (found.get("status") or {}).get("conditions") or []}


@pytest.fixture(scope="module")
def csr_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CsrLab]:
    require_root()
    programs = require_programs("ip", "haproxy", "curl", "unshare", "nsenter", "openssl", "python3")
    binaries = {name: binary(name, VERSION) for name in REQUIRED}
    cleanup_stale()
    work = tmp_path_factory.mktemp("csr-lab")
    lab = Lab("csr", log_dir=work / "logs")
    live: ControlPlaneLab | None = None
    failed = False
    try:
        started = time.monotonic()
        live = ControlPlaneLab(lab, work, STACK, VERSION, binaries, programs)
        assert live.etcd_spec is None and len(live.plan.control_planes) == 1
        live.prepare_control_planes(only_first=True)
        node = live.nodes[live.plan.control_planes[0].hostname]
        # Everything the program's `kubeadm-init` step installs (the lab places only its init.yaml): the API
        # server's manifest names the audit policy and the encryption configuration that bundle carries.
        node.root.place(step_files(live.evaluation, init_step(live.evaluation)))
        live.start_stacked_etcd(node)
        live.start_control_planes(COMPONENTS, only=[node.name])
        live.start_load_balancers()
        live.wait_backends({node.name: "UP"}, timeout=30)
        for phase in (["upload-config", "all"], ["bootstrap-token"]):
            ran = live.kubeadm(node, "init", "phase", *phase, "--config", INIT)
            assert ran.returncode == 0, ran.output
        report(f"control plane of {STACK} up in {time.monotonic() - started:.1f}s")
        identity = node_identity(live, node)
        key = ec.generate_private_key(ec.SECP256R1())
        planned_dns, planned_ips = [node.name], [node.address]
        names = {"right": "kha-kubelet-serving-right", "extra SAN": "kha-kubelet-serving-extra-san",
                 "admin": "kha-kubelet-serving-from-admin"}  # fmt: skip
        right = kubelet_request(key, node, planned_dns, planned_ips)
        created = post_as_node(live, identity, csr_body(names["right"], right))
        assert created["spec"]["username"] == f"system:node:{node.name}"
        other_key = ec.generate_private_key(ec.SECP256R1())
        forged = kubelet_request(other_key, node, [*planned_dns, "kubernetes"], planned_ips)
        post_as_node(live, identity, csr_body(names["extra SAN"], forged))
        from_admin = kubelet_request(other_key, node, planned_dns, planned_ips)
        response = live.request("POST", CSR_PATH, body=csr_body(names["admin"], from_admin))
        assert response.status == 201, (response.status, response.body[:300])
        yield CsrLab(live, node, key, names, identity)
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request):
            print(f"\n===== logs of lab {lab.prefix} =====\n{mask(lab.logs(tail=30))}")
        lab.close()
        if live is not None:
            live.close()


def plan_of(lab: ControlPlaneLab) -> Any:
    return serving_plan([*lab.plan.control_planes, *lab.plan.workers])


def test_the_approver_approves_the_kubelets_csr_and_the_signer_issues_it(csr_lab: CsrLab) -> None:
    lab, node = csr_lab.lab, csr_lab.node
    started = time.monotonic()
    ran = lab.run_step(node, approver_script(node.name, plan_of(lab)).render(), "", timeout=STEP_BOUND)
    took = time.monotonic() - started
    assert ran.returncode == 0, ran.output
    right, extra, admin = (csr_lab.names[case] for case in ("right", "extra SAN", "admin"))
    assert f"approved kubelet-serving CSR {right} of node {node.name}" in ran.stdout, ran.output
    pending = [line for line in ran.stderr.splitlines() if "left pending" in line]
    assert len(pending) == 2, ran.output
    assert any(f'"{extra}"' in line and 'not planned ["kubernetes"]' in line for line in pending), pending
    assert any(f'"{admin}"' in line and "the requester is not a node" in line for line in pending), pending
    issued = poll_until(
        lambda: csr(lab, right).get("status", {}).get("certificate"),
        timeout=SIGN_BOUND,
        interval=0.5,
        message=f"the controller manager's signer to issue {right}",
    )
    report(f"approver run {took:.1f}s; certificate issued {time.monotonic() - started:.1f}s after its start")
    assert conditions(csr(lab, right)) == {"Approved"}
    certificate = x509.load_pem_x509_certificate(base64.b64decode(issued))
    ca = x509.load_pem_x509_certificate(lab.ca_file.read_bytes())
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [node.name]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [node.address]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate.public_key() == csr_lab.key.public_key()
    assert certificate.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    for name in (extra, admin):
        found = csr(lab, name)
        assert conditions(found) == set() and not found.get("status", {}).get("certificate"), name


def serve(csr_lab: CsrLab, certificate_pem: bytes, key: ec.EllipticCurvePrivateKey, name: str) -> Process:
    """A TLS server on kubelet's port in the node's namespace, serving `certificate_pem` (as kubelet serves its own)."""
    lab, node = csr_lab.lab, csr_lab.node
    directory = lab.work / f"kubelet-{name}"
    directory.mkdir(mode=0o700)
    (directory / "serving.crt").write_bytes(certificate_pem)
    (directory / "serving.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    argv = ["openssl", "s_server", "-accept", str(KUBELET_PORT), "-cert", str(directory / "serving.crt"),
            "-key", str(directory / "serving.key"), "-www", "-quiet"]  # fmt: skip
    process = lab.lab.spawn(node.namespace, argv, name=f"kubelet-tls-{name}")

    def listening() -> bool:
        assert process.alive(), process.log()
        connect = f"exec 3<>/dev/tcp/{node.address}/{KUBELET_PORT}"
        return node.root.run(["bash", "-c", connect], netns=node.namespace.name, timeout=10).returncode == 0

    poll_until(listening, timeout=15, interval=0.2, message=f"the stand-in kubelet TLS server ({name})")
    return process


def self_signed(csr_lab: CsrLab) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """What a kubelet without serverTLSBootstrap serves: its own self-signed certificate, with the right names."""
    key = ec.generate_private_key(ec.SECP256R1())
    node = csr_lab.node
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{node.name}@1700000000")])
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName(node.name), x509.IPAddress(ipaddress.ip_address(node.address))])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365)).add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM), key


def test_the_step_waits_for_the_kubelet_to_serve_the_issued_certificate(csr_lab: CsrLab) -> None:
    lab, node = csr_lab.lab, csr_lab.node
    plan = plan_of(lab)
    extra, admin = csr_lab.names["extra SAN"], csr_lab.names["admin"]
    short = approve_step_script(node.name, plan, wait_seconds=12).render()
    ran = lab.run_step(node, short, "", timeout=STEP_BOUND)
    assert ran.returncode != 0, ran.output
    assert f"the kubelet of: {node.name}. Its kubelet-serving CSR did not appear, or stayed pending" in ran.stderr
    assert f'"{extra}"' in ran.stderr and f'"{admin}"' in ran.stderr, ran.output
    assert f"{extra}" in ran.stderr.split("stayed pending:", 1)[1]  # and the CSR table
    # A kubelet without serverTLSBootstrap serves a self-signed certificate: not one from the cluster CA.
    pem, key = self_signed(csr_lab)
    impostor = serve(csr_lab, pem, key, "self-signed")
    try:
        ran = lab.run_step(node, short, "", timeout=STEP_BOUND)
        assert ran.returncode != 0 and f"the kubelet of: {node.name}." in ran.stderr, ran.output
    finally:
        impostor.stop()
    # The kubelet rotates: a new key, a new CSR. A stand-in kubelet waits for its certificate (kubelet's
    # certificate manager watches its CSR) and then serves it on kubelet's port, while the step approves it.
    rotated, key = "kha-kubelet-serving-rotated", ec.generate_private_key(ec.SECP256R1())
    body = csr_body(rotated, kubelet_request(key, node, [node.name], [node.address]))
    post_as_node(lab, csr_lab.identity, body)
    kubelet: list[Process] = []
    failures: list[BaseException] = []

    def kubelet_stand_in() -> None:
        try:
            issued = poll_until(
                lambda: csr(lab, rotated).get("status", {}).get("certificate"),
                timeout=STEP_BOUND,
                interval=0.5,
                message=f"the certificate of {rotated}",
            )
            kubelet.append(serve(csr_lab, base64.b64decode(issued), key, "rotated"))
        except BaseException as error:  # reported by the test below
            failures.append(error)

    waiting = threading.Thread(target=kubelet_stand_in, name="kubelet-stand-in", daemon=True)
    waiting.start()
    try:
        started = time.monotonic()
        script = approve_step_script(node.name, plan, wait_seconds=90).render()
        ran = lab.run_step(node, script, "", timeout=STEP_BOUND)
        took = time.monotonic() - started
        waiting.join(timeout=STEP_BOUND)
        assert not failures, failures
        assert ran.returncode == 0, ran.output
        assert f"approved kubelet-serving CSR {rotated} of node {node.name}" in ran.stdout, ran.output
        assert f"kubeadm-ha: kubelet-serving-approve done on {node.name}" in ran.stdout, ran.output
        assert f'"{extra}"' in ran.stderr and f'"{admin}"' in ran.stderr  # still pending, and said so
        report(f"one-shot step: approved, issued and served in {took:.1f}s")
        again = lab.run_step(node, script, "", timeout=STEP_BOUND)
        assert again.returncode == 0 and "already done" in again.stdout, again.output
    finally:
        waiting.join(timeout=STEP_BOUND)
        for process in kubelet:
            process.stop()
    for name in (extra, admin):
        assert conditions(csr(lab, name)) == set(), name
