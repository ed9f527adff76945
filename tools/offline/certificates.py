"""Deterministic pulumi-tls certificates and certificate requests, as terraform-provider-tls builds them."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Mapping
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from tools.offline.keys import PrivateKey, PublicKey, key_algorithm, require
from tools.offline.results import UNKNOWN

# allowed_uses of terraform-provider-tls, split into x509 KeyUsage flags ...
_KEY_USAGES: Final = {
    "digital_signature": "digital_signature",
    "content_commitment": "content_commitment",
    "key_encipherment": "key_encipherment",
    "data_encipherment": "data_encipherment",
    "key_agreement": "key_agreement",
    "cert_signing": "key_cert_sign",
    "crl_signing": "crl_sign",
    "encipher_only": "encipher_only",
    "decipher_only": "decipher_only",
}
# ... and extended key usages (OIDs as in Go's crypto/x509).
_EXTENDED_KEY_USAGES: Final = {
    "any_extended": ObjectIdentifier("2.5.29.37.0"),
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "ipsec_end_system": ObjectIdentifier("1.3.6.1.5.5.7.3.5"),
    "ipsec_tunnel": ObjectIdentifier("1.3.6.1.5.5.7.3.6"),
    "ipsec_user": ObjectIdentifier("1.3.6.1.5.5.7.3.7"),
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "microsoft_server_gated_crypto": ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"),
    "netscape_server_gated_crypto": ObjectIdentifier("2.16.840.1.113730.4.1"),
    "microsoft_commercial_code_signing": ObjectIdentifier("1.3.6.1.4.1.311.2.1.22"),
    "microsoft_kernel_code_signing": ObjectIdentifier("1.3.6.1.4.1.311.61.1.1"),
}

# Subject fields in the order Go's pkix.Name.ToRDNSequence emits them.
_SUBJECT_FIELDS: Final = (
    ("country", NameOID.COUNTRY_NAME),
    ("province", NameOID.STATE_OR_PROVINCE_NAME),
    ("locality", NameOID.LOCALITY_NAME),
    ("streetAddresses", NameOID.STREET_ADDRESS),
    ("postalCode", NameOID.POSTAL_CODE),
    ("organization", NameOID.ORGANIZATION_NAME),
    ("organizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("commonName", NameOID.COMMON_NAME),
    ("serialNumber", NameOID.SERIAL_NUMBER),
    ("emailAddress", NameOID.EMAIL_ADDRESS),
)

# Certificates must not depend on the wall clock, or two evaluations would differ.
NOT_BEFORE: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- certificates


def _load_private_key(pem: str, what: str) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"{what}: unsupported private key type {type(key).__name__}")
    return key


def _key_pem(inputs: Mapping[str, Any], key: str, what: str) -> str:
    value = inputs.get(key) or inputs.get(f"{key}Wo")
    if value is None or value is UNKNOWN:
        raise ValueError(f"{what}: required input {key!r} is missing or unknown")
    return str(value)


def _subject(subject: Any) -> x509.Name:
    if not isinstance(subject, Mapping):
        return x509.Name([])
    rdns: list[x509.RelativeDistinguishedName] = []
    for key, oid in _SUBJECT_FIELDS:
        raw = subject.get(key)
        values = raw if isinstance(raw, list) else [raw]
        present = [str(v) for v in values if v not in (None, "")]
        if present:
            rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, v) for v in present]))
    return x509.Name(rdns)


def _general_names(inputs: Mapping[str, Any]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(str(n)) for n in inputs.get("dnsNames") or []]
    names += [x509.IPAddress(ipaddress.ip_address(str(a))) for a in inputs.get("ipAddresses") or []]
    names += [x509.UniformResourceIdentifier(str(u)) for u in inputs.get("uris") or []]
    return names


def _usage_extensions(uses: Any, what: str) -> list[tuple[x509.ExtensionType, bool]]:
    flags = dict.fromkeys(_KEY_USAGES.values(), False)
    extended: list[ObjectIdentifier] = []
    for use in uses or []:
        if use in _KEY_USAGES:
            flags[_KEY_USAGES[use]] = True
        elif use in _EXTENDED_KEY_USAGES:
            if _EXTENDED_KEY_USAGES[use] not in extended:
                extended.append(_EXTENDED_KEY_USAGES[use])
        else:
            allowed = sorted([*_KEY_USAGES, *_EXTENDED_KEY_USAGES])
            raise ValueError(f"{what}: unknown allowedUses value {use!r}; expected one of {allowed}")
    extensions: list[tuple[x509.ExtensionType, bool]] = []
    if any(flags.values()):
        extensions.append((x509.KeyUsage(**flags), True))
    if extended:
        extensions.append((x509.ExtendedKeyUsage(extended), False))
    return extensions


def _serial(identity: str) -> int:
    digest = hashlib.sha256(f"serial\0{identity}".encode()).digest()
    return (int.from_bytes(digest[:16], "big") >> 1) or 1


def _sign(builder: Any, key: PrivateKey) -> Any:
    # Go's crypto/x509 picks the hash from the key: SHA-256 for RSA, by curve size for ECDSA.
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    if isinstance(key, rsa.RSAPrivateKey):
        return builder.sign(key, hashes.SHA256())
    digest: hashes.HashAlgorithm
    if key.curve.key_size <= 256:
        digest = hashes.SHA256()
    elif key.curve.key_size <= 384:
        digest = hashes.SHA384()
    else:
        digest = hashes.SHA512()
    # RFC 6979 signatures keep certificates byte-identical across evaluations.
    return builder.sign(key, digest, ecdsa_deterministic=True)


def _certificate(
    identity: str,
    inputs: Mapping[str, Any],
    *,
    subject: x509.Name,
    public_key: PublicKey,
    san: list[x509.GeneralName],
    issuer: x509.Name,
    issuer_key: PrivateKey,
    authority_key_id: x509.AuthorityKeyIdentifier | None,
    what: str,
) -> dict[str, Any]:
    hours = int(require(inputs, "validityPeriodHours", what))
    not_after = NOT_BEFORE + dt.timedelta(hours=hours)
    is_ca = bool(inputs.get("isCaCertificate"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(_serial(identity))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
    )
    for extension, critical in _usage_extensions(inputs.get("allowedUses"), what):
        builder = builder.add_extension(extension, critical=critical)
    # The provider always marks basic constraints valid, so leaves carry CA:FALSE.
    max_path = int(inputs.get("maxPathLength") or 0)
    path_length = max_path if is_ca and max_path > 0 else None
    builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
    if is_ca or inputs.get("setSubjectKeyId"):
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    if authority_key_id is not None:
        builder = builder.add_extension(authority_key_id, critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = _sign(builder, issuer_key)
    return {
        "certPem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "validityStartTime": _rfc3339(NOT_BEFORE),
        "validityEndTime": _rfc3339(not_after),
        "readyForRenewal": False,
    }


def self_signed_cert_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    what = f"SelfSignedCert {identity}"
    key = _load_private_key(_key_pem(inputs, "privateKeyPem", what), what)
    public = key.public_key()
    subject = _subject(inputs.get("subject"))
    authority_key_id = None
    if inputs.get("setAuthorityKeyId"):
        authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            x509.SubjectKeyIdentifier.from_public_key(public)
        )
    outputs = _certificate(
        identity,
        inputs,
        subject=subject,
        public_key=public,
        san=_general_names(inputs),
        issuer=subject,
        issuer_key=key,
        authority_key_id=authority_key_id,
        what=what,
    )
    outputs["keyAlgorithm"] = key_algorithm(key)
    return outputs


def cert_request_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    what = f"CertRequest {identity}"
    key = _load_private_key(_key_pem(inputs, "privateKeyPem", what), what)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(inputs.get("subject")))
    san = _general_names(inputs)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    csr = _sign(builder, key)
    return {
        "certRequestPem": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "keyAlgorithm": key_algorithm(key),
    }


def locally_signed_cert_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    what = f"LocallySignedCert {identity}"
    csr = x509.load_pem_x509_csr(str(require(inputs, "certRequestPem", what)).encode())
    if not csr.is_signature_valid:
        raise ValueError(f"{what}: certRequestPem has an invalid signature")
    ca_cert = x509.load_pem_x509_certificate(str(require(inputs, "caCertPem", what)).encode())
    ca_key = _load_private_key(_key_pem(inputs, "caPrivateKeyPem", what), what)
    public = csr.public_key()
    if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise ValueError(f"{what}: unsupported public key type {type(public).__name__}")
    try:
        san = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        san = []
    # Like Go's x509.CreateCertificate: the AKI names the CA's subject key id, if it has one.
    authority_key_id = None
    if csr.subject != ca_cert.subject:
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            ca_ski = None
        if ca_ski is not None:
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    outputs = _certificate(
        identity,
        inputs,
        subject=csr.subject,
        public_key=public,
        san=san,
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        authority_key_id=authority_key_id,
        what=what,
    )
    outputs["caKeyAlgorithm"] = key_algorithm(ca_key)
    return outputs
