"""The domain's NIC address as the real libvirt provider reads it back, against the program's ignore_changes.

terraform-provider-libvirt 0.8.1 reads a NIC's `addresses` from the network's DHCP leases; a domain created
without waiting for its lease (as every node is) reads back none. The program ignores that path
(components/vm.py DOMAIN_IGNORE_CHANGES). With the real CLI and pulumi-libvirt this checks that the ignore
actually holds: a preview right after the create plans nothing. `networkInterfaces[*].addresses` failed here
(an `update` of the domain, `networkInterfaces[0].addresses: update, inputDiff false`), which the full lab saw
as an update of every new domain on the next `pulumi up`. About a minute; no guest boots (the domain is
defined but not started, so it has no lease either).
"""

from __future__ import annotations

import json
import os

from components.vm import DOMAIN_IGNORE_CHANGES
from tests.real.engine.lab_stack import LabStack
from tests.real.engine.libvirtd import isolated_libvirtd

PROGRAM = """\
import json, os
import pulumi, pulumi_libvirt as libvirt

provider = libvirt.Provider("local", uri=os.environ["LAB_URI"])
network = libvirt.Network(
    "net", name="readback-net", mode="nat", addresses=["10.17.8.0/24"],
    dhcp=libvirt.NetworkDhcpArgs(enabled=True), opts=pulumi.ResourceOptions(provider=provider),
)
libvirt.Domain(
    "node", name="readback-node", type="qemu", memory=64, vcpu=1, running=False,
    network_interfaces=[libvirt.DomainNetworkInterfaceArgs(
        network_id=network.id, hostname="readback-node", addresses=["10.17.8.11"], mac="52:54:00:11:08:0b",
        wait_for_lease=False,
    )],
    opts=pulumi.ResourceOptions(provider=provider, ignore_changes=json.loads(os.environ["LAB_IGNORE"])),
)
"""


class _Stack(LabStack):
    uri = ""

    def env(self) -> dict[str, str]:
        return {**super().env(), "LAB_URI": self.uri, "LAB_IGNORE": json.dumps(DOMAIN_IGNORE_CHANGES)}


def test_a_domain_created_without_its_lease_previews_no_change() -> None:
    with isolated_libvirtd("kubeadm-ha-readback-", f"kha-rb-{os.getpid()}") as (directory, lv):
        stack = _Stack(directory / "pulumi", "readback", lv.prefix())
        stack.uri = lv.uri
        stack.setup_program({"main.py": PROGRAM}, plugins=("libvirt",))
        try:
            up = stack.pulumi("up", "--yes", "--json", timeout=300)
            assert up.returncode == 0, up.describe()
            preview = stack.pulumi("preview", "--json", "--expect-no-changes", timeout=300)
            changed = [
                {"op": step["op"], "urn": step["urn"], "detailedDiff": step.get("detailedDiff")}
                for step in preview.documents()[-1].get("steps", [])
                if step["op"] != "same"
            ]
            assert preview.returncode == 0 and changed == [], json.dumps(changed, indent=1)
        finally:
            stack.pulumi("destroy", "--yes", timeout=300)
