"""The artifact bundle of an air-gapped install: its manifest, what a stack needs in it, and its verification.

A bundle is a directory (or a .tar of one) with `manifest.json` at its root:

    {"format": "kubeadm-ha/bundle/v1", "kubernetesVersion": "1.37.2", "architecture": "amd64",
     "files": [{"path": "bin/kubeadm", "sha256": "...", "size": 123, "kind": "binary", "name": "kubeadm",
                "version": "1.37.2"},
               {"path": "images/pause.tar", ..., "kind": "image", "name": "registry.k8s.io/pause:3.10.2", ...}, ...]}

Kinds: `binary` (installed at BINARIES[name]), `cni-plugin` (into /opt/cni/bin), `image` (an OCI archive that
`ctr images import` names `name`), `cni-manifest` (the CNI's manifest, applied instead of downloading it).
The stack pins the manifest's sha256 (`artifacts.bundle.sha256`); the manifest pins every file. Every check
here says which file and what to do; none needs the network. Pure standard library: `tools.bundle` runs it on an
air-gapped machine without the program's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from model.versions import CALICO_SHA256, CALICO_VERSION, FLANNEL_SHA256, FLANNEL_VERSION, release_for

FORMAT = "kubeadm-ha/bundle/v1"
MANIFEST = "manifest.json"
ARCHITECTURE = "amd64"
KINDS = ("binary", "cni-plugin", "image", "cni-manifest")

# Where each binary goes on a node: where the Debian packages the internet mode installs put it (containerd and
# runc from Debian/Ubuntu, kubelet/kubeadm/kubectl from pkgs.k8s.io), so every path the program's units and
# steps name is the same in both modes.
BINARIES = {
    "kubeadm": "/usr/bin/kubeadm",
    "kubelet": "/usr/bin/kubelet",
    "kubectl": "/usr/bin/kubectl",
    "containerd": "/usr/bin/containerd",
    "containerd-shim-runc-v2": "/usr/bin/containerd-shim-runc-v2",
    "ctr": "/usr/bin/ctr",
    "runc": "/usr/sbin/runc",
    "crictl": "/usr/bin/crictl",
    # External etcd members only: the internet mode installs Ubuntu's etcd-client for it.
    "etcdctl": "/usr/bin/etcdctl",
}
KUBERNETES_BINARIES = ("kubeadm", "kubelet", "kubectl")
CNI_PLUGIN_DIR = "/opt/cni/bin"
# containerd's CRI needs `loopback` for every sandbox; flannel's CNI config chains `flannel` (from its own image)
# with `bridge`, `host-local` and `portmap` (kube-flannel.yml's cni-conf.json at v0.28.10).
REQUIRED_CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
CNI_MANIFESTS = {"calico": (CALICO_VERSION, CALICO_SHA256), "flannel": (FLANNEL_VERSION, FLANNEL_SHA256)}
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
_IMAGE_LINE = re.compile(r"^\s*(?:-\s*)?image:\s*[\"']?([^\"'\s#]+)", re.M)


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the bundle's root, POSIX
    sha256: str
    size: int
    kind: str
    name: str  # a binary's or plugin's name, an image's full reference, the CNI's name
    version: str


@dataclass(frozen=True)
class Manifest:
    kubernetes_version: str
    architecture: str
    entries: tuple[Entry, ...]

    def to_json(self) -> str:
        """The canonical text (sorted entries, fixed layout): the same bundle always has the same digest."""
        document = {
            "format": FORMAT,
            "kubernetesVersion": self.kubernetes_version,
            "architecture": self.architecture,
            "files": [asdict(entry) for entry in sorted(self.entries, key=lambda entry: entry.path)],
        }
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    def of_kind(self, kind: str) -> tuple[Entry, ...]:
        return tuple(entry for entry in self.entries if entry.kind == kind)

    def named(self, kind: str, name: str) -> Entry | None:
        return next((entry for entry in self.entries if entry.kind == kind and entry.name == name), None)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def parse_manifest(text: str, where: str = MANIFEST) -> Manifest:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise BundleError(f"{where}: not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{where}: not a kubeadm-ha bundle manifest (format must be {FORMAT!r})")
    entries = []
    for index, raw in enumerate(document.get("files") or ()):
        try:
            entry = Entry(**raw)
        except TypeError:
            raise BundleError(
                f"{where}: files[{index}] must have exactly path, sha256, size, kind, name, version"
            ) from None
        if not _SAFE_PATH.match(entry.path) or ".." in PurePosixPath(entry.path).parts or entry.path == MANIFEST:
            raise BundleError(f"{where}: files[{index}]: {entry.path!r} is not a plain relative path in the bundle")
        if entry.kind not in KINDS or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256) or entry.size < 0:
            raise BundleError(f"{where}: {entry.path}: kind must be one of {', '.join(KINDS)}, sha256 64 hex digits")
        entries.append(entry)
    paths = [entry.path for entry in entries]
    if len(set(paths)) != len(paths):
        raise BundleError(f"{where}: a path is listed twice")
    version = str(document.get("kubernetesVersion", ""))
    return Manifest(version, str(document.get("architecture", "")), tuple(entries))


def kubeadm_images(kubernetes_version: str) -> tuple[str, ...]:
    """What `kubeadm config images list --kubernetes-version vX.Y.Z` prints (constants.go of that minor)."""
    release = release_for(kubernetes_version)
    control_plane = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")
    return (
        *(f"registry.k8s.io/{name}:v{kubernetes_version}" for name in control_plane),
        f"registry.k8s.io/coredns/coredns:{release.coredns_tag}",
        f"registry.k8s.io/pause:{release.pause_tag}",
        f"registry.k8s.io/etcd:{release.etcd_image_tag}",
    )


def images_named_in(manifest_text: str) -> tuple[str, ...]:
    """Every image a Kubernetes manifest's `image:` fields name, sorted, once each."""
    return tuple(sorted(set(_IMAGE_LINE.findall(manifest_text))))


def requirement_problems(
    manifest: Manifest, kubernetes_version: str, cni: str, *, images: bool, external_etcd: bool = False
) -> list[str]:
    """What the stack needs that the manifest lacks or pins at another version (files are not read here)."""
    problems = []
    if manifest.kubernetes_version != kubernetes_version:
        problems.append(
            f"the bundle is for Kubernetes {manifest.kubernetes_version or '(none)'} and the stack runs "
            f"{kubernetes_version} (kubernetes.version): assemble one for {kubernetes_version} with tools.bundle"
        )
    if manifest.architecture != ARCHITECTURE:
        problems.append(f"the bundle is for {manifest.architecture or '(none)'}; the nodes are {ARCHITECTURE}")
    for name in BINARIES:
        if name == "etcdctl" and not external_etcd:
            continue
        entry = manifest.named("binary", name)
        if entry is None:
            problems.append(f"binary {name} is not in the bundle")
        elif name in KUBERNETES_BINARIES and entry.version.removeprefix("v") != kubernetes_version:
            problems.append(f"{entry.path} is {name} {entry.version}; the stack runs {kubernetes_version}")
    for name in REQUIRED_CNI_PLUGINS:
        if manifest.named("cni-plugin", name) is None:
            problems.append(f"CNI plugin {name} is not in the bundle")
    if cni in CNI_MANIFESTS:
        version, sha256 = CNI_MANIFESTS[cni]
        entry = manifest.named("cni-manifest", cni)
        if entry is None:
            problems.append(f"the {cni} manifest ({version}) is not in the bundle")
        elif entry.version != version or entry.sha256 != sha256:
            problems.append(
                f"{entry.path} is {cni} {entry.version}, sha256 {entry.sha256}; the program pins "
                f"{version}, sha256 {sha256} (model/versions.py)"
            )
    if images:
        listed = {entry.name for entry in manifest.of_kind("image")}
        problems += [
            f"image {image} is not in the bundle" for image in kubeadm_images(kubernetes_version) if image not in listed
        ]
    return problems


def cni_image_problems(manifest: Manifest, cni_manifest_text: str) -> list[str]:
    listed = {entry.name for entry in manifest.of_kind("image")}
    return [
        f"image {image} (named by the CNI manifest) is not in the bundle"
        for image in images_named_in(cni_manifest_text)
        if image not in listed
    ]


def file_problems(root: Path, entries: Iterable[Entry]) -> list[str]:
    """Each listed file present under `root` with its size and sha256; what to do when not."""
    problems = []
    for entry in entries:
        path = root / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing (the manifest lists it): copy the whole bundle again")
            continue
        if path.stat().st_size != entry.size or file_digest(path) != entry.sha256:
            problems.append(
                f"{entry.path}: wrong digest (the manifest pins sha256 {entry.sha256}): the file is damaged or "
                "was replaced; copy the bundle again from where it was assembled"
            )
    return problems


def read_manifest_bytes(path: Path) -> bytes:
    """manifest.json of the bundle at `path`: a directory, or a .tar with it at its root."""
    if path.is_dir():
        try:
            return (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{path}: no {MANIFEST} (is this a bundle? python -m tools.bundle assemble)") from None
    if path.is_file() and path.name.endswith(".tar"):
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile() and PurePosixPath(member.name) == PurePosixPath(MANIFEST):
                    handle = archive.extractfile(member)
                    assert handle is not None
                    return handle.read()
        raise BundleError(f"{path}: the archive has no {MANIFEST} at its root")
    raise BundleError(f"{path}: no such bundle (a directory, or a .tar archive of one)")


def pinned_manifest(path: Path, sha256: str) -> Manifest:
    """The manifest of the bundle at `path`, refused unless its sha256 is `sha256` (artifacts.bundle.sha256)."""
    data = read_manifest_bytes(path)
    found = digest(data)
    if found != sha256:
        raise BundleError(
            f"{path}/{MANIFEST} has sha256 {found}, the stack pins {sha256} (artifacts.bundle.sha256): this is "
            "another bundle; check it with `python -m tools.bundle check` and pin its digest, or point "
            "artifacts.bundle.path at the pinned one"
        )
    return parse_manifest(data.decode(), f"{path}/{MANIFEST}")
