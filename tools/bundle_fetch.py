"""Where `tools.bundle assemble` gets each file of a bundle, and how it verifies it before taking it.

* Kubernetes binaries from dl.k8s.io, each checked against the `.sha256` file the release publishes beside it.
* containerd, runc, the CNI plugins, crictl (and etcdctl for external etcd) from their projects' GitHub
  releases, each checked against the checksum file of the same release.
* The CNI manifest from the URL this program pins, checked against the digest it pins (model/versions.py).
* Images from their registries by the registry API (tools/oci_pull.py): the tag resolved once to a manifest
  digest, every blob checked against its digest, written as an OCI archive that `ctr images import` names.

Versions of the node software that is not Kubernetes default to the ones below and can be set per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.bundle import CNI_MANIFESTS, REQUIRED_CNI_PLUGINS, BundleError, Entry, images_named_in, kubeadm_images
from model.config import ClusterConfig
from model.versions import release_for
from render.cni import manifest_for
from tools.oci_pull import pull_image

# containerd: the 2.2 line Ubuntu 24.04's noble-updates ships (tests/real/build-binaries CONTAINERD_VERSION);
# runc: containerd v2.2.9's script/setup/runc-version; CNI plugins and crictl: the versions the lab builds
# (../shared/lab-binaries.md, tests/real/lab_binaries.py).
DEFAULT_CONTAINERD = "2.2.9"
DEFAULT_RUNC = "1.3.6"
DEFAULT_CNI_PLUGINS = "1.8.0"
DEFAULT_CRICTL = "1.34.0"
_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    containerd: str
    runc: str
    cni_plugins: str
    crictl: str
    cni: str
    external_etcd: bool
    etcd: str

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--containerd-version", default=DEFAULT_CONTAINERD)
        parser.add_argument("--runc-version", default=DEFAULT_RUNC)
        parser.add_argument("--cni-plugins-version", default=DEFAULT_CNI_PLUGINS)
        parser.add_argument("--crictl-version", default=DEFAULT_CRICTL)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, config: ClusterConfig) -> Versions:
        return cls(
            config.kubernetes.version,
            args.containerd_version,
            args.runc_version,
            args.cni_plugins_version,
            args.crictl_version,
            config.kubernetes.cni,
            config.etcd.external,
            release_for(config.kubernetes.version).etcd_version,
        )

    def binaries(self) -> dict[str, str]:
        """Binary name -> its version."""
        found = {name: self.kubernetes for name in ("kubeadm", "kubelet", "kubectl")}
        found |= {name: self.containerd for name in ("containerd", "containerd-shim-runc-v2", "ctr")}
        found |= {"runc": self.runc, "crictl": self.crictl}
        if self.external_etcd:
            found["etcdctl"] = self.etcd
        return found


def local_files(source: Path, versions: Versions) -> list[tuple[Entry, Path]]:
    """The files of a bundle taken from `source`: bin/NAME, cni/NAME, manifests/CNI.yaml and images/*.tar (OCI
    archives; each image's reference read from the archive's index.json)."""
    files: list[tuple[Entry, Path]] = []
    for name, version in versions.binaries().items():
        files.append((Entry(f"bin/{name}", "", 0, "binary", name, version), _present(source / "bin" / name)))
    for name in REQUIRED_CNI_PLUGINS:
        files.append(
            (Entry(f"cni/{name}", "", 0, "cni-plugin", name, versions.cni_plugins), _present(source / "cni" / name))
        )
    if versions.cni in CNI_MANIFESTS:
        version = CNI_MANIFESTS[versions.cni][0]
        path = _present(source / "manifests" / f"{versions.cni}.yaml")
        files.append((Entry(f"manifests/{versions.cni}.yaml", "", 0, "cni-manifest", versions.cni, version), path))
    for archive in sorted((source / "images").glob("*.tar")):
        reference = archive_reference(archive)
        tag = reference.rsplit(":", 1)[-1]
        files.append((Entry(f"images/{archive.name}", "", 0, "image", reference, tag), archive))
    return files


def archive_reference(archive: Path) -> str:
    """The image name an OCI archive gives `ctr images import` (index.json's io.containerd.image.name)."""
    with tarfile.open(archive) as handle:
        member = handle.extractfile("index.json")
        if member is None:
            raise BundleError(f"{archive}: not an OCI archive (no index.json)")
        index = json.load(member)
    for manifest in index.get("manifests", ()):
        annotations = manifest.get("annotations") or {}
        name = annotations.get("io.containerd.image.name") or annotations.get("org.opencontainers.image.ref.name")
        if name and "/" in name:
            return str(name)
    raise BundleError(f"{archive}: index.json names no image (annotation io.containerd.image.name)")


def _present(path: Path) -> Path:
    if not path.is_file():
        raise BundleError(f"{path}: missing from the --from directory")
    return path


def fetch_all(out: Path, versions: Versions) -> list[tuple[Entry, Path]]:
    """Download every file into out/.downloads, verified; the entries to write (tools.bundle.write_bundle)."""
    work = out / ".downloads"
    work.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Entry, Path]] = []
    k8s = f"https://dl.k8s.io/release/v{versions.kubernetes}/bin/linux/amd64"
    for name in ("kubeadm", "kubelet", "kubectl"):
        path = download(f"{k8s}/{name}", work / name, published_sha256(f"{k8s}/{name}.sha256", name))
        files.append((Entry(f"bin/{name}", "", 0, "binary", name, versions.kubernetes), path))
    containerd = f"https://github.com/containerd/containerd/releases/download/v{versions.containerd}"
    tarball = f"containerd-{versions.containerd}-linux-amd64.tar.gz"
    archive = download(
        f"{containerd}/{tarball}", work / tarball, published_sha256(f"{containerd}/{tarball}.sha256sum", tarball)
    )
    for name in ("containerd", "containerd-shim-runc-v2", "ctr"):
        files.append(
            (Entry(f"bin/{name}", "", 0, "binary", name, versions.containerd), _extract(archive, f"bin/{name}", work))
        )
    runc = f"https://github.com/opencontainers/runc/releases/download/v{versions.runc}"
    path = download(f"{runc}/runc.amd64", work / "runc", published_sha256(f"{runc}/runc.sha256sum", "runc.amd64"))
    files.append((Entry("bin/runc", "", 0, "binary", "runc", versions.runc), path))
    plugins = f"https://github.com/containernetworking/plugins/releases/download/v{versions.cni_plugins}"
    tarball = f"cni-plugins-linux-amd64-v{versions.cni_plugins}.tgz"
    archive = download(f"{plugins}/{tarball}", work / tarball, published_sha256(f"{plugins}/{tarball}.sha256", tarball))
    for name in REQUIRED_CNI_PLUGINS:
        files.append(
            (
                Entry(f"cni/{name}", "", 0, "cni-plugin", name, versions.cni_plugins),
                _extract(archive, f"./{name}", work),
            )
        )
    crictl = f"https://github.com/kubernetes-sigs/cri-tools/releases/download/v{versions.crictl}"
    tarball = f"crictl-v{versions.crictl}-linux-amd64.tar.gz"
    archive = download(f"{crictl}/{tarball}", work / tarball, published_sha256(f"{crictl}/{tarball}.sha256", tarball))
    files.append((Entry("bin/crictl", "", 0, "binary", "crictl", versions.crictl), _extract(archive, "crictl", work)))
    if versions.external_etcd:
        etcd = f"https://github.com/etcd-io/etcd/releases/download/v{versions.etcd}"
        tarball = f"etcd-v{versions.etcd}-linux-amd64.tar.gz"
        archive = download(f"{etcd}/{tarball}", work / tarball, published_sha256(f"{etcd}/SHA256SUMS", tarball))
        member = f"etcd-v{versions.etcd}-linux-amd64/etcdctl"
        files.append((Entry("bin/etcdctl", "", 0, "binary", "etcdctl", versions.etcd), _extract(archive, member, work)))
    images = list(kubeadm_images(versions.kubernetes))
    if versions.cni in CNI_MANIFESTS:
        cni = manifest_for(versions.cni, "10.244.0.0/16")
        assert cni is not None
        version, pinned = CNI_MANIFESTS[versions.cni]
        path = download(cni.url, work / f"{versions.cni}.yaml", pinned)
        files.append((Entry(f"manifests/{versions.cni}.yaml", "", 0, "cni-manifest", versions.cni, version), path))
        images += [image for image in images_named_in(path.read_text()) if image not in images]
    for reference in images:
        name = reference.rsplit("/", 1)[-1].replace(":", "-")
        archive = pull_image(reference, work / f"{name}.tar")
        files.append((Entry(f"images/{name}.tar", "", 0, "image", reference, reference.rsplit(":", 1)[-1]), archive))
    return files


def published_sha256(url: str, name: str) -> str:
    """The digest for `name` in a published checksum file: a bare digest, or `DIGEST  NAME` lines."""
    text = _get(url).decode()
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and len(lines[0]) == 1:
        return lines[0][0].lower()
    for words in lines:
        if len(words) >= 2 and words[-1].lstrip("*").split("/")[-1] == name:
            return words[0].lower()
    raise BundleError(f"{url} lists no checksum for {name}")


def download(url: str, path: Path, sha256: str) -> Path:
    data = _get(url)
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise BundleError(f"{url}: sha256 {found}, expected {sha256}: not taken (a moved tag or a tampered mirror)")
    path.write_bytes(data)
    return path


def _get(url: str) -> bytes:
    if not url.startswith("https://"):
        raise BundleError(f"{url}: only https downloads")
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as response:
            return bytes(response.read())
    except OSError as error:
        raise BundleError(f"{url}: {error}") from None


def _extract(archive: Path, member: str, work: Path) -> Path:
    with tarfile.open(archive) as handle:
        try:
            data = handle.extractfile(member)
        except KeyError:
            data = None
        if data is None:
            raise BundleError(f"{archive.name}: no {member} in it")
        target = work / member.rsplit("/", 1)[-1]
        target.write_bytes(data.read())
    return target
