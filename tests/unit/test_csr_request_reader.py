"""The node program's PKCS#10 reader (render/csr_node_program.py) against `cryptography`'s, and its refusals.

The approver reads a CSR's subject and SANs from its DER with the standard library (python3 on the node has no
x509 parser, and openssl's text is ambiguous). Here: on every well-formed request the reader sees exactly what
`cryptography` sees; a request shaped in any way kubelet's is not is refused rather than misread.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from render.csr_approval import PROGRAM
from render.csr_node_program import Refused, parse_request, pem_request

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def request(subject: x509.Name, names: list[x509.GeneralName], *, key: object = EC_KEY) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


NAMES = [
    [],
    [x509.DNSName("dev-worker-1")],
    [x509.DNSName("dev-worker-1"), x509.IPAddress(ipaddress.ip_address("10.17.3.51"))],
    [x509.IPAddress(ipaddress.ip_address("fd00::51")), x509.DNSName("a.b.c"), x509.DNSName("x" * 200)],
    [x509.DNSName(f"n{i}") for i in range(40)],  # long SAN list: multi-byte DER lengths
]
SUBJECTS = [
    x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
               x509.NameAttribute(NameOID.COMMON_NAME, "system:node:dev-worker-1")]),
    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "système:nœud")]),  # UTF8String
    x509.Name([]),
]  # fmt: skip


@pytest.mark.parametrize(("subject", "names", "key"), list(itertools.product(SUBJECTS, NAMES, [EC_KEY, RSA_KEY])))
def test_the_reader_sees_what_cryptography_sees(subject: x509.Name, names: list[x509.GeneralName], key: object) -> None:
    der = request(subject, names, key=key)
    seen = x509.load_der_x509_csr(der)
    parsed = parse_request(der)
    short = {NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O"}
    assert parsed.subject == tuple((short[a.oid], str(a.value)) for a in seen.subject)
    assert list(parsed.dns) == [n.value for n in names if isinstance(n, x509.DNSName)]
    assert list(parsed.ips) == [str(n.value) for n in names if isinstance(n, x509.IPAddress)]


def test_pem_is_one_block_of_base64() -> None:
    pem = x509.load_der_x509_csr(request(SUBJECTS[0], NAMES[2])).public_bytes(serialization.Encoding.PEM)
    assert parse_request(pem_request(base64.b64encode(pem).decode())).dns == ("dev-worker-1",)
    for bad in (b"junk\n" + pem, pem + b"junk", pem.replace(b"REQUEST", b"REQUESTS"), b"", pem[:-40] + pem[-39:]):
        with pytest.raises(Refused):
            parse_request(pem_request(base64.b64encode(bad).decode()))
    with pytest.raises(Refused):
        pem_request("not base64!")


def _tlv(tag: int, content: bytes) -> bytes:
    assert len(content) < 0x80
    return bytes([tag, len(content)]) + content


@pytest.mark.parametrize(
    ("der", "why"),
    [
        (b"", "cut short"),
        (b"\x30\x80\x00\x00", "indefinite"),
        (b"\x30\x81\x05" + b"\x00" * 5, "non-minimal length"),
        (b"\x30\x05\x02\x01\x00", "cut short"),
        (_tlv(0x30, b"") + b"\x00", "not one DER SEQUENCE"),
        (b"\x3f\x01\x00", "multi-byte"),
        (_tlv(0x30, _tlv(0x30, b"") + _tlv(0x30, b"") + _tlv(0x03, b"")), "CertificationRequestInfo"),
    ],
)
def test_malformed_der_is_refused(der: bytes, why: str) -> None:
    with pytest.raises(Refused, match=why):
        parse_request(der)


def test_shapes_kubelet_never_sends_are_refused() -> None:
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "system:node:dev-worker-1")
    o = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes")
    multi_valued = x509.Name([x509.RelativeDistinguishedName([o, cn])])
    with pytest.raises(Refused, match="multi-valued RDN"):
        parse_request(request(multi_valued, NAMES[2]))
    other = x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    with pytest.raises(Refused, match="otherName"):
        parse_request(request(SUBJECTS[0], [*NAMES[2], other]))
    directory = x509.DirectoryName(SUBJECTS[0])
    with pytest.raises(Refused, match="directoryName"):
        parse_request(request(SUBJECTS[0], [directory]))
    bmp = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x", _type=x509.name._ASN1Type.BMPString)])
    with pytest.raises(Refused, match="not a valid UTF8String or PrintableString"):
        parse_request(request(bmp, NAMES[1]))


def test_the_embedded_program_is_this_module() -> None:
    """What the scripts run is the reader tested here, and python3 (the nodes' interpreter) compiles it."""
    import render.csr_node_program as module

    with open(module.__file__, encoding="utf-8") as source:
        assert source.read() == PROGRAM
    ran = subprocess.run(["python3", "-I", "-c", PROGRAM], capture_output=True, text=True, timeout=30, check=False)
    assert ran.returncode == 2 and "usage" in ran.stderr
