"""What the last deployment of this stack left behind, read before anything is registered.

Some changes are only safe relative to what is running (a Kubernetes minor may
not be skipped; the etcd topology of a live cluster cannot be swapped), so the
program reads its own stack's last outputs through the engine's built-in
`pulumi:pulumi:readStackOutputs` function. It is a synchronous invoke, so the
check happens at the edge, with config validation, before any resource exists.

The outputs are those of the last run that succeeded: a failed run registers none, and the engine keeps
the old ones. What a failed run created is in the state, though: the engine persists each resource as its
step completes (pulumi v3.274.0 pkg/backend/snapshot.go, createSnapshotMutation.End). So every VM is
recorded, before its first disk is created, in a `pulumi.Stash` (components/vm.py: host, address, MAC),
and the program reads those records back from its own state with the engine's builtin
`pulumi:pulumi:readStackResourceOutputs` (pkg/resource/deploy/builtins.go; pkg/backend/backend.go
GetStackResourceOutputs: every resource of the stack's latest persisted snapshot not pending deletion, on
the file and cloud backends alike). A Stash keeps its first input for as long as it exists (builtins.go:
Update copies OldOutputs["output"]), so a record says where a VM was created, not what a later config says.

The state is read on every run, a stack's first included: a first `pulumi up` that fails after creating
VMs must keep them where they are too. Measured with the real pulumi v3.274.0 CLI and language host on the
file backend: a stack just made by `pulumi stack init` answers with no resources (its checkpoint already has
a `latest` deployment), a run that failed after creating a Stash leaves it in the answer, and a Stash keeps
its first value through an update. The other facts read here (network mode, etcd topology and initial
members, API endpoint) can never change once a run has succeeded, so the last successful outputs are the
truth for them; the Kubernetes version is published only once an upgrade has finished, on purpose (a failed
upgrade is resumed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
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
SECRETS_ENCRYPTION_OUTPUT = "secretsEncryption"
SECRETS_ENCRYPTION_KEYS_OUTPUT = "secretsEncryptionKeys"

# The engine's builtin that returns every resource of a stack's last persisted snapshot, as
# `{urn: {"type": ..., "outputs": ...}}` (pulumi pkg/resource/deploy/builtins.go, readStackResourceOutputs;
# pkg/backend/backend.go, backendClient.GetStackResourceOutputs, which skips resources pending deletion).
READ_STACK_RESOURCE_OUTPUTS = "pulumi:pulumi:readStackResourceOutputs"
# The engine's builtin Stash: `output` is its first `input`, kept by every later update until the stash is
# replaced (pulumi pkg/resource/deploy/builtins.go: Create copies input to output, Update keeps OldOutputs).
STASH_TYPE = "pulumi:index:Stash"
# The `kind` of the record the program keeps of every VM in a Stash (components/vm.py writes it).
NODE_RECORD = "kubeadm-ha/node"
DOMAIN_TYPE = "libvirt:index/domain:Domain"


@dataclass(frozen=True)
class PreviousDeployment:
    outputs: Mapping[str, Any] = field(default_factory=dict)
    # From the state (see the module doc): hostname -> the record of its VM, written when the VM was created.
    recorded_nodes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # From the state: VMs whose domain has a single disk, made by a program from before the key disk
    # (render/hostkey_disk.py); model/running.py refuses to go on (the provider's `disk` is ForceNew).
    domains_without_key_disk: tuple[str, ...] = ()

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
    def encryption_generation(self) -> int | None:
        """The key generation every control plane encrypts Secrets with; None before the program encrypted them
        (a new stack, or one deployed before encryption at rest)."""
        value = self.outputs.get(SECRETS_ENCRYPTION_OUTPUT)
        generation = value.get("generation") if isinstance(value, Mapping) else None
        # Outputs come back through a protobuf Struct, whose numbers are doubles: 0 is read back as 0.0.
        if isinstance(generation, (int, float)) and not isinstance(generation, bool) and generation == int(generation):
            return int(generation)
        return None

    @property
    def encryption_moved_from(self) -> str | None:
        """The key (or `identity`) the last move to `encryption_generation` started from."""
        value = self.outputs.get(SECRETS_ENCRYPTION_OUTPUT)
        moved = value.get("from") if isinstance(value, Mapping) else None
        return moved if isinstance(moved, str) else None

    @property
    def deployment_id(self) -> str | None:
        value = self.outputs.get(DEPLOYMENT_ID_OUTPUT)
        return str(value) if value else None

    def _nodes(self) -> dict[str, Mapping[str, Any]]:
        """hostname -> facts of every node of the last successful outputs, overlaid with every VM in the state."""
        value = self.outputs.get(NODES_OUTPUT)
        found = (
            {str(name): node for name, node in value.items() if isinstance(node, dict)}
            if isinstance(value, dict)
            else {}
        )
        return {**found, **self.recorded_nodes}

    @property
    def node_addresses(self) -> dict[str, tuple[str, str | None]]:
        """hostname -> (address, MAC) of every node that runs (MAC: None before it was exported)."""
        found: dict[str, tuple[str, str | None]] = {}
        for name, node in self._nodes().items():
            if node.get("address"):
                mac = node.get("mac")
                found[name] = (str(node["address"]), str(mac).lower() if mac else None)
        return found

    @property
    def node_hypervisors(self) -> dict[str, str]:
        """hostname -> hypervisor of every node that runs: recorded when its VM was created, or (a deployment
        from before the records) from the last outputs; none before placement was exported."""
        return {name: str(node["hypervisor"]) for name, node in self._nodes().items() if node.get("hypervisor")}

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


def _plain(value: Any) -> Any:
    # A secret in an invoke's result stays wrapped below the top level; records are never secret.
    return pulumi.runtime.rpc.unwrap_rpc_secret(value) if pulumi.runtime.rpc.is_rpc_secret(value) else value


def _outputs_of(resources: Mapping[str, Any], type_: str) -> Iterator[Mapping[str, Any]]:
    """The outputs of every resource of type `type_` in readStackResourceOutputs' `outputs` (urn -> type and
    outputs)."""
    for entry in resources.values():
        entry = _plain(entry)
        if isinstance(entry, Mapping) and entry.get("type") == type_:
            yield _plain(entry.get("outputs")) or {}


def recorded_nodes(resources: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """hostname -> its VM's record, from the Stashes in the state."""
    nodes: dict[str, dict[str, str]] = {}
    for outputs in _outputs_of(resources, STASH_TYPE):
        record = _plain(outputs.get("output"))
        if isinstance(record, Mapping) and record.get("kind") == NODE_RECORD and record.get("hostname"):
            nodes[str(record["hostname"])] = {str(key): str(item) for key, item in record.items()}
    return nodes


def domains_without_key_disk(resources: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the domains in the state with fewer than two disks (root and key disk)."""
    found = []
    for outputs in _outputs_of(resources, DOMAIN_TYPE):
        disks = _plain(outputs.get("disks"))
        if isinstance(disks, list) and len(disks) < 2 and outputs.get("name"):
            found.append(str(_plain(outputs["name"])))
    return tuple(sorted(found))


# The read is retried: with the file backend it can meet the engine writing this stack's checkpoint at the start
# of `pulumi up` and fail with "failed to load checkpoint: EOF" (measured with pulumi v3.259.0: the blob store,
# gocloud.dev fileblob, renames the checkpoint into place but rewrites its `.attrs` sidecar in place, and a read
# decodes that sidecar first; tests/unit/test_previous_read.py). A lasting failure still refuses the run.
READ_ATTEMPTS = 5
_FIRST_DELAY_SECONDS = 0.1


def _read(name: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    result = pulumi.runtime.invoke(READ_STACK_OUTPUTS, {"name": name})
    outputs = (result.value or {}).get("outputs") or {}
    state = pulumi.runtime.invoke(READ_STACK_RESOURCE_OUTPUTS, {"stackName": name})
    return outputs, (state.value or {}).get("outputs") or {}


def read_previous_deployment() -> PreviousDeployment:
    """This stack's last successful outputs and what its state records; empty for a stack never deployed."""
    name = f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}"
    for attempt in range(READ_ATTEMPTS):
        try:
            outputs, resources = _read(name)
            break
        except Exception as error:
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(_FIRST_DELAY_SECONDS * 2**attempt)  # 0.1 + 0.2 + 0.4 + 0.8 s at most
                continue
            raise pulumi.RunError(
                f"could not read the last deployment of stack {name} ({error}; {READ_ATTEMPTS} attempts); refusing "
                "to continue because version, placement and topology changes are checked against it"
            ) from error
    return PreviousDeployment(dict(outputs), recorded_nodes(resources), domains_without_key_disk(resources))
