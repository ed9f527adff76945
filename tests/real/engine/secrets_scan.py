"""Issue 19, part 6: finding a stack's secrets in clear where they must not be.

The secrets come from the engine itself: the stack outputs it marks secret (`pulumi stack output --json` shows
them as "[secret]"; `--show-secrets` gives their values) and every secret in the state, decrypted by `pulumi
stack export --show-secrets` (a secret is `{"4dabf18193072939515e22adb298388d":
"1b47061264138c4ac30d75fd1eb44270", "plaintext": JSON}`, pulumi sdk/go/common/resource/sig/sig.go `Secret`, and
`ciphertext` instead of `plaintext` without --show-secrets). Each secret string is looked for as it is, as
it appears inside JSON (escaped newlines), base64-encoded (the file bundles given on stdin are base64 per file),
and by the body lines of any private key it holds; every artifact is also searched for private-key markers (PEM
and base64-encoded PEM) and bootstrap-token-shaped strings, whatever the collection found.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from render.scripts import TOKEN_PATTERN

SECRET_SIGNATURE = ("4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270")
# Shorter strings could occur by chance (a short secret is also looked for through its longer forms).
MIN_NEEDLE = 20
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]*PRIVATE KEY)-----(.*?)-----END \1-----", re.DOTALL)
_KUBECONFIG_SECRET = re.compile(r"^\s*(?:client-key-data|token|password):\s*(\S+)\s*$", re.MULTILINE)
_PRIVATE_KEY_HEADERS = ("OPENSSH PRIVATE KEY", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")


def _b64_prefix(text: str) -> str:
    """The base64 of `text` cut to whole 3-byte groups: what any base64 of a string starting so starts with."""
    raw = text.encode()
    return base64.b64encode(raw[: len(raw) - len(raw) % 3]).decode()


# In clear, or base64-encoded from its first byte (a kubeconfig's client-key-data, a bundle line).
MARKERS = (
    "PRIVATE KEY-----",
    *(_b64_prefix(f"-----BEGIN {header}-----") for header in _PRIVATE_KEY_HEADERS),
)
_TOKEN = re.compile(rf"(?<![a-z0-9]){TOKEN_PATTERN}(?![a-z0-9])")


@dataclass(frozen=True)
class Secret:
    where: str  # e.g. "output sshPrivateKey" or "state <urn> outputs.privateKeyPem" (never the value)
    value: str


def state_secrets(deployment: Any, where: str = "state") -> Iterator[Secret]:
    """Every secret in an exported state, decrypted (`pulumi stack export --show-secrets`), as string leaves."""
    if isinstance(deployment, dict):
        if deployment.get(SECRET_SIGNATURE[0]) == SECRET_SIGNATURE[1]:
            if "plaintext" in deployment:
                yield from _leaves(json.loads(deployment["plaintext"]), where)
            return
        if isinstance(deployment.get("urn"), str):
            where = f"state {deployment['urn']}"
        for key, value in deployment.items():
            yield from state_secrets(value, f"{where}.{key}")
    elif isinstance(deployment, list):
        for index, value in enumerate(deployment):
            yield from state_secrets(value, f"{where}[{index}]")


def output_secrets(shown: dict[str, Any], masked: dict[str, Any]) -> Iterator[Secret]:
    """The outputs `pulumi stack output --json` masks, with their values from `--show-secrets --json`."""
    for name, value in masked.items():
        if value == "[secret]":
            yield from _leaves(shown[name], f"output {name}")


def _leaves(value: Any, where: str) -> Iterator[Secret]:
    """The strings in a secret's value. A secret nested in it is `{signature, "value": ...}` (measured: the
    connection of a remote step, `inputs.connection.privateKey`); the signature itself is no secret."""
    if isinstance(value, str):
        yield Secret(where, value)
    elif isinstance(value, dict):
        if value.get(SECRET_SIGNATURE[0]) == SECRET_SIGNATURE[1]:
            yield from _leaves(value.get("value", value.get("plaintext")), where)
            return
        for key, item in value.items():
            yield from _leaves(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")


def needles(secret: str) -> set[str]:
    """The forms in which `secret` would show if it leaked."""
    forms = {secret, json.dumps(secret)[1:-1], base64.b64encode(secret.encode()).decode()}
    for match in _PEM_BLOCK.finditer(secret):
        lines = [line.strip() for line in match.group(2).splitlines() if line.strip()]
        # An OpenSSH private key's first line is the same in every unencrypted key of a type: the
        # "openssh-key-v1" magic, cipher and KDF "none", one key, the public key's type (OpenSSH PROTOCOL.key).
        forms.update(lines[1:] if match.group(1) == "OPENSSH PRIVATE KEY" else lines)
    forms.update(match.group(1) for match in _KUBECONFIG_SECRET.finditer(secret))
    forms.update(match.group(0) for match in _TOKEN.finditer(secret))
    return {form for form in forms if len(form) >= MIN_NEEDLE or _TOKEN.fullmatch(form)}


_PUBLIC_TEXT = re.compile(r"-----BEGIN (PUBLIC KEY|CERTIFICATE)-----|^(ssh-|ecdsa-|sk-)\S+ AAAA", re.MULTILINE)


def public_values(deployment: Any) -> Iterator[str]:
    """The public halves in an exported state: non-secret strings under a key naming a public key or certificate
    (`publicKeyPem`, `publicKeyOpenssh`, `certPem`, ...) or holding one (a host key in the `hostKeys` output;
    the same key also sits in the secret connection of every step on that host)."""
    if isinstance(deployment, dict):
        if deployment.get(SECRET_SIGNATURE[0]) == SECRET_SIGNATURE[1]:
            return
        for key, value in deployment.items():
            if isinstance(value, str) and (re.search("public|cert", key, re.IGNORECASE) or _PUBLIC_TEXT.search(value)):
                yield value
            else:
                yield from public_values(value)
    elif isinstance(deployment, list):
        for value in deployment:
            yield from public_values(value)


def findings(secrets: Iterable[Secret], artifacts: dict[str, str], public: Iterable[str] = ()) -> list[str]:
    """What was found where: secret forms by where the secret lives (never the value), markers, token shapes.

    A form that is also part of a public value is no finding: the last line of a P-256 key's SEC1 PEM is the
    base64 of the last 25 bytes of its public point, at the same alignment as in the public key's PEM
    (measured: a 36-character line found in `pulumi destroy`'s console, which prints the keys' public halves).
    """
    known = list(public)
    found = []
    forms = [
        (secret.where, form)
        for secret in secrets
        if len(secret.value) >= 8
        for form in needles(secret.value)
        if not any(form in value for value in known)
    ]
    for name, text in artifacts.items():
        found += [f"{name}: the secret of {where} ({len(form)} characters)" for where, form in forms if form in text]
        found += [f"{name}: marker {marker!r}" for marker in MARKERS if marker in text]
        found += [f"{name}: a bootstrap-token-shaped string" for _ in _TOKEN.finditer(text)][:1]
    return sorted(set(found))
