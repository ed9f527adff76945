"""Deterministic pulumi-tls private keys: generated from the resource's URN, serialised as the provider does.

Also the helpers the certificate stand-ins share (key types, required inputs, key algorithm names).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import threading
from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tools.offline.results import UNKNOWN

# --------------------------------------------------------------------------- TLS material

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {
    "P224": ec.SECP224R1,
    "P256": ec.SECP256R1,
    "P384": ec.SECP384R1,
    "P521": ec.SECP521R1,
}


def _seed(identity: str, *parts: object) -> bytes:
    material = "\0".join([identity, *(str(part) for part in parts)])
    return hashlib.sha256(material.encode()).digest()


def require(inputs: Mapping[str, Any], key: str, what: str) -> Any:
    value = inputs.get(key)
    if value is None or value is UNKNOWN:
        raise ValueError(f"{what}: required input {key!r} is missing or unknown")
    return value


def key_algorithm(key: PrivateKey | PublicKey) -> str:
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


def _generate_key(identity: str, inputs: Mapping[str, Any]) -> PrivateKey:
    algorithm = str(require(inputs, "algorithm", f"PrivateKey {identity}"))
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


def _openssh_private_key(key: PrivateKey, seed: bytes) -> str:
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


def _ssh_public_key(public: PublicKey) -> tuple[str, str, str]:
    """``(authorized_keys line, MD5 fingerprint, SHA256 fingerprint)``, empty if unsupported."""
    try:
        line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except ValueError:
        return "", "", ""
    wire = base64.b64decode(line.split()[1])
    md5 = hashlib.md5(wire, usedforsecurity=False).digest()
    sha256 = base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")
    return line.decode() + "\n", ":".join(f"{b:02x}" for b in md5), f"SHA256:{sha256}"


def private_key_outputs(identity: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
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
