"""The kubelet-serving CSR check that python3 runs on a control plane: which pending CSRs may be approved.

This file is not imported by the program: render/csr_approval.py embeds its text in the approver scripts,
which run it as `python3 -I -c <this file> PLAN_JSON` with `kubectl get csr --output json` on stdin
(python3 is on every node: cloud-init needs it). It uses the standard library only, prints `NAME NODE` on
stdout for each CSR to approve, and one line on stderr for each kubelet-serving CSR it leaves pending (the
CSR, its requester, what it asks for and why it is refused). It approves and denies nothing itself; the
script approves what it printed, and whatever is refused stays pending for an operator to decide.

PLAN_JSON maps each node the program planned to the names kubelet puts in its serving CSR:
`{"<hostname>": {"dns": [...], "ips": [...]}}` (render/csr_approval.py `serving_plan` says which).

The CSR is read from its DER here, not from openssl's text: OpenSSL 3.0 (Ubuntu 24.04's) `req` prints
extensions only through `-text` (its `req` has no `-ext`), and there a single dNSName
"n, IP Address:10.0.0.1" reads exactly like the DNS name n and the IP address 10.0.0.1. The reader is
strict DER and refuses every shape kubelet does not send (more than one attribute, extension or RDN value,
critical flags, other name types or string types), so a CSR it accepts holds exactly the subject and SANs
that kube-controller-manager's signer reads with Go's crypto/x509 and copies into the certificate.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

# k8s.io/api certificates/v1 types.go: KubeletServingSignerName, and the condition types.
KUBELET_SERVING_SIGNER = "kubernetes.io/kubelet-serving"
DECIDED = ("Approved", "Denied", "Failed")
NODE_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
# What kubelet asks for its serving certificate: k8s.io/kubernetes pkg/kubelet/certificate/kubelet.go
# `NewKubeletServerCertificateManager` uses client-go util/certificate/certificate_manager.go
# `DefaultKubeletServingGetUsages`, which adds "key encipherment" only for an RSA key; kubelet sets no
# `GenerateKey`, so the manager's key is always ECDSA P-256 (`generateKeyFuncImpl`).
KUBELET_SERVING_USAGES = ("digital signature", "server auth")

OID_COMMON_NAME = "2.5.4.3"
OID_ORGANIZATION = "2.5.4.10"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
_ATTRIBUTE_NAMES = {OID_COMMON_NAME: "CN", OID_ORGANIZATION: "O"}

_SEQUENCE, _SET, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x30, 0x31, 0x02, 0x03, 0x04, 0x06
_UTF8_STRING, _PRINTABLE_STRING = 0x0C, 0x13
_ATTRIBUTES = 0xA0  # [0] IMPLICIT SET OF Attribute (constructed)
# GeneralName (RFC 5280 4.2.1.6), context-specific tags as they appear in DER.
_DNS_NAME, _IP_ADDRESS = 0x82, 0x87
_GENERAL_NAME_KINDS = {0xA0: "otherName", 0x81: "email", 0xA3: "x400Address", 0xA4: "directoryName"}
_GENERAL_NAME_KINDS |= {0xA5: "ediPartyName", 0x86: "URI", 0x88: "registeredID"}
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*\Z")
# A CSR's name is a DNS subdomain (the API server validates it); checked again before it reaches the shell.
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
_PEM = re.compile(
    r"-----BEGIN CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE REQUEST-----\r?\n?\Z"
)


class Refused(Exception):
    """The CSR is not one this program approves; the message says why."""


@dataclass(frozen=True)
class Request:
    """What a CSR asks for: its subject's attributes (short name, value) and its SANs."""

    subject: tuple[tuple[str, str], ...]
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    extensions: tuple[str, ...] = field(default=())


# --- strict DER --------------------------------------------------------------------------------------------


def _element(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, content, next offset) of the DER element at `offset`: single-byte tags and minimal definite lengths."""
    if offset + 2 > len(data):
        raise Refused("the request is cut short")
    tag, length = data[offset], data[offset + 1]
    if tag & 0x1F == 0x1F:
        raise Refused("the request uses a multi-byte ASN.1 tag")
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise Refused("the request has an indefinite or oversized ASN.1 length")
        length = int.from_bytes(data[start : start + count], "big")
        if data[start] == 0 or length < 0x80:
            raise Refused("the request is not DER (non-minimal length)")
        start += count
    end = start + length
    if end > len(data):
        raise Refused("the request is cut short")
    return tag, data[start:end], end


def _children(content: bytes) -> list[tuple[int, bytes]]:
    found, offset = [], 0
    while offset < len(content):
        tag, value, offset = _element(content, offset)
        found.append((tag, value))
    return found


def _expect(element: tuple[int, bytes], tag: int, what: str) -> bytes:
    if element[0] != tag:
        raise Refused(f"{what}: ASN.1 tag {element[0]:#04x}, expected {tag:#04x}")
    return element[1]


def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise Refused("the request holds a malformed object identifier")
    arcs, value, fresh = [], 0, True
    for byte in content:
        if fresh and byte == 0x80:
            raise Refused("the request holds a non-minimal object identifier")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))


def _text(tag: int, content: bytes) -> str:
    try:
        if tag == _UTF8_STRING:
            return content.decode("utf-8")
        if tag == _PRINTABLE_STRING and _PRINTABLE.match(content.decode("ascii")):
            return content.decode("ascii")
    except UnicodeDecodeError:
        pass
    raise Refused(f"the subject holds a value that is not a valid UTF8String or PrintableString (tag {tag:#04x})")


def _subject(content: bytes) -> tuple[tuple[str, str], ...]:
    attributes = []
    for rdn in _children(content):
        values = _children(_expect(rdn, _SET, "subject"))
        if len(values) != 1:
            raise Refused("the subject has a multi-valued RDN")
        pair = _children(_expect(values[0], _SEQUENCE, "subject"))
        if len(pair) != 2:
            raise Refused("the subject has a malformed attribute")
        oid = _oid(_expect(pair[0], _OID, "subject"))
        attributes.append((_ATTRIBUTE_NAMES.get(oid, oid), _text(*pair[1])))
    return tuple(attributes)


def _alt_names(content: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    dns, ips = [], []
    for tag, value in _children(content):
        if tag == _DNS_NAME:
            try:
                dns.append(value.decode("ascii"))
            except UnicodeDecodeError:
                raise Refused("a DNS name is not IA5 text") from None
        elif tag == _IP_ADDRESS:
            if len(value) not in (4, 16):
                raise Refused(f"an IP address SAN is {len(value)} bytes long")
            ips.append(str(ipaddress.ip_address(value)))
        else:
            raise Refused(f"it asks for a {_GENERAL_NAME_KINDS.get(tag, f'tag {tag:#04x}')} SAN")
    return tuple(dns), tuple(ips)


def parse_request(der: bytes) -> Request:
    """The subject and SANs of a PKCS#10 request (RFC 2986) shaped as Go's x509.CreateCertificateRequest makes it."""
    tag, content, end = _element(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise Refused("the request is not one DER SEQUENCE")
    outer = _children(content)
    if len(outer) != 3 or [outer[1][0], outer[2][0]] != [_SEQUENCE, _BIT_STRING]:
        raise Refused("the request is not a CertificationRequest")
    info = _children(_expect(outer[0], _SEQUENCE, "certificationRequestInfo"))
    if len(info) != 4 or _expect(info[0], _INTEGER, "version") != b"\x00":
        raise Refused("the request is not a version 1 CertificationRequestInfo with attributes")
    subject = _subject(_expect(info[1], _SEQUENCE, "subject"))
    _expect(info[2], _SEQUENCE, "subjectPublicKeyInfo")
    attributes = _children(_expect(info[3], _ATTRIBUTES, "attributes"))
    if not attributes:
        return Request(subject, (), ())
    if len(attributes) != 1:
        raise Refused("the request has more than one attribute")
    attribute = _children(_expect(attributes[0], _SEQUENCE, "attribute"))
    if len(attribute) != 2 or _oid(_expect(attribute[0], _OID, "attribute")) != OID_EXTENSION_REQUEST:
        raise Refused("the request's attribute is not one extensionRequest")
    values = _children(_expect(attribute[1], _SET, "extensionRequest"))
    if len(values) != 1:
        raise Refused("the extensionRequest attribute does not hold exactly one value")
    extensions: list[str] = []
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    for extension in _children(_expect(values[0], _SEQUENCE, "extensions")):
        parts = _children(_expect(extension, _SEQUENCE, "extension"))
        if len(parts) != 2:
            raise Refused("an extension is marked critical (kubelet marks none)")
        oid = _oid(_expect(parts[0], _OID, "extension"))
        extensions.append(oid)
        if oid == OID_SUBJECT_ALT_NAME:
            tag, names, end = _element(_expect(parts[1], _OCTET_STRING, "extension value"), 0)
            if tag != _SEQUENCE or end != len(parts[1][1]):
                raise Refused("the subjectAltName extension is not one GeneralNames")
            dns, ips = _alt_names(names)
    return Request(subject, dns, ips, tuple(extensions))


def pem_request(encoded: str) -> bytes:
    """The DER of `spec.request` (base64 of one PEM CERTIFICATE REQUEST block and nothing else)."""
    try:
        text = base64.b64decode(encoded, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Refused("spec.request is not base64 of PEM text") from None
    match = _PEM.match(text)
    if match is None:
        raise Refused("spec.request is not exactly one PEM CERTIFICATE REQUEST block")
    try:
        return base64.b64decode(re.sub(r"\s", "", match.group(1)), validate=True)
    except (binascii.Error, ValueError):
        raise Refused("the PEM block is not base64") from None


# --- the decision ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    name: str
    requester: str
    node: str | None  # set when the CSR is approved
    problems: tuple[str, ...]
    asked: str


def _listed(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def _differences(what: str, asked: tuple[str, ...], planned: list[str], node: str) -> list[str]:
    if sorted(asked) == sorted(planned):
        return []
    extra = [value for value in asked if value not in planned]
    missing = [value for value in planned if value not in asked]
    repeated = sorted({value for value in asked if asked.count(value) > 1})
    found = (("not planned", extra), ("missing", missing), ("repeated", repeated))
    return [f"{what} for {node}: " + "; ".join(f"{label} {_listed(values)}" for label, values in found if values)]


def decide(csr: dict[str, Any], plan: dict[str, dict[str, list[str]]]) -> Decision | None:
    """None for a CSR that is not ours to look at (another signer, or already decided); else the decision."""
    spec, status = csr.get("spec") or {}, csr.get("status") or {}
    if spec.get("signerName") != KUBELET_SERVING_SIGNER:
        return None
    if any(condition.get("type") in DECIDED for condition in status.get("conditions") or []):
        return None
    name = str((csr.get("metadata") or {}).get("name", ""))
    requester = str(spec.get("username", ""))
    problems: list[str] = []
    if not _OBJECT_NAME.match(name):
        problems.append("its name is not a Kubernetes object name")
    node = requester.removeprefix(NODE_PREFIX) if requester.startswith(NODE_PREFIX) else None
    if node is None:
        problems.append("the requester is not a node (system:node:<name>)")
    elif node not in plan:
        problems.append(f"node {json.dumps(node)} is not one the program planned")
    if NODES_GROUP not in (spec.get("groups") or []):
        problems.append(f"the requester is not in the group {NODES_GROUP}")
    usages = [str(usage) for usage in spec.get("usages") or []]
    if sorted(usages) != sorted(KUBELET_SERVING_USAGES):
        problems.append(f"usages {_listed(usages)}, kubelet asks {_listed(list(KUBELET_SERVING_USAGES))}")
    asked = "a request that cannot be read"
    try:
        request = parse_request(pem_request(str(spec.get("request", ""))))
    except Refused as refused:
        problems.append(str(refused))
    else:
        subject = ", ".join(f"{key}={json.dumps(value)}" for key, value in request.subject)
        asked = f"{subject or 'an empty subject'}, DNS {_listed(request.dns)}, IP {_listed(request.ips)}"
        wanted = (("CN", f"{NODE_PREFIX}{node}"), ("O", NODES_GROUP))
        if node is not None and sorted(request.subject) != sorted(wanted):
            problems.append(f"the subject is not exactly CN={NODE_PREFIX}{node}, O={NODES_GROUP}")
        if set(request.extensions) - {OID_SUBJECT_ALT_NAME}:
            others = sorted(set(request.extensions) - {OID_SUBJECT_ALT_NAME})
            problems.append(f"it asks for extensions kubelet does not ({', '.join(others)})")
        if request.extensions.count(OID_SUBJECT_ALT_NAME) > 1:
            problems.append("it has more than one subjectAltName extension")
        if node is not None and node in plan:
            problems += _differences("DNS names", request.dns, plan[node]["dns"], node)
            problems += _differences("IP addresses", request.ips, plan[node]["ips"], node)
    return Decision(name, requester, None if problems else node, tuple(problems), asked)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: csr_node_program PLAN_JSON < csr-list.json", file=sys.stderr)
        return 2
    plan = json.loads(argv[1])
    listed = json.load(sys.stdin)
    # `kubectl get ... --output json` prints a list as a v1 "List" of the objects, each with its kind
    # (k8s.io/kubectl pkg/cmd/get/get.go).
    kind, items = (listed.get("kind"), listed.get("items")) if isinstance(listed, dict) else (None, None)
    if kind != "List" or not isinstance(items, list):
        print("kubeadm-ha: what kubectl listed is not a list of CertificateSigningRequests", file=sys.stderr)
        return 2
    if any(not isinstance(csr, dict) or csr.get("kind") != "CertificateSigningRequest" for csr in items):
        print("kubeadm-ha: what kubectl listed holds objects that are not CertificateSigningRequests", file=sys.stderr)
        return 2
    for csr in items:
        decision = decide(csr, plan)
        if decision is None:
            continue
        if decision.node is not None:
            print(decision.name, decision.node)
            continue
        print(
            f"kubeadm-ha: left pending for an operator: kubelet-serving CSR {json.dumps(decision.name)}"
            f" requested by {json.dumps(decision.requester)} asks for {decision.asked}: "
            + "; ".join(decision.problems),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
