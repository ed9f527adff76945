"""Every certificate the program issues, checked by openssl: chains, CA flags, key usages, key pairs."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import require_programs
from tests.stacks import ALL_STACKS, evaluated
from tools.offline import Evaluation

pytestmark = pytest.mark.integration

SELF_SIGNED = "tls:index/selfSignedCert:SelfSignedCert"
LOCALLY_SIGNED = "tls:index/locallySignedCert:LocallySignedCert"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
# What openssl prints for each pulumi-tls `allowedUses` entry.
EXTENDED_USAGE_TEXT = {"server_auth": "TLS Web Server Authentication", "client_auth": "TLS Web Client Authentication"}


@dataclass(frozen=True)
class Issued:
    name: str
    cert_pem: str
    key_pem: str
    ca_pem: str | None  # None: self-signed CA
    allowed_uses: tuple[str, ...]


def issued_certificates(ev: Evaluation) -> list[Issued]:
    keys_by_pem = {key.outputs["privateKeyPem"]: key for key in ev.by_type(PRIVATE_KEY)}
    found = []
    for ca in ev.by_type(SELF_SIGNED):
        found.append(
            Issued(ca.name, ca.outputs["certPem"], ca.inputs["privateKeyPem"], None, tuple(ca.inputs["allowedUses"]))
        )
    requests = {r.outputs["certRequestPem"]: r for r in ev.by_type("tls:index/certRequest:CertRequest")}
    for leaf in ev.by_type(LOCALLY_SIGNED):
        request = requests[leaf.inputs["certRequestPem"]]
        key = keys_by_pem[request.inputs["privateKeyPem"]]
        found.append(
            Issued(
                leaf.name,
                leaf.outputs["certPem"],
                key.outputs["privateKeyPem"],
                leaf.inputs["caCertPem"],
                tuple(leaf.inputs["allowedUses"]),
            )
        )
    return found


def openssl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_programs("openssl")["openssl"]
    return subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False)


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


CERTS = [
    pytest.param(stack, issued, id=f"{stack}/{issued.name}")
    for stack in ALL_STACKS
    for issued in issued_certificates(evaluated(stack))
]


@pytest.mark.parametrize(("stack", "issued"), CERTS)
def test_certificate_chains_and_usages(stack: str, issued: Issued, tmp_path: Path) -> None:
    cert = write(tmp_path, "cert.pem", issued.cert_pem)
    ca = write(tmp_path, "ca.pem", issued.ca_pem or issued.cert_pem)
    verified = openssl("verify", "-CAfile", ca, cert)
    assert verified.returncode == 0 and f"{cert}: OK" in verified.stdout, verified.stdout + verified.stderr

    text = openssl("x509", "-in", cert, "-noout", "-text").stdout
    if issued.ca_pem is None:
        assert "CA:TRUE" in text and "Certificate Sign" in text
    else:
        assert "CA:TRUE" not in text and "Certificate Sign" not in text
        for usage, shown in EXTENDED_USAGE_TEXT.items():
            assert (shown in text) == (usage in issued.allowed_uses), (usage, text)

    # The private key belongs to the certificate.
    cert_key = openssl("x509", "-in", cert, "-noout", "-pubkey").stdout
    key_path = write(tmp_path, "key.pem", issued.key_pem)
    assert openssl("pkey", "-in", key_path, "-pubout").stdout == cert_key


def test_a_certificate_does_not_verify_against_another_ca(tmp_path: Path) -> None:
    """Control for the chain check: the admin certificate is not accepted under the front-proxy CA."""
    ev = evaluated("staging")
    admin = write(tmp_path, "admin.pem", ev.named("admin-client-cert").outputs["certPem"])
    wrong_ca = write(tmp_path, "ca.pem", ev.named("front-proxy-ca").outputs["certPem"])
    assert openssl("verify", "-CAfile", wrong_ca, admin).returncode != 0


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_kubeconfig_client_certificate_chains_to_the_cluster_ca(stack: str, tmp_path: Path) -> None:
    ev = evaluated(stack)
    kubeconfig = yaml.safe_load(ev.outputs["kubeconfig"].value)
    cluster_ca = base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
    user = kubeconfig["users"][0]["user"]
    client = base64.b64decode(user["client-certificate-data"]).decode()
    assert cluster_ca == ev.named("cluster-ca").outputs["certPem"]
    ca, cert = write(tmp_path, "ca.pem", cluster_ca), write(tmp_path, "client.pem", client)
    assert openssl("verify", "-CAfile", ca, cert).returncode == 0
    subject = openssl("x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253").stdout
    assert "O=kubeadm:cluster-admins" in subject
    key = write(tmp_path, "client.key", base64.b64decode(user["client-key-data"]).decode())
    assert openssl("pkey", "-in", key, "-pubout").stdout == openssl("x509", "-in", cert, "-noout", "-pubkey").stdout
