"""Token derivation and the discovery hash, checked against an independent computation."""

from __future__ import annotations

import hashlib
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from components.pki import bootstrap_token, ca_cert_hash


def test_token_format_and_determinism() -> None:
    token = bootstrap_token("-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n")
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    assert token == bootstrap_token("-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n")
    assert token != bootstrap_token("other key material")


def test_tokens_from_many_keys_are_distinct_and_well_formed() -> None:
    tokens = {bootstrap_token(f"key-{i}") for i in range(500)}
    assert len(tokens) == 500
    assert all(re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token) for token in tokens)


def test_ca_cert_hash_is_sha256_of_subject_public_key_info() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ca_cert_hash(pem.decode()) == "sha256:" + hashlib.sha256(der).hexdigest()
