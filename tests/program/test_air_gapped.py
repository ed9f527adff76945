"""Air-gapped installs in the real program under the mock runtime: a dev stack with `artifacts.source: bundle`,
and with a registry mirror.

What is checked is what the program registers: the copy over the pinned connection and the bundle step on each
node that runs containerd, before anything that needs it; first-boot preparation without apt; the CNI manifest
from the bundle; the bundle's digest in the release; and the refusals that name the key.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from model.rules import ConfigError
from render.artifacts import BUNDLES_DIR, STAGE_DIR
from render.registry_mirror import CA_FILE, CERTS_DIR
from tests.bundles import entries_for, write_manifest
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import script_of

ROOT = Path(__file__).resolve().parents[2]
COPY = "command:remote:CopyToRemote"
KUBERNETES_NODES = ("dev-cp-1", "dev-cp-2", "dev-cp-3", "dev-worker-1")
CA = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQk\n-----END CERTIFICATE-----\n"


@cache
def bundle_dir() -> tuple[Path, str]:
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="kubeadm-ha-bundle-test-")) / "k8s-1.37.2"
    return directory, write_manifest(directory, entries_for("calico"))


def config_with(artifacts: dict[str, Any]) -> dict[str, Any]:
    config = load_stack_config(ROOT, "dev")
    config["kubeadm-ha:artifacts"] = artifacts
    return config


def bundle_artifacts(sha256: str | None = None) -> dict[str, Any]:
    directory, pinned = bundle_dir()
    return {"source": "bundle", "bundle": {"path": str(directory), "sha256": sha256 or pinned}}


@cache
def from_bundle() -> Evaluation:
    return evaluate("dev", project_dir=ROOT, config=config_with(bundle_artifacts()))


@cache
def with_mirror() -> Evaluation:
    mirror = {"registries": {"registry.k8s.io": "https://mirror.corp:5000", "docker.io": "https://harbor.corp/v2/hub"}}
    return evaluate("dev", project_dir=ROOT, config=config_with({"registryMirror": {**mirror, "caCertificate": CA}}))


def test_every_containerd_node_gets_the_bundle_copied_over_its_pinned_connection_then_installed() -> None:
    ev = from_bundle()
    _, sha256 = bundle_dir()
    copies = {r.name: r for r in ev.resources if r.type == COPY}
    assert sorted(copies) == sorted(f"{host}-bundle-copy" for host in KUBERNETES_NODES)
    for host in KUBERNETES_NODES:
        copy = copies[f"{host}-bundle-copy"]
        assert copy.inputs["remotePath"] == f"{STAGE_DIR}/{sha256}"
        assert copy.inputs["connection"]["hostKey"], "the copy must pin the node's host key"
        assert "connection" in copy.secret_inputs
        assert copy.inputs["triggers"] == [ev.named(f"{host}-domain").id]
        install = ev.named(f"{host}-bundle")
        assert ev.depends_on(install, copy) and ev.depends_on(copy, f"{host}-ready")
        script = script_of(install)
        assert f'"$(cat {BUNDLES_DIR}/installed 2>/dev/null)" = {sha256}' in script
        assert "ctr --address /run/containerd/containerd.sock --namespace k8s.io images import" in script
    assert ev.depends_on("dev-cp-1-kubeadm-init", "dev-cp-1-bundle")
    assert ev.depends_on("dev-worker-1-kubeadm-join", "dev-worker-1-bundle")
    assert not [r for r in ev.resources if r.name.startswith("dev-lb-") and r.name.endswith("-bundle")]


def test_a_worker_imports_no_control_plane_image_and_a_control_plane_all() -> None:
    ev = from_bundle()
    worker = script_of(ev.named("dev-worker-1-bundle"))
    control_plane = script_of(ev.named("dev-cp-1-bundle"))
    assert "kube-apiserver" not in worker and "registry.k8s.io/kube-proxy:v1.37.2" in worker
    for image in ("kube-apiserver:v1.37.2", "etcd:3.7.0-0", "coredns/coredns:v1.14.6", "pause:3.10.2"):
        assert f"registry.k8s.io/{image}" in control_plane


def test_first_boot_installs_nothing_from_the_network_and_the_cni_comes_from_the_bundle() -> None:
    ev = from_bundle()
    for disk in (r for r in ev.resources if r.type == "libvirt:index/cloudInitDisk:CloudInitDisk"):
        user_data = disk.inputs["userData"]
        assert "apt-get" not in user_data and "pkgs.k8s.io" not in user_data, disk.name
    cni = script_of(ev.named("dev-cp-1-cni-calico"))
    assert "curl" not in cni and "raw.githubusercontent.com" not in cni
    assert f"{BUNDLES_DIR}/{bundle_dir()[1]}/manifests/calico.yaml" in cni


def test_the_release_carries_the_bundle_digest_and_a_second_evaluation_is_identical() -> None:
    ev = from_bundle()
    assert ev.outputs["release"].value["artifactBundle"] == bundle_dir()[1]
    again = evaluate("dev", project_dir=ROOT, config=config_with(bundle_artifacts()))
    for host in KUBERNETES_NODES:
        for name in (f"{host}-bundle-copy", f"{host}-bundle"):
            assert again.named(name).inputs == ev.named(name).inputs, name


def test_another_bundle_than_the_pinned_one_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        evaluate("dev", project_dir=ROOT, config=config_with(bundle_artifacts("0" * 64)))
    assert "artifacts.bundle:" in str(refused.value) and "artifacts.bundle.sha256" in str(refused.value)


def test_a_bundle_without_kubeadm_for_the_stack_version_is_refused_before_any_resource(tmp_path: Path) -> None:
    entries = [entry for entry in entries_for("calico") if entry.name != "kubeadm"]
    sha256 = write_manifest(tmp_path / "b", entries)
    artifacts = {"source": "bundle", "bundle": {"path": str(tmp_path / "b"), "sha256": sha256}}
    with pytest.raises(ConfigError) as refused:
        evaluate("dev", project_dir=ROOT, config=config_with(artifacts))
    assert "binary kubeadm is not in the bundle" in str(refused.value)


def test_an_upgrade_of_a_bundle_installed_cluster_takes_kubeadm_and_kubelet_from_the_bundle_in_kubeadms_order() -> None:
    ev = evaluate(
        "dev",
        project_dir=ROOT,
        config=config_with(bundle_artifacts()),
        previous_outputs={"kubernetesVersion": "1.36.3"},
    )
    where = f"{BUNDLES_DIR}/{bundle_dir()[1]}"
    for host in KUBERNETES_NODES:
        upgrade = script_of(ev.named(f"{host}-upgrade-1.37.2"))
        assert "apt-get" not in upgrade and "pkgs.k8s.io" not in upgrade
        kubeadm = upgrade.index(f"install -m 0755 {where}/bin/kubeadm /usr/bin/kubeadm")
        kubelet = upgrade.index(f"install -m 0755 {where}/bin/kubelet /usr/bin/kubelet")
        assert kubeadm < upgrade.index("kubeadm upgrade") < kubelet
        # The bundle step leaves the running version to it.
        bundle = script_of(ev.named(f"{host}-bundle"))
        assert "is another version than v1.37.2: the upgrade step replaces it" in bundle


def test_the_registry_mirror_step_points_each_registry_at_the_mirror_only() -> None:
    ev = with_mirror()
    assert not [r for r in ev.resources if r.type == COPY]
    for host in KUBERNETES_NODES:
        step = ev.named(f"{host}-registry-mirror")
        assert ev.depends_on(step, f"{host}-ready")
        script = script_of(step)
        assert f"{CERTS_DIR}/registry.k8s.io/hosts.toml" in script and CA_FILE in script
        assert 'server = "https://mirror.corp:5000"' in script and "override_path = true" in script
    assert ev.depends_on("dev-cp-1-kubeadm-init", "dev-cp-1-registry-mirror")
    assert "dev-lb-1-registry-mirror" not in {r.name for r in ev.resources}
