"""The NoCloud documents, parsed back: what each one must (and must not) say."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from model.addressing import NodePlan
from model.stack import parse_config
from render.cloudinit import (
    NODE_INTERFACE,
    PREPARATION_PATH,
    NodeIdentity,
    StaticAddress,
    node_identity,
    render_meta_data,
    render_network_config,
    render_user_data,
)

PREPARATION = "#!/usr/bin/env bash\nset -euo pipefail\necho 'prepare: \"quoted\" # not a comment'\n"
OPERATOR_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq1Bq0aXJ3dFb4bLmtl5NBXKNgpeIcnHHbFbm8Ndd5e operator: #1"


def _host_key() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


HOST_PRIVATE, HOST_PUBLIC = _host_key()


def _identity(**changes: object) -> NodeIdentity:
    values: dict[str, object] = {
        "hostname": "dev-cp-1",
        "fqdn": "dev-cp-1.k8s.internal",
        "mac": "52:54:00:11:03:1f",
        "ssh_user": "kube",
        "authorized_keys": (OPERATOR_KEY,),
        "host_key_public_openssh": HOST_PUBLIC + "\n",  # as pulumi-tls returns it
    }
    values.update(changes)
    return NodeIdentity(**values)  # type: ignore[arg-type]


def _user_data(identity: NodeIdentity | None = None, preparation: str = PREPARATION) -> dict:
    text = render_user_data(identity or _identity(), preparation)
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def _walk(value: object, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}", key
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    else:
        yield path, value


def test_host_key_is_the_pinned_ed25519_key_and_the_only_one():
    data = _user_data()
    # Only the public half: the private one comes from the key disk, installed by `bootcmd`, which deletes
    # the image's keys itself (tests/unit/test_hostkey_disk.py runs it), so the `ssh` module deletes nothing.
    assert data["ssh_keys"] == {"ed25519_public": HOST_PUBLIC}
    assert data["ssh_deletekeys"] is False
    assert data["ssh_genkeytypes"] == ["ed25519"]
    assert len(data["bootcmd"]) == 1 and "/dev/vdb" in data["bootcmd"][0]
    sshd = next(item for item in data["write_files"] if item["path"].startswith("/etc/ssh/sshd_config.d/"))
    assert sshd["content"] == "HostKey /etc/ssh/ssh_host_ed25519_key\n"


def test_no_private_key_and_no_password_anywhere():
    # The libvirt provider logs user-data into the engine's debug diagnostics (render/hostkey_disk.py).
    text = render_user_data(_identity(), PREPARATION)
    assert "PRIVATE KEY" not in text
    data = yaml.safe_load(text)
    keys = {key for _, key in _walk(data) if isinstance(key, str)}
    assert not keys & {"password", "passwd", "hashed_passwd", "plain_text_passwd", "chpasswd"}
    assert data["ssh_pwauth"] is False
    assert data["disable_root"] is True


def test_operator_user_is_key_only_with_passwordless_sudo():
    data = _user_data()
    assert len(data["users"]) == 1  # no `default`: the image's `ubuntu` user is not created
    user = data["users"][0]
    assert user["name"] == "kube"
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [OPERATOR_KEY]  # a comment with ": #" survives intact


def test_hostname_and_hosts():
    data = _user_data()
    assert data["hostname"] == "dev-cp-1"
    assert data["fqdn"] == "dev-cp-1.k8s.internal"
    assert data["manage_etc_hosts"] is True


def test_preparation_script_is_delivered_verbatim_and_run():
    data = _user_data()
    (script,) = [item for item in data["write_files"] if item["path"] == PREPARATION_PATH]
    assert PREPARATION_PATH.startswith("/usr/local/sbin/")
    assert script["content"] == PREPARATION
    assert script["permissions"] == "0700"
    assert script["owner"] == "root:root"
    assert data["runcmd"] == [[PREPARATION_PATH]]


def test_user_data_is_deterministic():
    first = render_user_data(_identity(), PREPARATION)
    assert render_user_data(_identity(), PREPARATION) == first
    assert render_user_data(dataclasses.replace(_identity()), PREPARATION) == first
    assert render_meta_data("dev-cp-1") == render_meta_data("dev-cp-1")
    assert render_network_config("52:54:00:11:03:1f") == render_network_config("52:54:00:11:03:1f")


def test_yaml_special_text_round_trips():
    tricky = PREPARATION + "key: value\n- item\n--- \n...\n'\"\\\n\ttab\n"
    assert _user_data(preparation=tricky)["write_files"][1]["content"] == tricky


def test_meta_data_instance_id_is_stable_and_per_host():
    data = yaml.safe_load(render_meta_data("dev-cp-1"))
    assert data == {"instance-id": "iid-kubeadm-ha-dev-cp-1", "local-hostname": "dev-cp-1"}
    other = yaml.safe_load(render_meta_data("dev-cp-2"))
    assert other["instance-id"] != data["instance-id"]


def test_network_config_matches_the_mac_and_names_eth0():
    data = yaml.safe_load(render_network_config(_identity().mac))
    network = data["network"]
    assert network["version"] == 2
    assert list(network["ethernets"]) == [NODE_INTERFACE] == ["eth0"]
    eth0 = network["ethernets"]["eth0"]
    assert eth0["match"] == {"macaddress": "52:54:00:11:03:1f"}
    assert eth0["set-name"] == "eth0"
    assert eth0["dhcp4"] is True
    assert eth0["dhcp6"] is False
    assert "addresses" not in eth0  # the address comes from the libvirt DHCP reservation


def test_a_bridged_node_gets_its_static_address_route_and_name_servers():
    static = StaticAddress(
        ipaddress.IPv4Interface("10.40.0.31/24"),
        ipaddress.IPv4Address("10.40.0.1"),
        (ipaddress.IPv4Address("10.40.0.2"), ipaddress.IPv4Address("9.9.9.9")),
    )
    eth0 = yaml.safe_load(render_network_config("52:54:00:28:00:1f", static))["network"]["ethernets"]["eth0"]
    assert eth0 == {
        "match": {"macaddress": "52:54:00:28:00:1f"},
        "set-name": "eth0",
        "dhcp4": False,
        "dhcp6": False,
        "addresses": ["10.40.0.31/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "10.40.0.1"}],
        "nameservers": {"addresses": ["10.40.0.2", "9.9.9.9"]},
    }


@pytest.mark.parametrize(
    ("gateway", "dns", "message"),
    [("10.41.0.1", ("10.40.0.2",), "gateway"), ("10.40.0.31", ("10.40.0.2",), "gateway"), ("10.40.0.1", (), "name")],
)
def test_a_static_address_without_a_reachable_gateway_or_dns_is_refused(gateway, dns, message):
    with pytest.raises(ValueError, match=message):
        StaticAddress(
            ipaddress.IPv4Interface("10.40.0.31/24"),
            ipaddress.IPv4Address(gateway),
            tuple(ipaddress.IPv4Address(server) for server in dns),
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hostname": "Dev_CP"}, "hostname"),
        ({"hostname": "a\nb"}, "hostname"),
        ({"fqdn": "other.k8s.internal"}, "fqdn"),
        ({"mac": "52:54:00:11:03:1F"}, "mac"),
        ({"authorized_keys": ()}, "no authorized keys"),
        ({"authorized_keys": ("ssh-ed25519 AAAA\nssh-rsa BBBB",)}, "authorized key 0"),
        ({"host_key_public_openssh": "ssh-rsa AAAAB3NzaC1yc2E="}, "ssh-ed25519"),
    ],
)
def test_invalid_identity_is_refused(changes: dict, message: str):
    with pytest.raises(ValueError, match=message) as error:
        _identity(**changes)
    assert HOST_PRIVATE.strip().splitlines()[1] not in str(error.value)


def test_user_data_refuses_a_non_script():
    with pytest.raises(ValueError, match="#!"):
        render_user_data(_identity(), "apt-get install x")


def test_node_identity_from_plan():
    config = parse_config(
        {"network": {"cidr": "10.17.3.0/24", "domain": "lab.example"}, "ssh": {"user": "ops"}}, stack="dev"
    )
    node = NodePlan(hostname="dev-worker-1", role="worker", index=1, address=config.vip, mac="52:54:00:11:03:33")
    identity = node_identity(
        node,
        domain=config.network.domain,
        ssh_user=config.ssh.user,
        authorized_keys=(OPERATOR_KEY,),
        host_key_public_openssh=HOST_PUBLIC,
    )
    assert (identity.hostname, identity.fqdn, identity.mac, identity.ssh_user) == (
        "dev-worker-1",
        "dev-worker-1.lab.example",
        "52:54:00:11:03:33",
        "ops",
    )
