"""A node's software without the internet: the artifact bundle copied and installed, the registry mirror set.

Both run right after the node's readiness step and before any step that needs containerd or Kubernetes
(`Vm.ready` is the last of them). The copy is pulumi-command's CopyToRemote over the node's pinned SSH
connection: it sends the bundle when it is created, and again only when the bundle's content (the engine's
asset hash) or its path on the node changes (pulumi-command v1.2.1 provider/pkg/provider/remote/
copyController.go, `Update`: `needCopy := news.hash() != olds.hash() || news.RemotePath != olds.RemotePath`),
so a second `pulumi up` sends nothing. A rebuilt node (a new domain) gets it again through `triggers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command

from components.remote import NodeAccess, run_step
from model.artifacts import ArtifactsConfig
from model.bundle import KUBERNETES_BINARIES, BundleError, Manifest, pinned_manifest, requirement_problems
from model.config import ClusterConfig
from model.rules import ConfigError, Problem
from render.artifacts import STAGE_DIR, BundleInstall, bundle_dir, bundle_install_script
from render.registry_mirror import registry_mirror_script
from render.scripts import Script

# The roles that run containerd and a kubelet; load balancers need nothing from a bundle or a mirror.
_KUBERNETES_ROLES = ("cp", "worker", "etcd")


@dataclass(frozen=True)
class NodeSoftware:
    """What one node gets after it boots: the bundle (local source, install script) and the mirror's files."""

    bundle_source: str | None
    bundle_remote_dir: str | None
    bundle_script: Script | None
    mirror_script: Script | None


def stack_bundle(config: ClusterConfig) -> Manifest | None:
    """The pinned bundle's manifest, checked against what the stack needs; None without a bundle.

    Read once per run, before any resource: a missing bundle, another bundle than the pinned one, or one that
    lacks what the stack needs is a configuration error naming the key.
    """
    bundle = config.artifacts.bundle
    if bundle is None:
        return None
    try:
        manifest = pinned_manifest(Path(bundle.path), bundle.sha256)
    except BundleError as error:
        raise ConfigError([Problem("artifacts.bundle", str(error))]) from None
    problems = requirement_problems(
        manifest,
        config.kubernetes.version,
        config.kubernetes.cni,
        images=config.artifacts.images_from_bundle,
        external_etcd=config.etcd.external,
    )
    if problems:
        raise ConfigError([Problem("artifacts.bundle", f"{bundle.path}: {problem}") for problem in problems])
    return manifest


def node_software(
    artifacts: ArtifactsConfig,
    manifest: Manifest | None,
    hostname: str,
    role: str,
    *,
    external_etcd: bool,
    pause_tag: str,
) -> NodeSoftware | None:
    if role not in _KUBERNETES_ROLES:
        return None
    bundle = artifacts.bundle
    script = source = remote = None
    if bundle is not None and manifest is not None:
        install = BundleInstall(
            manifest, bundle.sha256, Path(bundle.path).name, bundle.is_archive, role, external_etcd=external_etcd
        )
        script = bundle_install_script(hostname, install)
        # sftp puts a directory inside an existing or new remote directory, a file at the path itself
        # (copyController.go `sftpCopy`): either way the bundle ends up at STAGE_DIR/<sha256>/<its name>.
        source, remote = bundle.path, f"{STAGE_DIR}/{bundle.sha256}"
        if bundle.is_archive:
            remote += "/" + Path(bundle.path).name
    mirror = artifacts.registry_mirror
    mirror_script = registry_mirror_script(hostname, mirror, pause_tag) if mirror is not None else None
    if script is None and mirror_script is None:
        return None
    return NodeSoftware(source, remote, script, mirror_script)


def bundled_cni_manifest(manifest: Manifest | None, artifacts: ArtifactsConfig, cni: str) -> str | None:
    """Where the bundle's verified copy of the CNI manifest is on every node (None: it is downloaded)."""
    if manifest is None or artifacts.bundle is None:
        return None
    entry = manifest.named("cni-manifest", cni)
    return None if entry is None else f"{bundle_dir(artifacts.bundle.sha256)}/{entry.path}"


def bundled_kubernetes(manifest: Manifest | None, artifacts: ArtifactsConfig) -> dict[str, str] | None:
    """kubeadm, kubelet and kubectl in the bundle's verified copy on every node (None: the upgrade uses apt)."""
    if manifest is None or artifacts.bundle is None:
        return None
    where = bundle_dir(artifacts.bundle.sha256)
    return {
        entry.name: f"{where}/{entry.path}" for entry in manifest.of_kind("binary") if entry.name in KUBERNETES_BINARIES
    }


def install_software(
    name: str,
    access: NodeAccess,
    software: NodeSoftware,
    *,
    parent: pulumi.Resource,
    after: pulumi.Resource,
    replace_with: pulumi.Input[str],
) -> pulumi.Resource:
    """The copy, the install and the mirror step, in that order after `after`; returns the last."""
    last = after
    if software.bundle_script is not None:
        assert software.bundle_source is not None and software.bundle_remote_dir is not None
        source: pulumi.Asset | pulumi.Archive = (
            pulumi.FileArchive(software.bundle_source)
            if Path(software.bundle_source).is_dir()
            else pulumi.FileAsset(software.bundle_source)
        )
        copied = command.remote.CopyToRemote(
            f"{name}-bundle-copy",
            connection=access.connection(),
            source=source,
            remote_path=software.bundle_remote_dir,
            triggers=[replace_with],
            opts=pulumi.ResourceOptions(parent=parent, depends_on=[last]),
        )
        last = run_step(
            f"{name}-bundle",
            access,
            software.bundle_script,
            parent=parent,
            depends_on=[copied],
            replace_with=replace_with,
        )
    if software.mirror_script is not None:
        last = run_step(
            f"{name}-registry-mirror",
            access,
            software.mirror_script,
            parent=parent,
            depends_on=[last],
            replace_with=replace_with,
        )
    return last
