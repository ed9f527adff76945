"""cloud-init itself accepts every document we would put on a seed disk, for every node of every stack.

user-data: `cloud-init schema --config-file FILE` (Debian package `cloud-init`), with no error and no
deprecation. network-config: cloud-init's own parser must turn it into a network state and render it
(`cloud-init devel net-convert`), and where the installed cloud-init can (>= 23.x, `--schema-type`),
`cloud-init schema --schema-type network-config` must accept it too.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components.cloudinit import (
    NODE_INTERFACE,
    node_identity,
    render_meta_data,
    render_network_config,
    render_user_data,
)
from components.node_prep import preparation_for
from tests.integration.conftest import require_programs
from tests.integration.rendered import stack_nodes

pytestmark = pytest.mark.integration

NODES = [pytest.param(stack, config, node, id=f"{stack}/{node.hostname}") for stack, config, node in stack_nodes()]


def _cloud_init() -> str:
    """Debian package `cloud-init`; missing, it skips locally and fails under CI=true."""
    return require_programs("cloud-init")["cloud-init"]


@functools.cache
def _host_key() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + "\n"


def _operator_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " operator"


def _identity(config, node):
    private, public = _host_key()
    return node_identity(
        node,
        config,
        authorized_keys=(_operator_key(),),
        host_key_private_openssh=private,
        host_key_public_openssh=public,
    )


def _run(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(words), capture_output=True, text=True, timeout=120, check=False)


@functools.cache
def _schema_help() -> str:
    return _run(_cloud_init(), "schema", "--help").stdout


@pytest.mark.parametrize(("stack", "config", "node"), NODES)
def test_user_data_passes_the_cloud_config_schema(tmp_path: Path, stack, config, node):
    cloud_init = _cloud_init()
    preparation = preparation_for(node.role, node.hostname, config).render()
    user_data = tmp_path / "user-data"
    user_data.write_text(render_user_data(_identity(config, node), preparation))
    result = _run(cloud_init, "schema", "--config-file", str(user_data))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Valid" in output, output
    assert "deprecated" not in output.lower(), output


@pytest.mark.parametrize(("stack", "config", "node"), NODES)
def test_network_config_is_understood_by_cloud_init(tmp_path: Path, stack, config, node):
    cloud_init = _cloud_init()
    identity = _identity(config, node)
    network_config = tmp_path / "network-config"
    network_config.write_text(render_network_config(identity.mac))

    if "--schema-type" in _schema_help():
        result = _run(cloud_init, "schema", "--schema-type", "network-config", "--config-file", str(network_config))
        assert result.returncode == 0, result.stdout + result.stderr

    # Parsed into cloud-init's network state and rendered for systemd-networkd: the MAC match and DHCPv4.
    networkd = tmp_path / "networkd"
    result = _run(
        cloud_init, "devel", "net-convert", "--network-data", str(network_config), "--kind", "yaml",
        "--directory", str(networkd), "--distro", "ubuntu", "--output-kind", "networkd",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = "\n".join(path.read_text() for path in sorted(networkd.rglob("*")) if path.is_file())
    assert f"MACAddress={node.mac}" in rendered, rendered
    assert f"Name={NODE_INTERFACE}" in rendered, rendered
    assert "DHCP=ipv4" in rendered, rendered

    # Rendered for netplan (what Ubuntu uses): the v2 document passes through intact.
    netplan = tmp_path / "netplan"
    result = _run(
        cloud_init, "devel", "net-convert", "--network-data", str(network_config), "--kind", "yaml",
        "--directory", str(netplan), "--distro", "ubuntu", "--output-kind", "netplan",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (netplan_file,) = [path for path in netplan.rglob("*.yaml")]
    assert yaml.safe_load(netplan_file.read_text()) == yaml.safe_load(network_config.read_text())


@pytest.mark.parametrize(("stack", "config", "node"), NODES)
def test_meta_data_is_yaml_naming_the_node(stack, config, node):
    data = yaml.safe_load(render_meta_data(_identity(config, node).hostname))
    assert data["local-hostname"] == node.hostname
    assert data["instance-id"].endswith(node.hostname)
