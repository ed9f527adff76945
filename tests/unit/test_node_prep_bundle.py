"""Node preparation of a bundle stack (artifacts.source: bundle): what the first boot writes for the containerd the
bundle installs. Found by the real-cluster lab (tests/real/cluster-lab)."""

from __future__ import annotations

import tomllib

from model.bundle import kubeadm_images
from model.config import KubernetesConfig
from model.versions import release_for
from render.node_prep import (
    CONTAINERD_CONFIG,
    CONTAINERD_CONFIG_FILE,
    bundle_containerd_config,
    etcd_node_preparation,
    kubernetes_node_preparation,
)


def _pause(version: str) -> str:
    return next(image for image in kubeadm_images(version) if image.startswith("registry.k8s.io/pause:"))


def test_the_bundle_config_runs_sandboxes_from_kubeadms_pause_image_which_the_bundle_carries() -> None:
    # containerd's own default (2.2.9: pause:3.10.1) is not in a bundle: with it no pod sandbox could start.
    kubernetes = KubernetesConfig()
    parsed = tomllib.loads(bundle_containerd_config(release_for(kubernetes.version).pause_tag))
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == _pause(kubernetes.version)
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert parsed["version"] == 2
    # Everything else as the internet mode's file.
    assert tomllib.loads(CONTAINERD_CONFIG)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"] == cri["containerd"]


def test_every_bundle_preparation_writes_that_config() -> None:
    kubernetes = KubernetesConfig()
    expected = bundle_containerd_config(release_for(kubernetes.version).pause_tag)
    for script in (
        kubernetes_node_preparation("cp-1", kubernetes, from_bundle=True),
        etcd_node_preparation("etcd-1", kubernetes, from_bundle=True),
    ):
        rendered = script.render()
        assert CONTAINERD_CONFIG_FILE in rendered
        assert f'sandbox_image = "{_pause(kubernetes.version)}"' in rendered
        assert expected.splitlines()[3] in rendered


def test_the_registry_mirror_keeps_kubeadms_pause_as_the_sandbox_image() -> None:
    """The mirror step rewrites containerd's config: the sandbox image a bundle node needs stays pinned."""
    from render.registry_mirror import containerd_mirror_config

    kubernetes = KubernetesConfig()
    parsed = tomllib.loads(containerd_mirror_config(release_for(kubernetes.version).pause_tag))
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == _pause(kubernetes.version)
    assert cri["registry"]["config_path"] == "/etc/containerd/certs.d"
