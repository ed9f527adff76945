"""Bundles for the tests: a manifest that satisfies a stack, and a directory holding real files for it.

The files' contents are stand-ins (a few bytes each) wherever only the bundle's own checks read them (the
manifest, tools.bundle, the program); tests of the node step use real binaries (tests/real).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.bundle import (
    BINARIES,
    CNI_MANIFESTS,
    MANIFEST,
    REQUIRED_CNI_PLUGINS,
    Entry,
    Manifest,
    kubeadm_images,
)

KUBERNETES = "1.37.2"


def entries_for(cni: str = "calico", *, kubernetes: str = KUBERNETES, etcdctl: bool = False) -> list[Entry]:
    """One entry per file the stack needs, each with the digest of `content_of(path)`."""
    wanted: list[tuple[str, str, str, str]] = []
    for name in BINARIES:
        if name == "etcdctl" and not etcdctl:
            continue
        version = kubernetes if name in ("kubeadm", "kubelet", "kubectl") else "1.0.0"
        wanted.append((f"bin/{name}", "binary", name, version))
    wanted += [(f"cni/{name}", "cni-plugin", name, "1.8.0") for name in REQUIRED_CNI_PLUGINS]
    for reference in kubeadm_images(kubernetes):
        wanted.append(
            (
                f"images/{reference.rsplit('/', 1)[-1].replace(':', '_')}.tar",
                "image",
                reference,
                reference.rsplit(":", 1)[-1],
            )
        )
    entries = [
        Entry(path, _sha(content_of(path)), len(content_of(path)), kind, name, version)
        for path, kind, name, version in wanted
    ]
    if cni in CNI_MANIFESTS:
        version, sha256 = CNI_MANIFESTS[cni]
        entries.append(Entry(f"manifests/{cni}.yaml", sha256, 0, "cni-manifest", cni, version))
    return entries


def content_of(path: str) -> bytes:
    return f"stand-in for {path}\n".encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(directory: Path, entries: list[Entry], *, kubernetes: str = KUBERNETES) -> str:
    """manifest.json in `directory`; returns its sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    text = Manifest(kubernetes, "amd64", tuple(entries)).to_json()
    (directory / MANIFEST).write_text(text)
    return _sha(text.encode())
