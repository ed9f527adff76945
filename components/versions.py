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
    KubernetesRelease("1.34", "1.34.4", "3.6.5-0", "3.5.24-0", _D(2026, 10, 27)),
    KubernetesRelease("1.35", "1.35.4", "3.6.6-0", "3.5.24-0", _D(2027, 2, 28)),
    KubernetesRelease("1.36", "1.36.3", "3.6.8-0", "3.5.24-0", _D(2027, 6, 28)),
    KubernetesRelease("1.37", "1.37.2", "3.7.0-0", "3.5.24-0", _D(2027, 10, 28)),
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
            f"Kubernetes {minor} is not in components/versions.py (known: {', '.join(RELEASES)}); "
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
