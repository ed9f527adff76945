"""cloud-init itself accepts every document we would put on a seed disk, for every node of every stack.

user-data: `cloud-init schema --config-file FILE` (Debian package `cloud-init`), with no error and no
deprecation. network-config: cloud-init's own parser must turn it into a network state and render it
(`cloud-init devel net-convert`), and where the installed cloud-init can (>= 23.x, `--schema-type`),
`cloud-init schema --schema-type network-config` must accept it too.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from pathlib import Path

import pytest
import yaml

from render.cloudinit import NODE_INTERFACE
from tests.integration.conftest import require_programs
from tests.stacks import ALL_STACKS, STACK_FILES, evaluated

pytestmark = pytest.mark.integration

CLOUD_INIT_DISK = "libvirt:index/cloudInitDisk:CloudInitDisk"


@dataclasses.dataclass(frozen=True)
class SeedDisk:
    """The three documents of one node's cloud-init disk, exactly as the program registers them."""

    hostname: str
    mac: str
    user_data: str
    meta_data: str
    network_config: str


def seed_disks(stacks: tuple[str, ...]) -> list:
    params = []
    for stack in stacks:
        for disk in evaluated(stack).by_type(CLOUD_INIT_DISK):
            hostname = disk.name.removesuffix("-cloud-init")
            network = yaml.safe_load(disk.inputs["networkConfig"])
            mac = network["network"]["ethernets"][NODE_INTERFACE]["match"]["macaddress"]
            seed = SeedDisk(
                hostname, mac, disk.inputs["userData"], disk.inputs["metaData"], disk.inputs["networkConfig"]
            )
            params.append(pytest.param(seed, id=f"{stack}/{hostname}"))
    return params


def _cloud_init() -> str:
    """Debian package `cloud-init`; missing, it skips locally and fails under CI=true."""
    return require_programs("cloud-init")["cloud-init"]


def _run(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(words), capture_output=True, text=True, timeout=120, check=False)


@functools.cache
def _schema_help() -> str:
    return _run(_cloud_init(), "schema", "--help").stdout


@pytest.mark.parametrize("seed", seed_disks(ALL_STACKS))
def test_user_data_passes_the_cloud_config_schema(tmp_path: Path, seed: SeedDisk) -> None:
    cloud_init = _cloud_init()
    user_data = tmp_path / "user-data"
    user_data.write_text(seed.user_data)
    result = _run(cloud_init, "schema", "--config-file", str(user_data))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Valid" in output, output
    assert "deprecated" not in output.lower(), output


# One stack's nodes differ only by MAC here, so the (slow) converter runs for the stack files only.
@pytest.mark.parametrize("seed", seed_disks(STACK_FILES))
def test_network_config_is_understood_by_cloud_init(tmp_path: Path, seed: SeedDisk) -> None:
    cloud_init = _cloud_init()
    network_config = tmp_path / "network-config"
    network_config.write_text(seed.network_config)

    if "--schema-type" in _schema_help():
        result = _run(cloud_init, "schema", "--schema-type", "network-config", "--config-file", str(network_config))
        assert result.returncode == 0, result.stdout + result.stderr

    # Parsed into cloud-init's network state and rendered for systemd-networkd: the MAC match, and DHCPv4 or
    # (bridged LAN) the static address, default route and name servers.
    networkd = tmp_path / "networkd"
    result = _run(
        cloud_init, "devel", "net-convert", "--network-data", str(network_config), "--kind", "yaml",
        "--directory", str(networkd), "--distro", "ubuntu", "--output-kind", "networkd",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = "\n".join(path.read_text() for path in sorted(networkd.rglob("*")) if path.is_file())
    assert f"MACAddress={seed.mac}" in rendered, rendered
    assert f"Name={NODE_INTERFACE}" in rendered, rendered
    ethernet = yaml.safe_load(seed.network_config)["network"]["ethernets"][NODE_INTERFACE]
    if "addresses" not in ethernet:
        assert "DHCP=ipv4" in rendered, rendered
    else:
        assert "DHCP=no" in rendered, rendered
        assert f"Address={ethernet['addresses'][0]}" in rendered, rendered
        assert "Destination=0.0.0.0/0" in rendered, rendered
        assert f"Gateway={ethernet['routes'][0]['via']}" in rendered, rendered
        assert "DNS=" + " ".join(ethernet["nameservers"]["addresses"]) in rendered, rendered

    # Rendered for netplan (what Ubuntu uses): the v2 document passes through intact.
    netplan = tmp_path / "netplan"
    result = _run(
        cloud_init, "devel", "net-convert", "--network-data", str(network_config), "--kind", "yaml",
        "--directory", str(netplan), "--distro", "ubuntu", "--output-kind", "netplan",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (netplan_file,) = [path for path in netplan.rglob("*.yaml")]
    assert yaml.safe_load(netplan_file.read_text()) == yaml.safe_load(network_config.read_text())


@pytest.mark.parametrize("seed", seed_disks(STACK_FILES))
def test_meta_data_is_yaml_naming_the_node(seed: SeedDisk) -> None:
    data = yaml.safe_load(seed.meta_data)
    assert data["local-hostname"] == seed.hostname
    assert data["instance-id"].endswith(seed.hostname)
