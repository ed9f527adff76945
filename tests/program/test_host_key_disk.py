"""Issue 19, part 6: no node's SSH host private key is an input of any libvirt resource.

terraform-provider-libvirt 0.8.1 logs a cloud-init disk's user-data when it creates and reads it, and the
bridge hands every such line to the engine as a debug diagnostic (render/hostkey_disk.py names the lines);
the real engine lab found the keys in `--event-log` (tests/real/engine/test_engine_up.py, secrets scan).
The key now goes on a raw volume made from a file a secret-stdin step writes, whose bytes the provider never
logs. These tests read what the program registers under mocks; the boot itself is judged by the engine lab
(real libvirt, real cloud-init, SSH pinned to the key).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from model.rules import ConfigError
from render.hostkey_disk import HOST_KEY_DISK_BYTES
from tests.stacks import evaluated
from tools.offline import Evaluation, evaluate

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "libvirt:index/domain:Domain"

LIBVIRT = "libvirt:"
COMMAND = "command:local:Command"
STACKS = ["dev", "staging", "prod", "prod-multihost"]


def private_keys(ev: Evaluation) -> dict[str, str]:
    """Every node's host private key body (the base64 lines), by hostname."""
    found = {}
    for key in ev.by_type("tls:index/privateKey:PrivateKey"):
        if key.name.endswith("-ssh-host-key"):
            found[key.name.removesuffix("-ssh-host-key")] = key.outputs["privateKeyOpenssh"].strip().splitlines()[1]
    return found


def domains(ev: Evaluation) -> list:
    return ev.by_type("libvirt:index/domain:Domain")


@pytest.mark.parametrize("stack", STACKS)
def test_no_libvirt_resource_is_given_a_private_key(stack: str) -> None:
    ev = evaluated(stack)
    keys = private_keys(ev)
    assert len(keys) == len(domains(ev)) > 0
    for resource in ev.resources:
        if resource.type.startswith(LIBVIRT):
            text = repr(resource.inputs)
            assert "PRIVATE KEY" not in text, resource.name
            assert not [host for host, body in keys.items() if body in text], resource.name


@pytest.mark.parametrize("stack", STACKS)
def test_each_node_boots_with_its_key_disk_written_before_and_removed_after(stack: str) -> None:
    ev = evaluated(stack)
    keys = private_keys(ev)
    for domain in domains(ev):
        host = domain.name.removesuffix("-domain")
        write, volume = ev.named(f"{host}-host-key-disk"), ev.named(f"{host}-host-key")
        cleanup = ev.named(f"{host}-host-key-disk-cleanup")
        # The key reaches the file on stdin only, a secret; the script names the file, never the key.
        assert "stdin" in write.secret_inputs and keys[host] in write.inputs["stdin"]
        assert keys[host] not in write.inputs["create"] and {"stdout", "stderr"} <= set(write.additional_secret_outputs)
        assert volume.inputs["source"] in write.inputs["create"] and volume.inputs["format"] == "raw"
        assert f"truncate -s {HOST_KEY_DISK_BYTES}" in write.inputs["create"]
        assert ev.depends_on(volume, write) and ev.depends_on(cleanup, volume)
        assert volume.inputs["source"] in cleanup.inputs["create"] and "rm -f" in cleanup.inputs["create"]
        # Read only at create (the provider), and the path is under the home of whoever runs Pulumi.
        assert "source" in volume.ignore_changes
        # The second disk: the node reads /dev/vdb.
        assert [disk["volumeId"] for disk in domain.inputs["disks"]][1:] == [volume.id]
        assert ev.depends_on(domain, volume)


def test_a_stack_whose_domains_have_no_key_disk_is_refused_before_anything_is_replaced() -> None:
    """A stack deployed by a program from before the key disk: adding the disk would replace every domain at once
    (terraform-provider-libvirt 0.8.1 `disk` ForceNew), and each node's steps with it. The run is refused."""
    first = evaluate("dev", project_dir=ROOT)
    outputs = {name: out.value for name, out in first.outputs.items()}
    state = first.state()
    assert evaluate("dev", project_dir=ROOT, previous_outputs=outputs, previous_resources=state).resources
    old = copy.deepcopy(state)
    for entry in old.values():
        if entry["type"] == DOMAIN:
            entry["outputs"]["disks"] = entry["outputs"]["disks"][:1]  # as the earlier program made it
    with pytest.raises(ConfigError) as refused:
        evaluate("dev", project_dir=ROOT, previous_outputs=outputs, previous_resources=old)
    message = str(refused.value)
    hosts = sorted(domain.inputs["name"] for domain in domains(first))
    assert "nodes: " + ", ".join(hosts) + " run on domains made without a key disk" in message, message
    assert "--find-revision" in message
