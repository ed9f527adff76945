"""The release: what is promoted from dev to staging to prod, unchanged.

A release is every setting that decides *what software* a cluster runs, as opposed to *how big it is or
where it lives*. It travels as one unit: a stack may deploy only the release its promotion source
(`promotion.from`) runs, so a change reaches prod only after it ran in dev and staging.

In a release:
- the Kubernetes version, and every pin the program derives from it: the kubelet/kubeadm/kubectl package
  version and the etcd image tag kubeadm pins for that minor (model/versions.py);
- the CNI and the version of its manifest (pinned in model/versions.py);
- the VM image: its URL or path and, when the stack pins one, its sha256 (`image.sha256`);
- with an air-gapped install, the sha256 of the artifact bundle's manifest (`artifacts.bundle.sha256`), which
  pins every file the nodes install: promotion moves the exact bundle;
- beside it, the digest of the program's own source (`programDigest`): the same settings rendered by
  another revision of this program are another deployment.

Never in a release: sizes, replica counts, network, VIP, hypervisors, SSH users and keys, etcd topology.
Those are what make environments different.

Everything here is a pure function of the configuration or of files on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from model.config import CONFIG_NAMESPACE, ClusterConfig
from model.versions import CALICO_VERSION, FLANNEL_VERSION, kubernetes_apt_version, release_for

# Stack output names: written by every successful `pulumi up`, read by the next stack in the chain.
RELEASE_OUTPUT = "release"
PROGRAM_DIGEST_OUTPUT = "programDigest"
PROMOTION_OUTPUT = "promotion"

PROGRAM_DIGEST_KEY = PROGRAM_DIGEST_OUTPUT

_CNI_VERSIONS = {"calico": CALICO_VERSION, "flannel": FLANNEL_VERSION}


@dataclass(frozen=True)
class ReleaseKey:
    """One entry of the release output and where an operator changes it."""

    name: str
    # The setting that decides it, as the operator writes it (the key path in Pulumi.<stack>.yaml), or what
    # in the program pins it.
    setting: str
    # Where it lives in Pulumi.<stack>.yaml (top-level key, then keys inside it); None for derived pins.
    stack_path: tuple[str, ...] | None = None


_NS = f"{CONFIG_NAMESPACE}:"
RELEASE_KEYS: tuple[ReleaseKey, ...] = (
    ReleaseKey("kubernetesVersion", "kubernetes.version", (f"{_NS}kubernetes", "version")),
    ReleaseKey("kubernetesPackages", "kubernetes.version (kubelet, kubeadm and kubectl package version)"),
    ReleaseKey("etcdImageTag", "kubernetes.version (the etcd image kubeadm pins for its minor)"),
    ReleaseKey("cni", "kubernetes.cni", (f"{_NS}kubernetes", "cni")),
    ReleaseKey("cniVersion", "the CNI manifest version pinned in model/versions.py"),
    ReleaseKey("image", "image.url", (f"{_NS}image", "url")),
    ReleaseKey("imageSha256", "image.sha256", (f"{_NS}image", "sha256")),
    ReleaseKey("artifactBundle", "artifacts.bundle.sha256", (f"{_NS}artifacts", "bundle", "sha256")),
)
# Stack-file keys whose plain scalar form stands for one of their fields (`image: URL` means `image.url`).
SCALAR_SHORTHANDS = {f"{_NS}image": "url"}
_BY_NAME = {key.name: key for key in RELEASE_KEYS}
PROGRAM_DIGEST_SETTING = (
    "programDigest (the program's source: __main__.py, components/, model/, render/, Pulumi.yaml, requirements.txt)"
)


def release_of(config: ClusterConfig) -> dict[str, str]:
    """The release `config` deploys, in RELEASE_KEYS order.

    A CNI of `none` has no version to pin; an image without `sha256` (an Ubuntu cloud image, checked against
    Ubuntu's signed SHA256SUMS) has no digest in the release.
    """
    kubernetes = config.kubernetes
    release = {
        "kubernetesVersion": kubernetes.version,
        "kubernetesPackages": kubernetes_apt_version(kubernetes.version),
        "etcdImageTag": release_for(kubernetes.version).etcd_image_tag,
        "cni": kubernetes.cni,
    }
    if kubernetes.cni in _CNI_VERSIONS:
        release["cniVersion"] = _CNI_VERSIONS[kubernetes.cni]
    release["image"] = config.image.url
    if config.image.sha256 is not None:
        release["imageSha256"] = config.image.sha256
    if config.artifacts.bundle is not None:
        # The bundle's manifest pins every binary, image and manifest a node installs (model/bundle.py).
        release["artifactBundle"] = config.artifacts.bundle.sha256
    return release


def stack_settings(release: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
    """The stack-file settings that carry `release`: path in Pulumi.<stack>.yaml -> value.

    Derived pins are absent: they follow from these settings and the program revision.
    """
    return {
        key.stack_path: str(release[key.name])
        for key in RELEASE_KEYS
        if key.stack_path is not None and key.name in release
    }


# --------------------------------------------------------------------------- program digest

# The program's own source. Stack files are not (they hold environment settings), nor are tests and tools
# (they never run in `pulumi up`). Everything under components/, model/ and render/ counts, templates included.
PROGRAM_TOP_LEVEL_FILES = ("__main__.py", "Pulumi.yaml", "requirements.txt")
PROGRAM_DIRECTORIES = ("components", "model", "render")
_SKIPPED_PARTS = {"__pycache__"}
_SKIPPED_SUFFIXES = {".pyc", ".pyo"}


def is_program_file(relative: str) -> bool:
    """Whether the file at POSIX path `relative` (from the checkout's root) is part of the program's source.

    The one selection both the digest of a checkout (`program_files`) and of a git commit
    (`tools.promote --find-revision`) apply, so the two agree.
    """
    parts = PurePosixPath(relative).parts
    if len(parts) == 1:
        return parts[0] in PROGRAM_TOP_LEVEL_FILES
    return (
        parts[0] in PROGRAM_DIRECTORIES
        and not _SKIPPED_PARTS.intersection(parts)
        and PurePosixPath(relative).suffix not in _SKIPPED_SUFFIXES
    )


def program_files(root: Path) -> list[str]:
    """Paths (POSIX, relative to `root`) of the program's source files, sorted."""
    found = [name for name in PROGRAM_TOP_LEVEL_FILES if (root / name).is_file()]
    for directory in PROGRAM_DIRECTORIES:
        for path in (root / directory).rglob("*"):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and is_program_file(relative):
                found.append(relative)
    return sorted(found)


def digest_of(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over `path NUL sha256(content) LF` lines sorted by path: content-addressed, nothing else."""
    lines = sorted(f"{path}\0{hashlib.sha256(content).hexdigest()}\n" for path, content in files)
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def program_digest(root: Path) -> str:
    """The digest of the program checked out at `root` (mtimes, permissions and the checkout's path do not count)."""
    return digest_of((name, (root / name).read_bytes()) for name in program_files(root))


def program_root() -> Path:
    """The directory holding this program's `__main__.py`."""
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Difference:
    key: str
    setting: str
    wanted: Any
    running: Any

    def describe(self, wanted_by: str, running_on: str) -> str:
        return f"{self.setting}: {wanted_by} {_shown(self.wanted)}; {running_on} {_shown(self.running)}"


def _shown(value: Any) -> str:
    return "nothing" if value is None else str(value)


def release_differences(wanted: Mapping[str, Any], running: Mapping[str, Any]) -> list[Difference]:
    """Every release key whose value differs, in RELEASE_KEYS order (keys only one side knows come last)."""
    names = [key.name for key in RELEASE_KEYS]
    names += sorted((set(wanted) | set(running)) - set(names))
    return [
        Difference(name, _BY_NAME[name].setting if name in _BY_NAME else name, wanted.get(name), running.get(name))
        for name in names
        if wanted.get(name) != running.get(name)
    ]


def deployment_differences(
    wanted_release: Mapping[str, Any], wanted_digest: str, deployed: Mapping[str, Any]
) -> list[Difference]:
    """Release and program-digest differences between what is wanted and a stack's outputs `deployed`."""
    running_release = deployed.get(RELEASE_OUTPUT)
    differences = release_differences(wanted_release, running_release if isinstance(running_release, Mapping) else {})
    running_digest = deployed.get(PROGRAM_DIGEST_OUTPUT)
    if running_digest != wanted_digest:
        differences.append(Difference(PROGRAM_DIGEST_KEY, PROGRAM_DIGEST_SETTING, wanted_digest, running_digest))
    return differences


def has_deployed(outputs: Mapping[str, Any]) -> bool:
    """Whether a stack's outputs carry a release (a stack that never finished an `up` has none)."""
    return isinstance(outputs.get(RELEASE_OUTPUT), Mapping) and bool(outputs.get(PROGRAM_DIGEST_OUTPUT))


def deployment_outputs(config: ClusterConfig, digest: str) -> dict[str, Any]:
    """The release outputs a successful `pulumi up` of `config` by the program `digest` leaves behind."""
    return {RELEASE_OUTPUT: release_of(config), PROGRAM_DIGEST_OUTPUT: digest}
