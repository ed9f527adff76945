"""What the last deployment of this stack left behind, read before anything is registered.

Some changes are only safe relative to what is running (a Kubernetes minor may
not be skipped; the etcd topology of a live cluster cannot be swapped), so the
program reads its own stack's last outputs through the engine's built-in
`pulumi:pulumi:readStackOutputs` function. It is a synchronous invoke, so the
check happens at the edge, with config validation, before any resource exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi

READ_STACK_OUTPUTS = "pulumi:pulumi:readStackOutputs"

# Output names the program exports so the next run can read them back.
KUBERNETES_VERSION_OUTPUT = "kubernetesVersion"
NODES_OUTPUT = "nodes"
API_ENDPOINT_OUTPUT = "apiEndpoint"
ETCD_TOPOLOGY_OUTPUT = "etcdTopology"
ETCD_INITIAL_MEMBERS_OUTPUT = "etcdInitialMembers"
ETCD_MEMBERS_OUTPUT = "etcdMembers"
ETCD_IMAGE_TAG_OUTPUT = "etcdImageTag"
DEPLOYMENT_ID_OUTPUT = "deploymentId"
NETWORK_MODE_OUTPUT = "networkMode"


@dataclass(frozen=True)
class PreviousDeployment:
    outputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return bool(self.outputs)

    @property
    def kubernetes_version(self) -> str | None:
        value = self.outputs.get(KUBERNETES_VERSION_OUTPUT)
        return str(value) if value else None

    @property
    def node_names(self) -> tuple[str, ...] | None:
        value = self.outputs.get(NODES_OUTPUT)
        return tuple(sorted(value)) if isinstance(value, dict) else None

    @property
    def etcd_topology(self) -> str | None:
        value = self.outputs.get(ETCD_TOPOLOGY_OUTPUT)
        return str(value) if value else None

    @property
    def etcd_initial_members(self) -> tuple[str, ...] | None:
        value = self.outputs.get(ETCD_INITIAL_MEMBERS_OUTPUT)
        return tuple(str(item) for item in value) if value else None

    @property
    def etcd_members(self) -> tuple[str, ...] | None:
        """The external etcd members the last deployment planned (None: unknown, e.g. a new stack)."""
        value = self.outputs.get(ETCD_MEMBERS_OUTPUT)
        return tuple(str(item) for item in value) if value else None

    @property
    def etcd_image_tag(self) -> str | None:
        """The registry.k8s.io/etcd tag the external etcd members were last deployed with."""
        value = self.outputs.get(ETCD_IMAGE_TAG_OUTPUT)
        return str(value) if value else None

    @property
    def deployment_id(self) -> str | None:
        value = self.outputs.get(DEPLOYMENT_ID_OUTPUT)
        return str(value) if value else None

    @property
    def node_addresses(self) -> dict[str, tuple[str, str | None]]:
        """hostname -> (address, MAC) of every node the last deployment ran (MAC: None before it was exported)."""
        value = self.outputs.get(NODES_OUTPUT)
        if not isinstance(value, dict):
            return {}
        found: dict[str, tuple[str, str | None]] = {}
        for name, node in value.items():
            if isinstance(node, dict) and node.get("address"):
                mac = node.get("mac")
                found[str(name)] = (str(node["address"]), str(mac).lower() if mac else None)
        return found

    @property
    def node_hypervisors(self) -> dict[str, str]:
        """hostname -> hypervisor of every node the last deployment ran (none before placement was exported)."""
        value = self.outputs.get(NODES_OUTPUT)
        if not isinstance(value, dict):
            return {}
        return {
            str(name): str(node["hypervisor"])
            for name, node in value.items()
            if isinstance(node, dict) and node.get("hypervisor")
        }

    @property
    def network_mode(self) -> str | None:
        """`nat` or `bridge`; a deployment from before the output existed could only be `nat`."""
        value = self.outputs.get(NETWORK_MODE_OUTPUT)
        if value:
            return str(value)
        return "nat" if self.exists else None

    @property
    def api_endpoint(self) -> str | None:
        value = self.outputs.get(API_ENDPOINT_OUTPUT)
        return str(value) if value else None


NEW_STACK = PreviousDeployment()


def read_previous_deployment() -> PreviousDeployment:
    """The outputs of this stack's last `pulumi up`; empty for a stack never deployed."""
    name = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
    try:
        result = pulumi.runtime.invoke(READ_STACK_OUTPUTS, {"name": name})
    except Exception as error:
        raise pulumi.RunError(
            f"could not read the last deployment's outputs of stack {name} ({error}); refusing to continue "
            "because version and topology changes are checked against them"
        ) from error
    outputs = (result.value or {}).get("outputs") or {}
    return PreviousDeployment(dict(outputs))
