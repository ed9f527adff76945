"""Throwaway certificates for the labs' own TLS servers and clients (an etcd CA, a registry mirror's CA): one
builder, so each lab states only what its certificates must carry."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issuer | None = None,
    *,
    usages: Sequence[x509.ObjectIdentifier] = (),
    ips: Sequence[str] = (),
    key_usage: bool = False,
) -> x509.Certificate:
    """A certificate for `key`, valid for a day: a CA of its own when `issuer` is None, else signed by it.
    `key_usage` adds what a strict verifier (Go's crypto/x509 in containerd) checks: key identifiers and a
    critical KeyUsage (certificate and CRL signing for a CA, digital signature for a leaf)."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if ips:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False
        )
    if key_usage:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
            )
        flags = dict.fromkeys(
            ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only",
             "decipher_only"),
            False,
        )  # fmt: skip
        ca = issuer is None
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **flags), critical=True
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())
