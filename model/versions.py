"""Per-Kubernetes-minor facts, in one table, each value copied from the upstream source that decides it.

Pure standard library: the test tooling (``tests/real/build-binaries``) reads it without the program's
dependencies.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass


@dataclass(frozen=True)
class KubernetesRelease:
    minor: str
    # The newest patch confirmed on the Go module proxy (`go list -m -versions k8s.io/kubernetes`).
    latest_patch: str
    # kubeadm's cmd/kubeadm/app/constants/constants.go at that patch: `SupportedEtcdVersion[minor]`
    # (the etcd image kubeadm deploys for stacked etcd) and `MinExternalEtcdVersion`.
    etcd_image_tag: str
    min_external_etcd: str
    # End of life: kubernetes/website data/releases/schedule.yaml (`endOfLifeDate`).
    end_of_life: datetime.date
    # The same constants.go: `CoreDNSVersion` and `PauseVersion`, the tags `kubeadm config images list` prints
    # (an air-gapped bundle must hold exactly those images: model/bundle.py).
    coredns_tag: str
    pause_tag: str

    @property
    def etcd_version(self) -> str:
        return etcd_version_of(self.etcd_image_tag)


# Values read from k8s.io/kubernetes@<latest_patch> as served by the Go module proxy.
RELEASES: dict[str, KubernetesRelease] = {}

_D = datetime.date
# etcd tags: `DefaultEtcdVersion` in k8s.io/kubernetes@<patch>/cmd/kubeadm/app/constants/constants.go (the tag
# kubeadm's own `config images list` prints for that release). `MinExternalEtcdVersion` is "3.5.24-0" in all
# four. End-of-life dates: 1.34 from the upstream release calendar (2026-10-27); the later minors follow
# upstream's published policy (about 14 months of patches, ending on the 28th) and the README says so.
for _release in (
    KubernetesRelease("1.34", "1.34.4", "3.6.5-0", "3.5.24-0", _D(2026, 10, 27), "v1.12.1", "3.10.1"),
    KubernetesRelease("1.35", "1.35.4", "3.6.6-0", "3.5.24-0", _D(2027, 2, 28), "v1.13.1", "3.10.1"),
    KubernetesRelease("1.36", "1.36.3", "3.6.8-0", "3.5.24-0", _D(2027, 6, 28), "v1.14.2", "3.10.2"),
    KubernetesRelease("1.37", "1.37.2", "3.7.0-0", "3.5.24-0", _D(2027, 10, 28), "v1.14.6", "3.10.2"),
):
    RELEASES[_release.minor] = _release

DEFAULT_KUBERNETES = RELEASES["1.37"].latest_patch


class UnknownRelease(ValueError):
    pass


def minor_of(version: str) -> str:
    return ".".join(version.removeprefix("v").split(".")[:2])


def release_for(version: str) -> KubernetesRelease:
    """The table row for a MAJOR.MINOR.PATCH version; a minor the table does not know is refused, never guessed."""
    minor = minor_of(version)
    if minor not in RELEASES:
        raise UnknownRelease(
            f"Kubernetes {minor} is not in model/versions.py (known: {', '.join(RELEASES)}); "
            "its kubeadm facts must be read from its source before it can be used"
        )
    return RELEASES[minor]


def etcd_version_of(tag: str) -> str:
    """`3.6.5` for the image tag `3.6.5-0`."""
    return tag.split("-", 1)[0]


def next_minor(minor: str) -> str | None:
    major, number = minor.split(".")
    candidate = f"{major}.{int(number) + 1}"
    return candidate if candidate in RELEASES else None


# Pinned releases and the SHA-256 of their manifests. Both files are read from the release tag's tree, the
# bytes raw.githubusercontent.com serves for it: calico's `manifests/calico.yaml` at tag v3.32.1 of
# projectcalico/calico (`git show v3.32.1:manifests/calico.yaml | sha256sum`), flannel's
# `Documentation/kube-flannel.yml` from the module github.com/flannel-io/flannel@v0.28.10 as the Go module
# proxy serves it (checksum-database verified). flannel's tree at the tag names its own images at v0.28.10.
CALICO_VERSION = "v3.32.1"
CALICO_SHA256 = "a1df919d9721cf667accdc3e72848911b0cb25cfab7d2478ad0c996302c95744"
FLANNEL_VERSION = "v0.28.10"
FLANNEL_SHA256 = "944a3c1f925f117727a1b7272a323c80965da642498397ec7e6ea9bef0f9e6c5"

# pkgs.k8s.io packages a release `X.Y.Z` as Debian version `X.Y.Z-1.1`.
PKGS_K8S_REVISION = "1.1"


def kubernetes_apt_version(version: str) -> str:
    """The pkgs.k8s.io Debian version of Kubernetes `version`."""
    return f"{version}-{PKGS_K8S_REVISION}"
