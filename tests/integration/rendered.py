"""Every script the program can send to a node, rendered for every stack file, for the static checks.

To check a new kind of script, add its generator to `all_rendered_scripts`.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.addressing import NodePlan, plan_addresses
from model.artifacts import RegistryMirrorConfig
from model.bundle import Manifest
from model.config import ClusterConfig
from render.artifacts import BundleInstall, bundle_install_script
from render.lifecycle import upgrade_node_script
from render.node_prep import preparation_for
from render.registry_mirror import registry_mirror_script
from tests.bundles import entries_for
from tests.integration.tool_scripts import operator_tool_scripts
from tests.stacks import ALL_STACKS, STACK_FILES, evaluated, stack_config
from tools.graph import REMOTE_STEP
from tools.plan import script_of

LOCAL_STEP = "command:local:Command"


def stack_nodes() -> Iterator[tuple[str, ClusterConfig, NodePlan]]:
    """(stack, config, node) for every planned node of every stack file."""
    for stack in STACK_FILES:
        config = stack_config(stack)
        for node in plan_addresses(config).nodes:
            yield stack, config, node


def node_preparation_scripts() -> Iterator[tuple[str, str]]:
    for stack, config, node in stack_nodes():
        script = preparation_for(node.role, node.hostname, config.kubernetes)
        yield f"{stack}/{node.hostname}/{script.step}", script.render()


def remote_step_scripts() -> Iterator[tuple[str, str]]:
    """Every remote step the program registers (create and delete), for every stack and extra shape."""
    for stack in ALL_STACKS:
        for step in evaluated(stack).by_type(REMOTE_STEP):
            if step.inputs.get("create"):  # a step that exists for its delete has none
                yield f"{stack}/{step.name}", script_of(step)
            if step.inputs.get("delete"):
                yield f"{stack}/{step.name}/delete", script_of(step, "delete")


def local_step_scripts() -> Iterator[tuple[str, str]]:
    """Every step the machine running Pulumi runs itself (the base image fetch), for every stack and shape."""
    for stack in ALL_STACKS:
        for step in evaluated(stack).by_type(LOCAL_STEP):
            for phase in ("create", "delete"):
                if step.inputs.get(phase):
                    yield f"{stack}/{step.name}/{phase}", step.inputs[phase]


def air_gapped_scripts() -> Iterator[tuple[str, str]]:
    """The scripts of an air-gapped install (render/artifacts.py, render/registry_mirror.py, bundle-mode
    preparation and upgrade) for dev: a stack file cannot carry a bundle, which must exist where it points."""
    config = stack_config("dev")
    manifest = Manifest(config.kubernetes.version, "amd64", tuple(entries_for(config.kubernetes.cni, etcdctl=True)))
    mirror = RegistryMirrorConfig.model_validate(
        {
            "registries": {"registry.k8s.io": "https://m.corp:5000", "docker.io": "https://h.corp/v2/hub"},
            "caCertificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        }
    )
    for role in ("cp", "worker", "etcd"):
        install = BundleInstall(manifest, "a" * 64, "bundle", role == "worker", role, external_etcd=role == "etcd")
        yield f"air-gapped/{role}/bundle", bundle_install_script(f"dev-{role}-1", install).render()
    for role in ("cp", "worker", "etcd", "lb"):
        script = preparation_for(role, f"dev-{role}-1", config.kubernetes, from_bundle=True)  # type: ignore[arg-type]
        yield f"air-gapped/{role}/node-prep", script.render()
    yield "air-gapped/registry-mirror", registry_mirror_script("dev-cp-1", mirror, "3.10.2").render()
    bundled = {name: f"/var/lib/kubeadm-ha/bundle/{'a' * 64}/bin/{name}" for name in ("kubeadm", "kubelet", "kubectl")}
    upgrade = upgrade_node_script("dev-cp-1", config.kubernetes, first_control_plane=True, bundled=bundled)
    yield "air-gapped/upgrade", upgrade.render()


def all_rendered_scripts() -> list[tuple[str, str]]:
    """(unique name, script text) pairs: every script `bash -n` and shellcheck must accept."""
    scripts: list[tuple[str, str]] = []
    scripts.extend(node_preparation_scripts())
    scripts.extend(remote_step_scripts())
    scripts.extend(local_step_scripts())
    scripts.extend(operator_tool_scripts())
    scripts.extend(air_gapped_scripts())
    names = [name for name, _ in scripts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise AssertionError(f"script names must be unique: {duplicates}")
    return scripts
