"""Offline runtime for the kubeadm-ha Pulumi program.

Evaluates ``__main__.py`` for a stack under Pulumi's mock runtime (no CLI, no
provider plugins) and returns everything the program registered, so tests and
the offline ``plan`` command can assert on resources, their inputs, their
dependency graph and the stack outputs.

The mocks behave like the real providers where the program can observe it:
TLS resources return real, verifiable keys and certificates (deterministic, so
two evaluations are byte-identical), and ``preview=True`` reproduces a first
``pulumi preview`` of a new stack, in which computed outputs are unknown.

Typical use::

    from tools.offline import evaluate

    ev = evaluate("dev")
    ca = ev.named("cluster-ca")
    assert ev.depends_on("kubeadm-init", ca)
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import contextvars
import datetime as dt
import hashlib
import importlib
import ipaddress
import json
import logging
import math
import os
import random
import runpy
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import pulumi
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from google.protobuf import struct_pb2
from pulumi._utils import ContextProperty
from pulumi.runtime import config as runtime_config
from pulumi.runtime import known_types, rpc
from pulumi.runtime import settings as runtime_settings
from pulumi.runtime.mocks import MockCallArgs, MockEngine, MockMonitor, MockResourceArgs
from pulumi.runtime.stack import run_in_stack

__all__ = [
    "DEFAULT_PROJECT",
    "NOT_BEFORE",
    "REPO_ROOT",
    "STACK_TYPE",
    "UNKNOWN",
    "Evaluation",
    "LogMessage",
    "OfflineMocks",
    "OutputValue",
    "Read",
    "RecordingMonitor",
    "Registration",
    "ResourceRef",
    "StackOutputs",
    "engine_config",
    "evaluate",
    "evaluation_of_failure",
    "load_stack_config",
    "project_name",
    "stacks_as_their_files_say",
]

_LOG = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_PROJECT: Final = "kubeadm-ha"
STACK_TYPE: Final = "pulumi:pulumi:Stack"
STACK_REFERENCE_TYPE: Final = "pulumi:pulumi:StackReference"

# Wire-format markers, as defined by the Pulumi engine (sdk/go/common/resource/properties.go).
_SIG_KEY: Final = "4dabf18193072939515e22adb298388d"
_SECRET_SIG: Final = "1b47061264138c4ac30d75fd1eb44270"
_OUTPUT_VALUE_SIG: Final = "d0e6a833031e9bbcd3f4e8bde6ca49a4"
_UNKNOWN_WIRE: Final = rpc.UNKNOWN


class _Unknown:
    """Type of :data:`UNKNOWN`; a singleton so ``is`` comparisons are reliable."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
"""Stands for a value that is not known yet (only ever seen in preview)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Registration:
    """One ``RegisterResource`` call, as the engine would have received it."""

    urn: str
    type: str
    name: str
    parent: str | None
    custom: bool
    id: str | None
    inputs: dict[str, Any]
    """Inputs with secrets unwrapped to plain values; unknown values are :data:`UNKNOWN`."""
    outputs: dict[str, Any]
    """The state the mock returned, decoded the same way as ``inputs``."""
    secret_inputs: frozenset[str]
    """Top-level input names whose value is, or contains, a Pulumi secret."""
    dependencies: tuple[str, ...]
    property_dependencies: dict[str, tuple[str, ...]]
    additional_secret_outputs: tuple[str, ...]
    delete_before_replace: bool
    deleted_with: str | None
    replace_on_changes: tuple[str, ...]
    ignore_changes: tuple[str, ...]
    protect: bool
    retain_on_delete: bool
    provider: str | None
    """Provider reference (``<provider urn>::<provider id>``), if one was set explicitly."""


@dataclass(frozen=True)
class OutputValue:
    """A stack output. ``value`` holds :data:`UNKNOWN` wherever ``known`` is false."""

    value: Any
    secret: bool
    known: bool


@dataclass(frozen=True)
class LogMessage:
    """A message logged through ``pulumi.log`` (info and above; debug is SDK chatter)."""

    severity: str
    message: str
    urn: str | None


@dataclass(frozen=True)
class Read:
    """One ``ReadResource`` call (a ``pulumi.StackReference``, say): read, not registered."""

    urn: str
    type: str
    name: str
    id: str | None
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    registered_before: int
    """How many resources (the root stack included) had been registered when the read was made."""


ResourceRef = Registration | str


@dataclass
class Evaluation:
    """Everything one evaluation of the program registered."""

    stack: str
    preview: bool
    resources: list[Registration]
    """In registration order; the first entry is the root ``pulumi:pulumi:Stack``."""
    outputs: dict[str, OutputValue]
    config: dict[str, str] = field(default_factory=dict)
    """The configuration as handed to the program (engine encoding: strings/JSON)."""
    logs: list[LogMessage] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    """Resources the program read rather than registered (``pulumi.StackReference``), in order."""

    @property
    def stack_urn(self) -> str:
        return self.by_type(STACK_TYPE)[0].urn

    def by_type(self, type_: str) -> list[Registration]:
        return [r for r in self.resources if r.type == type_]

    def by_urn(self, urn: str) -> Registration:
        for registration in self.resources:
            if registration.urn == urn:
                return registration
        raise LookupError(f"no resource with URN {urn!r}")

    def named(self, name: str) -> Registration:
        """The only resource called ``name`` (any type); an error if there are none or several."""
        matches = [r for r in self.resources if r.name == name]
        if len(matches) != 1:
            found = ", ".join(r.urn for r in matches) or "none"
            raise LookupError(f"expected exactly one resource named {name!r}, found {found}")
        return matches[0]

    def children(self, urn: ResourceRef) -> list[Registration]:
        """Direct children of a resource, in registration order."""
        parent = self._urn(urn)
        return [r for r in self.resources if r.parent == parent]

    def descendants(self, urn: ResourceRef) -> list[Registration]:
        found: list[Registration] = []
        pending = [self._urn(urn)]
        while pending:
            children = self.children(pending.pop())
            found.extend(children)
            pending.extend(child.urn for child in children)
        return found

    def depends_on(self, later: ResourceRef, earlier: ResourceRef) -> bool:
        """Whether ``later`` (transitively) waits for ``earlier`` through its dependencies.

        Resources may be given as registrations, URNs or unique names. The SDK never
        sends a dependency on a local component: it replaces it by the component's
        custom descendants. So a dependency on a component is satisfied when every one
        of its custom descendants is reachable.
        """
        source = self._urn(later)
        target = self.by_urn(self._urn(earlier))
        if target.custom or target.type == STACK_TYPE:
            targets = {target.urn}
        else:
            targets = {r.urn for r in self.descendants(target) if r.custom}
            if not targets:
                return False
        reachable = self._reachable(source)
        return targets <= reachable

    def dot(self) -> str:
        """A Graphviz DOT graph of the custom resources; arrows point from a
        dependency to the resource that waits for it (creation order)."""
        custom = [r for r in self.resources if r.custom]
        known = {r.urn for r in custom}
        lines = [f"digraph {_dot_quote(self.stack)} {{", "  rankdir=LR;", "  node [shape=box];"]
        for registration in custom:
            label = f"{_dot_escape(registration.name)}\\n{_dot_escape(registration.type)}"
            lines.append(f'  {_dot_quote(registration.urn)} [label="{label}"];')
        for registration in custom:
            for dependency in dict.fromkeys(registration.dependencies):
                if dependency in known:
                    lines.append(f"  {_dot_quote(dependency)} -> {_dot_quote(registration.urn)};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _urn(self, ref: ResourceRef) -> str:
        if isinstance(ref, Registration):
            return ref.urn
        if ref.startswith("urn:pulumi:"):
            return ref
        return self.named(ref).urn

    def _reachable(self, start: str) -> set[str]:
        by_urn = {r.urn: r for r in self.resources}
        seen: set[str] = set()
        pending = list(by_urn[start].dependencies) if start in by_urn else []
        while pending:
            urn = pending.pop()
            if urn in seen:
                continue
            seen.add(urn)
            if urn in by_urn:
                pending.extend(by_urn[urn].dependencies)
        return seen


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_quote(text: str) -> str:
    return f'"{_dot_escape(text)}"'


# --------------------------------------------------------------------------- wire decoding


def _decode(value: Any) -> tuple[Any, bool, bool]:
    """Decode a protobuf property value into plain Python.

    Returns ``(value, contains_secret, contains_unknown)``. Decoding the raw
    struct (instead of ``rpc.deserialize_properties``) keeps the secret and
    unknown markers observable and never instantiates resource references.
    """
    if isinstance(value, struct_pb2.Struct):
        if _SIG_KEY in value.fields:
            signature = value[_SIG_KEY]
            if signature == _SECRET_SIG:
                if "value" not in value.fields:
                    return UNKNOWN, True, True
                inner, _, unknown = _decode(value["value"])
                return inner, True, unknown
            if signature == _OUTPUT_VALUE_SIG:
                secret = "secret" in value.fields and bool(value["secret"])
                if "value" not in value.fields:
                    return UNKNOWN, secret, True
                inner, inner_secret, unknown = _decode(value["value"])
                return inner, secret or inner_secret, unknown
        result: dict[str, Any] = {}
        any_secret = any_unknown = False
        for key, item in value.items():
            decoded, secret, unknown = _decode(item)
            any_secret |= secret
            any_unknown |= unknown
            # Mirror the SDK, which treats a null property as an absent one.
            if decoded is not None:
                result[key] = decoded
        return result, any_secret, any_unknown
    if isinstance(value, struct_pb2.ListValue):
        items: list[Any] = []
        any_secret = any_unknown = False
        for item in value:
            decoded, secret, unknown = _decode(item)
            any_secret |= secret
            any_unknown |= unknown
            items.append(decoded)
        return items, any_secret, any_unknown
    if isinstance(value, str) and value == _UNKNOWN_WIRE:
        return UNKNOWN, False, True
    return _number(value), False, False


def _number(value: Any) -> Any:
    # Protobuf carries every number as a double; integers read better as ints.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _decode_struct(struct: struct_pb2.Struct) -> tuple[dict[str, Any], frozenset[str]]:
    values: dict[str, Any] = {}
    secrets: set[str] = set()
    for key, item in struct.items():
        decoded, secret, _ = _decode(item)
        if secret:
            secrets.add(key)
        if decoded is not None:
            values[key] = decoded
    return values, frozenset(secrets)


def _plain(value: Any) -> Any:
    """Unwrap SDK-side secrets and unknowns in mock inputs into plain values."""
    if rpc.is_rpc_secret(value):
        return _plain(value["value"])
    if known_types.is_unknown(value):
        return UNKNOWN
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return _number(value)


# --------------------------------------------------------------------------- monitor


# The URN being registered, so the mocks can derive per-resource material from it.
_CURRENT_URN: contextvars.ContextVar[str | None] = contextvars.ContextVar("offline_current_urn", default=None)


class RecordingMonitor(MockMonitor):
    """A mock resource monitor that records every registration and the stack outputs."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []
        self.stack_urn: str | None = None
        self.stack_outputs: dict[str, OutputValue] = {}
        self.reads: list[Read] = []
        self._lock = threading.Lock()

    def ReadResource(self, request: Any) -> Any:
        response = super().ReadResource(request)
        inputs, _ = _decode_struct(request.properties)
        outputs, _ = _decode_struct(response.properties)
        with self._lock:
            self.reads.append(
                Read(
                    urn=response.urn,
                    type=request.type,
                    name=request.name,
                    id=request.id or None,
                    inputs=inputs,
                    outputs=outputs,
                    registered_before=len(self.registrations),
                )
            )
        return response

    def RegisterResource(self, request: Any) -> Any:
        urn = self.make_urn(request.parent, request.type, request.name)
        token = _CURRENT_URN.set(urn)
        try:
            response = super().RegisterResource(request)
        finally:
            _CURRENT_URN.reset(token)
        inputs, secret_inputs = _decode_struct(request.object)
        outputs, _ = _decode_struct(response.object)
        registration = Registration(
            urn=response.urn,
            type=request.type,
            name=request.name,
            parent=request.parent or None,
            custom=bool(request.custom),
            id=response.id or None,
            inputs=inputs,
            outputs=outputs,
            secret_inputs=secret_inputs,
            # The SDK gathers dependencies concurrently, so their order carries no meaning: keep them sorted.
            dependencies=tuple(sorted(request.dependencies)),
            property_dependencies={
                key: tuple(sorted(deps.urns)) for key, deps in sorted(request.propertyDependencies.items())
            },
            additional_secret_outputs=tuple(request.additionalSecretOutputs),
            delete_before_replace=bool(request.deleteBeforeReplace),
            deleted_with=request.deletedWith or None,
            replace_on_changes=tuple(request.replaceOnChanges),
            ignore_changes=tuple(request.ignoreChanges),
            protect=bool(request.protect),
            retain_on_delete=bool(request.retainOnDelete),
            provider=request.provider or None,
        )
        with self._lock:
            if request.type == STACK_TYPE and not request.parent:
                self.stack_urn = response.urn
            self.registrations.append(registration)
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        if request.urn == self.stack_urn:
            outputs = {}
            for key, item in request.outputs.items():
                value, secret, unknown = _decode(item)
                outputs[key] = OutputValue(value=value, secret=secret, known=not unknown)
            with self._lock:
                self.stack_outputs = outputs
        return super().RegisterResourceOutputs(request)


class _RecordingEngine(MockEngine):
    """Keeps the program's log messages for the caller instead of printing them."""

    _SEVERITIES: Final = {0: "debug", 1: "info", 2: "warning", 3: "error"}

    def __init__(self) -> None:
        super().__init__(_LOG)
        self.messages: list[LogMessage] = []

    def Log(self, request: Any) -> None:
        severity = self._SEVERITIES.get(int(request.severity), str(request.severity))
        _LOG.debug("program %s: %s", severity, request.message)
        # Debug messages are the SDK's own chatter about RPCs; keep the signal only.
        if severity != "debug":
            self.messages.append(LogMessage(severity, request.message, request.urn or None))


# --------------------------------------------------------------------------- mocks

READ_STACK_OUTPUTS: Final = "pulumi:pulumi:readStackOutputs"

StackOutputs = Mapping[str, Any] | None | _Unknown
"""Another stack's outputs as the engine would read them: a mapping, None (no such stack) or UNKNOWN."""


def _stack_of(qualified: str) -> str:
    """`dev` for `organization/kubeadm-ha/dev` (and for `dev`)."""
    return qualified.rsplit("/", 1)[-1]


class OfflineMocks(pulumi.runtime.Mocks):
    """Provider stand-ins: real TLS material, echoed inputs for everything else.

    With ``preview=True`` every resource gets back exactly its inputs and no id,
    which the SDK resolves as unknown, as in a first preview of a new stack.
    Stack references are the exception, as with the engine, which reads them in
    preview too: they return the referenced stack's outputs from ``other_stacks``.
    """

    def __init__(
        self,
        *,
        preview: bool = False,
        previous_outputs: Mapping[str, Any] | None = None,
        stack: str | None = None,
        other_stacks: Callable[[str], StackOutputs] | None = None,
    ) -> None:
        self.preview = preview
        # What the engine's `pulumi:pulumi:readStackOutputs` returns: the stack's last deployed outputs.
        self.previous_outputs = dict(previous_outputs or {})
        # The stack being evaluated; readStackOutputs for any other name asks `other_stacks`.
        self.stack = stack
        self.other_stacks = other_stacks or (lambda _name: None)

    def _other_stack(self, qualified: str) -> StackOutputs:
        found = self.other_stacks(_stack_of(qualified))
        if found is None:
            # The engine's words for a stack reference to a missing stack.
            raise Exception(f"unknown stack {qualified!r}")
        return found

    def _stack_reference(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        name = str(args.inputs.get("name") or args.resource_id)
        outputs = self._other_stack(name)
        if outputs is UNKNOWN:
            # The wire form of an unknown value: the SDK resolves it as unknown, in preview and update alike.
            return name, {"name": name, "outputs": _UNKNOWN_WIRE, "secretOutputNames": _UNKNOWN_WIRE}
        assert isinstance(outputs, Mapping)
        return name, {"name": name, "outputs": dict(outputs), "secretOutputNames": []}

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        if args.typ == STACK_REFERENCE_TYPE:
            return self._stack_reference(args)
        # Returning the inputs keeps their secret and unknown markers on the outputs,
        # which is what the engine does for input-derived properties.
        state = dict(args.inputs)
        if self.preview or args.custom is False:
            return None, state
        identity = _CURRENT_URN.get() or f"{args.typ}::{args.name}"
        compute = _COMPUTED_OUTPUTS.get(args.typ)
        if compute is not None:
            state.update(compute(identity, _plain(args.inputs)))
        # Reads and imports name an existing resource; keep its id.
        return args.resource_id or f"{args.name}-id", state

    def call(self, args: MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        if args.token == READ_STACK_OUTPUTS:
            name = str(args.args.get("name") or "")
            if self.stack is None or _stack_of(name) == self.stack:
                outputs: Mapping[str, Any] = self.previous_outputs
            else:
                found = self.other_stacks(_stack_of(name))
                if found is None:
                    # As the engine does: an invoke error raised into the program, not an RPC failure.
                    return {}, [("name", f"unknown stack {name!r}")]
                outputs = found if isinstance(found, Mapping) else {}
            return {"name": name, "outputs": dict(outputs), "secretOutputNames": []}, []
        return {}, []


# --------------------------------------------------------------------------- TLS material

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {
    "P224": ec.SECP224R1,
    "P256": ec.SECP256R1,
    "P384": ec.SECP384R1,
    "P521": ec.SECP521R1,
}

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


def _seed(identity: str, *parts: object) -> bytes:
    material = "\0".join([identity, *(str(part) for part in parts)])
    return hashlib.sha256(material.encode()).digest()


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _require(inputs: Mapping[str, Any], key: str, what: str) -> Any:
    value = inputs.get(key)
    if value is None or value is UNKNOWN:
        raise ValueError(f"{what}: required input {key!r} is missing or unknown")
    return value


def _key_algorithm(key: _PrivateKey | _PublicKey) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RSA"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ECDSA"
    return "ED25519"


# --- deterministic key generation


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\0\0"
    for n in range(2, math.isqrt(limit) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(range(n * n, limit, n)))
    return [n for n in range(limit) if sieve[n]]


_SMALL_PRIMES: Final = _small_primes(2000)
_SMALL_PRIMES_PRODUCT: Final = math.prod(_SMALL_PRIMES)
_RSA_EXPONENT: Final = 65537
_MILLER_RABIN_ROUNDS: Final = 24
_RSA_CACHE: dict[tuple[bytes, int], rsa.RSAPrivateKey] = {}
_RSA_CACHE_LOCK = threading.Lock()


def _is_probable_prime(candidate: int, rng: random.Random) -> bool:
    if candidate < 2:
        return False
    for prime in _SMALL_PRIMES:
        if candidate % prime == 0:
            return candidate == prime
    d, s = candidate - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(_MILLER_RABIN_ROUNDS):
        # Only getrandbits(): its output is stable across Python versions.
        base = 2 + rng.getrandbits(candidate.bit_length()) % (candidate - 3)
        x = pow(base, d, candidate)
        if x in (1, candidate - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, candidate)
            if x == candidate - 1:
                break
        else:
            return False
    return True


def _random_prime(rng: random.Random, bits: int) -> int:
    while True:
        # The two top bits make the product of two such primes exactly 2*bits long.
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if math.gcd(candidate, _SMALL_PRIMES_PRODUCT) != 1:
            continue
        if candidate % _RSA_EXPONENT == 1:
            continue
        if _is_probable_prime(candidate, rng):
            return candidate


def _rsa_key(seed: bytes, bits: int) -> rsa.RSAPrivateKey:
    """An RSA key derived from ``seed``; cryptography offers no seeded RSA generation."""
    if bits < 512:
        raise ValueError(f"rsaBits must be at least 512, got {bits}")
    with _RSA_CACHE_LOCK:
        cached = _RSA_CACHE.get((seed, bits))
    if cached is not None:
        return cached
    rng = random.Random(seed)
    while True:
        p = _random_prime(rng, bits - bits // 2)
        q = _random_prime(rng, bits // 2)
        if p != q and (p * q).bit_length() == bits:
            break
    e = _RSA_EXPONENT
    d = pow(e, -1, math.lcm(p - 1, q - 1))
    key = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    ).private_key()
    with _RSA_CACHE_LOCK:
        _RSA_CACHE[(seed, bits)] = key
    return key


def _ec_key(seed: bytes, curve_name: str) -> ec.EllipticCurvePrivateKey:
    curve_type = _CURVES.get(curve_name)
    if curve_type is None:
        raise ValueError(f"unsupported ecdsaCurve {curve_name!r}; expected one of {sorted(_CURVES)}")
    curve = curve_type()
    # A scalar below 2**(size-1) is always below the group order of the NIST curves.
    limit = 2 ** (curve.key_size - 1)
    material = hashlib.shake_256(seed).digest(curve.key_size // 8 + 16)
    scalar = int.from_bytes(material, "big") % (limit - 1) + 1
    return ec.derive_private_key(scalar, curve)


def _generate_key(identity: str, inputs: Mapping[str, Any]) -> _PrivateKey:
    algorithm = str(_require(inputs, "algorithm", f"PrivateKey {identity}"))
    if algorithm == "RSA":
        bits = int(inputs.get("rsaBits") or 2048)
        return _rsa_key(_seed(identity, "RSA", bits), bits)
    if algorithm == "ECDSA":
        curve = str(inputs.get("ecdsaCurve") or "P224")
        return _ec_key(_seed(identity, "ECDSA", curve), curve)
    if algorithm == "ED25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(identity, "ED25519"))
    raise ValueError(f"unsupported algorithm {algorithm!r}; expected RSA, ECDSA or ED25519")


# --- key serialisation, as terraform-provider-tls formats it


def _openssh_private_key(key: _PrivateKey, seed: bytes) -> str:
    try:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    except ValueError:
        return ""  # OpenSSH has no P-224; the provider leaves the field empty
    lines = pem.decode().strip().splitlines()
    blob = bytearray(base64.b64decode("".join(lines[1:-1])))
    # The format carries a random "checkint" pair; pin it so the output is reproducible.
    offset = len(b"openssh-key-v1\0")
    for _ in range(3):  # cipher name, KDF name, KDF options
        offset = _skip_ssh_string(blob, offset)
    offset += 4  # number of keys
    offset = _skip_ssh_string(blob, offset)  # public key
    offset += 4  # length of the private section
    checkint = hashlib.sha256(b"openssh-checkint\0" + seed).digest()[:4]
    blob[offset : offset + 8] = checkint + checkint
    return _pem("OPENSSH PRIVATE KEY", bytes(blob))


def _skip_ssh_string(blob: bytes | bytearray, offset: int) -> int:
    length = int.from_bytes(blob[offset : offset + 4], "big")
    return offset + 4 + length


def _pem(label: str, der: bytes) -> str:
    encoded = base64.b64encode(der).decode()
    body = "\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def _ssh_public_key(public: _PublicKey) -> tuple[str, str, str]:
    """``(authorized_keys line, MD5 fingerprint, SHA256 fingerprint)``, empty if unsupported."""
    try:
        line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except ValueError:
        return "", "", ""
    wire = base64.b64decode(line.split()[1])
    md5 = hashlib.md5(wire, usedforsecurity=False).digest()
    sha256 = base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")
    return line.decode() + "\n", ":".join(f"{b:02x}" for b in md5), f"SHA256:{sha256}"


def _private_key_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    key = _generate_key(identity, inputs)
    # PKCS#1 for RSA and SEC1 for ECDSA ("traditional"); ED25519 only has PKCS#8.
    traditional = (
        serialization.PrivateFormat.PKCS8
        if isinstance(key, ed25519.Ed25519PrivateKey)
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    none = serialization.NoEncryption()
    public = key.public_key()
    openssh, md5, sha256 = _ssh_public_key(public)
    outputs: dict[str, Any] = {
        "privateKeyPem": key.private_bytes(serialization.Encoding.PEM, traditional, none).decode(),
        "privateKeyPemPkcs8": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none
        ).decode(),
        "privateKeyOpenssh": _openssh_private_key(key, _seed(identity, "openssh")),
        "publicKeyPem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "publicKeyOpenssh": openssh,
        "publicKeyFingerprintMd5": md5,
        "publicKeyFingerprintSha256": sha256,
    }
    # The provider's schema defaults land in the state whatever the algorithm.
    outputs["rsaBits"] = int(inputs.get("rsaBits") or 2048)
    outputs["ecdsaCurve"] = str(inputs.get("ecdsaCurve") or "P224")
    return outputs


# --- certificates


def _load_private_key(pem: str, what: str) -> _PrivateKey:
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


def _sign(builder: Any, key: _PrivateKey) -> Any:
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
    public_key: _PublicKey,
    san: list[x509.GeneralName],
    issuer: x509.Name,
    issuer_key: _PrivateKey,
    authority_key_id: x509.AuthorityKeyIdentifier | None,
    what: str,
) -> dict[str, Any]:
    hours = int(_require(inputs, "validityPeriodHours", what))
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


def _self_signed_cert_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
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
    outputs["keyAlgorithm"] = _key_algorithm(key)
    return outputs


def _cert_request_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    what = f"CertRequest {identity}"
    key = _load_private_key(_key_pem(inputs, "privateKeyPem", what), what)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(inputs.get("subject")))
    san = _general_names(inputs)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    csr = _sign(builder, key)
    return {
        "certRequestPem": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "keyAlgorithm": _key_algorithm(key),
    }


def _locally_signed_cert_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    what = f"LocallySignedCert {identity}"
    csr = x509.load_pem_x509_csr(str(_require(inputs, "certRequestPem", what)).encode())
    if not csr.is_signature_valid:
        raise ValueError(f"{what}: certRequestPem has an invalid signature")
    ca_cert = x509.load_pem_x509_certificate(str(_require(inputs, "caCertPem", what)).encode())
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
    outputs["caKeyAlgorithm"] = _key_algorithm(ca_key)
    return outputs


def _command_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"stdout": "", "stderr": ""}


_COMPUTED_OUTPUTS: Final[dict[str, Callable[[str, Mapping[str, Any]], dict[str, Any]]]] = {
    "tls:index/privateKey:PrivateKey": _private_key_outputs,
    "tls:index/selfSignedCert:SelfSignedCert": _self_signed_cert_outputs,
    "tls:index/certRequest:CertRequest": _cert_request_outputs,
    "tls:index/locallySignedCert:LocallySignedCert": _locally_signed_cert_outputs,
    "command:remote:Command": _command_outputs,
    "command:local:Command": _command_outputs,
}


# --------------------------------------------------------------------------- configuration


def project_name(project_dir: Path) -> str:
    """The project name from ``Pulumi.yaml``, defaulting to :data:`DEFAULT_PROJECT`."""
    path = project_dir / "Pulumi.yaml"
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            return data["name"]
    return DEFAULT_PROJECT


def load_stack_config(project_dir: Path, stack: str) -> dict[str, Any]:
    """The ``config:`` mapping of ``Pulumi.<stack>.yaml``."""
    path = project_dir / f"Pulumi.{stack}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a mapping")
    return config


def engine_config(config: Mapping[str, Any], project: str) -> tuple[dict[str, str], list[str]]:
    """Encode stack configuration the way the engine hands it to a program.

    Strings pass as-is and everything else as JSON (``Config.get_object`` parses it).
    Keys without a namespace belong to the project. ``secure:`` values cannot be
    decrypted offline; they become a placeholder and the key is marked secret.
    """
    values: dict[str, str] = {}
    secret_keys: list[str] = []
    for raw_key, raw_value in config.items():
        key = raw_key if ":" in raw_key else f"{project}:{raw_key}"
        value, secret = _without_secure(raw_value, key)
        values[key] = value if isinstance(value, str) else json.dumps(value, default=str)
        if secret:
            secret_keys.append(key)
    return values, secret_keys


def _without_secure(value: Any, key: str) -> tuple[Any, bool]:
    if isinstance(value, dict):
        if set(value) == {"secure"}:
            return f"offline-secret:{key}", True
        items = {k: _without_secure(v, key) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(s for _, s in items.values())
    if isinstance(value, list):
        decoded = [_without_secure(v, key) for v in value]
        return [v for v, _ in decoded], any(s for _, s in decoded)
    return value, False


# --------------------------------------------------------------------------- running

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Runs are serialised: they share process-wide state (cwd, sys.path, sys.modules).
_EVALUATE_LOCK = threading.Lock()


class _SerialExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each monitor RPC to completion before the event loop continues.

    The SDK issues RPCs on a thread pool, so with several workers the order in
    which the monitor sees registrations would vary from run to run. One worker
    and a blocking ``submit`` make that order a pure function of the program.
    The RPCs still run off the loop thread, because the mock monitor drives its
    own event loop there.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="pulumi-offline-rpc")

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> concurrent.futures.Future[_T]:
        future = super().submit(fn, *args, **kwargs)
        concurrent.futures.wait([future])
        return future


def _close_thread_event_loop() -> None:
    # The mock monitor creates an event loop in the worker thread; close it with the run.
    try:
        loop = asyncio.get_event_loop()
    except RuntimeError:
        return
    asyncio.set_event_loop(None)
    loop.close()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Program errors are re-raised by run_in_stack; the leftovers asyncio reports
    # about abandoned tasks would only duplicate them (the language host hides them too).
    _LOG.debug("asyncio: %s", context.get("message"), exc_info=context.get("exception"))


_CONTEXT_PROPERTY_DEFAULT: Final = "_ContextProperty__default"


def _settings_defaults() -> dict[str, Any]:
    # pulumi's ContextProperty rewrites its class-wide default the first time a
    # context sets it; remember the defaults so a run leaves no trace behind.
    return {
        name: getattr(prop, _CONTEXT_PROPERTY_DEFAULT, None)
        for name, prop in vars(runtime_settings.Settings).items()
        if isinstance(prop, ContextProperty)
    }


def _restore_settings_defaults(defaults: Mapping[str, Any]) -> None:
    for name, value in defaults.items():
        setattr(vars(runtime_settings.Settings)[name], _CONTEXT_PROPERTY_DEFAULT, value)


def _local_module_names(project_dir: Path) -> set[str]:
    names = {path.stem for path in project_dir.glob("*.py")}
    names |= {path.parent.name for path in project_dir.glob("*/__init__.py")}
    names.discard("__main__")
    return names


def _comes_from(module: Any, directory: Path) -> bool:
    locations = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or [])]
    return any(location and Path(location).resolve().is_relative_to(directory) for location in locations)


@contextlib.contextmanager
def _program_environment(project_dir: Path) -> Iterator[None]:
    """Make ``project_dir`` importable and current while the program runs.

    Modules the caller already imported from ``project_dir`` are reused, so the
    program raises and returns the very classes the caller holds (``pytest.raises``
    works). Modules first imported by the program are dropped after the run, so
    every run imports them afresh; same-named modules from elsewhere (another
    project) are set aside for the run and put back afterwards.
    """
    local = _local_module_names(project_dir)

    def is_local(name: str) -> bool:
        return name.partition(".")[0] in local

    shadowing = {
        name: module for name, module in sys.modules.items() if is_local(name) and not _comes_from(module, project_dir)
    }
    for name in shadowing:
        del sys.modules[name]
    kept = {name for name in sys.modules if is_local(name)}
    saved_cwd = os.getcwd()
    saved_defaults = _settings_defaults()
    path_entry = str(project_dir)
    sys.path.insert(0, path_entry)
    importlib.invalidate_caches()
    try:
        os.chdir(project_dir)
        yield
    finally:
        os.chdir(saved_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(path_entry)
        for name in [name for name in sys.modules if is_local(name) and name not in kept]:
            del sys.modules[name]
        sys.modules.update(shadowing)
        _restore_settings_defaults(saved_defaults)


def _run_program(
    program: Path,
    *,
    project: str,
    stack: str,
    project_dir: Path,
    preview: bool,
    config: dict[str, str],
    secret_keys: list[str],
    monitor: RecordingMonitor,
    engine: MockEngine,
) -> None:
    """Run the program like the Python language host does, on a private event loop.

    Called on a dedicated thread: it starts with an empty contextvars context and
    no event loop, so nothing the SDK keeps in either can reach the caller.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_quiet_exception_handler)
    executor = _SerialExecutor()
    loop.set_default_executor(executor)
    try:
        # Equivalent to set_mocks(), minus the root stack it would create: run_in_stack
        # creates that itself, as for a real program run.
        runtime_settings.configure(
            runtime_settings.Settings(
                project=project,
                stack=stack,
                monitor=monitor,
                engine=engine,
                dry_run=preview,
                organization="organization",
                root_directory=str(project_dir),
            )
        )
        runtime_settings.ROOT.set(None)
        runtime_config.set_all_config(config, secret_keys)

        def main() -> None:
            runpy.run_path(str(program), run_name="__main__")

        loop.run_until_complete(run_in_stack(main))
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            executor.submit(_close_thread_event_loop).result()
        finally:
            executor.shutdown(wait=True)
            asyncio.set_event_loop(None)
            loop.close()


def evaluate(
    stack: str,
    *,
    project_dir: Path | None = None,
    config: Mapping[str, Any] | None = None,
    preview: bool = False,
    previous_outputs: Mapping[str, Any] | None = None,
    stack_outputs: Mapping[str, StackOutputs] | None = None,
) -> Evaluation:
    """Evaluate the program for ``stack`` offline and return what it registered.

    :param stack: stack name; selects ``Pulumi.<stack>.yaml`` and appears in URNs.
    :param project_dir: directory holding ``__main__.py`` (default: the repository root).
    :param config: the complete ``config:`` mapping to use instead of the stack file,
        e.g. ``{"kubeadm-ha:network": {...}}``.
    :param preview: evaluate like ``pulumi preview`` of a new stack: computed
        outputs (keys, certificates, ids, command output) are unknown.
    :param previous_outputs: the stack outputs of the "last deployment", as the
        engine's ``pulumi:pulumi:readStackOutputs`` would return them (default: none,
        a new stack).
    :param stack_outputs: other stacks' outputs, as a ``pulumi.StackReference`` (or
        ``readStackOutputs``) reads them, by stack name: a mapping, ``None`` for a stack
        that does not exist, :data:`UNKNOWN` for outputs that are not known. A stack not
        named here is modelled as deployed exactly as its ``Pulumi.<stack>.yaml`` in
        ``project_dir`` says, by this checkout of the program (see
        :func:`stacks_as_their_files_say`); without a stack file it does not exist.
    :raises: whatever the program raises (e.g. a ``pulumi.RunError`` from config
        validation), re-raised unchanged. What was registered and read up to the failure
        is attached: :func:`evaluation_of_failure` returns it.
    """
    directory = (project_dir or REPO_ROOT).resolve()
    program = directory / "__main__.py"
    if not program.is_file():
        raise FileNotFoundError(f"no Pulumi program at {program}")
    project = project_name(directory)
    raw_config = dict(config) if config is not None else load_stack_config(directory, stack)
    values, secret_keys = engine_config(raw_config, project)

    from_files = stacks_as_their_files_say(directory)
    given = dict(stack_outputs or {})

    def other_stacks(name: str) -> StackOutputs:
        return given[name] if name in given else from_files(name)

    monitor = RecordingMonitor(
        OfflineMocks(preview=preview, previous_outputs=previous_outputs, stack=stack, other_stacks=other_stacks)
    )
    engine = _RecordingEngine()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _run_program(
                program,
                project=project,
                stack=stack,
                project_dir=directory,
                preview=preview,
                config=values,
                secret_keys=secret_keys,
                monitor=monitor,
                engine=engine,
            )
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    with _EVALUATE_LOCK, _program_environment(directory):
        thread = threading.Thread(target=target, name=f"pulumi-offline-{stack}")
        thread.start()
        thread.join()
    evaluation = Evaluation(
        stack=stack,
        preview=preview,
        resources=list(monitor.registrations),
        outputs=dict(monitor.stack_outputs),
        config=values,
        logs=list(engine.messages),
        reads=list(monitor.reads),
    )
    if failure:
        failure[0].__dict__[_PARTIAL_EVALUATION] = evaluation
        raise failure[0]
    return evaluation


_PARTIAL_EVALUATION: Final = "offline_evaluation"


def evaluation_of_failure(error: BaseException) -> Evaluation | None:
    """What a failed :func:`evaluate` had registered, read and logged before the program raised ``error``."""
    found = getattr(error, _PARTIAL_EVALUATION, None)
    return found if isinstance(found, Evaluation) else None


def stacks_as_their_files_say(project_dir: Path) -> Callable[[str], StackOutputs]:
    """Model other stacks offline: each deployed exactly as its stack file says, by this program revision.

    The outputs are the release outputs the program's own ``model.release`` computes, so a stack that
    promotes from another sees it run the release its file declares. Called while the program runs (its
    modules are importable then); a stack without a stack file does not exist.
    """

    def outputs(stack: str) -> StackOutputs:
        path = project_dir / f"Pulumi.{stack}.yaml"
        if not path.is_file():
            return None
        release = importlib.import_module("model.release")
        config = importlib.import_module("model.stack")
        parsed = config.config_from_stack_file(str(path), stack)
        result: Mapping[str, Any] = release.deployment_outputs(parsed, release.program_digest(project_dir))
        return result

    return outputs
