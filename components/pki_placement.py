"""Placing the shared PKI on a control plane before kubeadm runs there: the secret stdin bundle of CA certificates
and keys (and leaves), the place-pki step's script, and what the kubeadm steps know of that step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi

from components.pki import SA_KEY_PATH, SA_PUB_PATH, ClusterPki, IssuedLeaf
from components.remote import secret
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    BundleFile,
    Script,
    encode_bundle,
    files_match,
    quote,
    sha256_hex,
)


@dataclass(frozen=True)
class PlacedPki:
    """What a control plane's kubeadm step needs from its place-pki step: the step's name and the keys it placed."""

    step: str
    key_paths: tuple[str, ...]

    @property
    def replace_hint(self) -> str:
        return f"pulumi up --replace with the URN of its {self.step} step (pulumi stack --show-urns)"


def placed_key_paths(
    pki: ClusterPki, *, include_ca_keys: Sequence[str], leaves: Sequence[IssuedLeaf] = ()
) -> tuple[str, ...]:
    """Where the bundle puts each private key, in its order: the CA keys asked for, the leaves', the SA key."""
    keyed = [ca for ca in pki.cas.values() if ca.purpose.name in include_ca_keys]
    return (*(ca.purpose.key_path for ca in keyed), *(leaf.purpose.key_path for leaf in leaves), SA_KEY_PATH)


def pki_bundle(
    pki: ClusterPki, *, include_ca_keys: Sequence[str], leaves: Sequence[IssuedLeaf] = ()
) -> tuple[pulumi.Output[str], pulumi.Output[dict[str, str]]]:
    """The stdin payload that places the shared PKI (and `leaves`), and the public files' digests for the guard."""
    cas = list(pki.cas.values())
    public_pems = [*(ca.cert_pem for ca in cas), *(leaf.cert_pem for leaf in leaves)]
    public_paths = [*(ca.purpose.cert_path for ca in cas), *(leaf.purpose.cert_path for leaf in leaves)]
    public = pulumi.Output.all(*public_pems, pki.service_account_key.public_key_pem).apply(
        lambda pems: {**dict(zip(public_paths, pems[:-1], strict=True)), SA_PUB_PATH: pems[-1]}
    )
    key_paths = placed_key_paths(pki, include_ca_keys=include_ca_keys, leaves=leaves)
    private = pulumi.Output.all(
        *(ca.key.private_key_pem for ca in cas if ca.purpose.name in include_ca_keys),
        *(leaf.key.private_key_pem for leaf in leaves),
        pki.service_account_key.private_key_pem,
    )

    def encode(public_files: dict[str, str], private_pems: list[str]) -> str:
        files = [BundleFile(path, content, 0o644) for path, content in sorted(public_files.items())]
        files += [BundleFile(path, pem, 0o600) for path, pem in zip(key_paths, private_pems, strict=True)]
        return encode_bundle(files)

    payload = secret(pulumi.Output.all(public, private).apply(lambda both: encode(both[0], both[1])))
    digests = public.apply(lambda files: {path: sha256_hex(content) for path, content in files.items()})
    return payload, digests


_PKI_MISMATCH = (
    '"kubeadm-ha: placed certificates do not match on ${KUBEADM_HA_HOST} (step ${KUBEADM_HA_STEP});'
    ' the bundle and the expected digests disagree"'
)


def keys_present(key_paths: Sequence[str]) -> str:
    """A shell condition: every placed key is there and not empty (place-pki's guard; the kubeadm steps' check)."""
    return " && ".join(f"[ -s {quote(path)} ]" for path in sorted(key_paths))


def place_pki_script(hostname: str, digests: dict[str, str], key_paths: Sequence[str]) -> Script:
    return Script(
        step="place-pki",
        host=hostname,
        done_when=f"{files_match(digests)} && {keys_present(key_paths)}",
        functions=INSTALL_BUNDLE_FUNCTION,
        body=(
            "install_bundle",
            # kubeadm refuses a CA key that does not match its certificate; catch a torn write here instead.
            f"{files_match(digests)} || {{ echo {_PKI_MISMATCH} >&2; exit 1; }}",
        ),
    )
