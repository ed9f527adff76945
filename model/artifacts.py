"""Where a node's software comes from: the `artifacts` stack key.

* `source: internet` (the default): apt installs containerd from the distribution and kubelet, kubeadm and
  kubectl from pkgs.k8s.io; containerd pulls every image from its registry.
* `source: bundle`: an artifact bundle (model/bundle.py) on the machine running Pulumi, pinned by the sha256 of
  its manifest, is copied to every node over the pinned SSH connection, verified there file by file and installed
  from; its images are imported into containerd before kubeadm runs, so nothing is downloaded.
* `registryMirror` (with either source): containerd pulls each named registry's images only from the site's
  mirror (Harbor, a pull-through cache), trusting only the pinned CA. A bundle without images needs it.

A bundle's manifest digest is part of the release (model/release.py), so promotion moves the exact bundle. The
mirror is an environment setting: each site has its own.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from model.base import StrictModel

# The registries the images of a kubeadm cluster come from: kubeadm's (constants.go `DefaultImageRepository`),
# calico's manifest (docker.io/calico), flannel's (ghcr.io/flannel-io).
DEFAULT_MIRRORED_REGISTRIES = ("registry.k8s.io", "docker.io", "ghcr.io")
_REGISTRY_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?$")
_PEM_CERTIFICATE = re.compile(
    r"^-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+\n-----END CERTIFICATE-----\n?$",
)


class BundleConfig(StrictModel):
    # A directory holding manifest.json and the files it lists, or a .tar archive of one (manifest.json at its
    # root), on the machine running Pulumi.
    path: Annotated[str, Field(pattern=r"^/\S+$")]
    # sha256 of the bundle's manifest.json: every file is pinned through it.
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @property
    def is_archive(self) -> bool:
        return self.path.endswith(".tar")


class RegistryMirrorConfig(StrictModel):
    # Registry host (as an image reference names it) -> the mirror's URL for it. A URL with a path is a Harbor
    # style project (`https://harbor.example/v2/proxy-k8s`): containerd then uses the path as given
    # (`override_path`).
    registries: Annotated[dict[str, str], Field(min_length=1)]
    # The CA that signed the mirror's certificate (PEM). Only it is trusted for the mirror.
    ca_certificate: Annotated[str, Field(alias="caCertificate")]

    @field_validator("registries")
    @classmethod
    def _registries(cls, value: dict[str, str]) -> dict[str, str]:
        for host, url in value.items():
            if not _REGISTRY_HOST.match(host):
                raise ValueError(f"{host!r} is not a registry host name (e.g. registry.k8s.io)")
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or " " in url:
                raise ValueError(f"{host}: {url!r} must be an https:// URL without query or fragment")
        return dict(sorted(value.items()))

    @field_validator("ca_certificate")
    @classmethod
    def _pem(cls, value: str) -> str:
        text = value.strip() + "\n"
        if not _PEM_CERTIFICATE.match(text):
            raise ValueError("must be one PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)")
        return text


class ArtifactsConfig(StrictModel):
    source: Literal["internet", "bundle"] = "internet"
    bundle: BundleConfig | None = None
    registry_mirror: Annotated[RegistryMirrorConfig | None, Field(alias="registryMirror")] = None
    # With a bundle: whether it carries the images (else the registry mirror serves them).
    bundle_images: Annotated[bool, Field(alias="bundleImages")] = True

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactsConfig:
        if self.source == "bundle" and self.bundle is None:
            raise ValueError("source is bundle: give bundle.path and bundle.sha256 (python -m tools.bundle check)")
        if self.source == "internet" and self.bundle is not None:
            raise ValueError("bundle is set but source is internet: set source: bundle, or remove bundle")
        if self.source == "bundle" and not self.bundle_images and self.registry_mirror is None:
            raise ValueError("bundleImages is false: give registryMirror, which then serves every image")
        return self

    @property
    def from_bundle(self) -> bool:
        return self.bundle is not None

    @property
    def images_from_bundle(self) -> bool:
        return self.bundle is not None and self.bundle_images
