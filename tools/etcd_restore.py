"""Restore a stack's etcd from a snapshot, with etcd's documented disaster-recovery procedure.

    python -m tools.etcd_restore --stack NAME --snapshot FILE [--force] [--outputs FILE]

Steps, each printed as it runs (render/etcd_restore.py renders every script):

1. Probe every member. A member that answers a quorum read means the cluster is alive: the restore
   is refused (it would throw away every write since the snapshot) unless `--force`.
2. Hold: on every control plane, move kube-apiserver, kube-controller-manager and kube-scheduler out of
   kubelet's manifest directory; on every etcd member, etcd's manifest too; wait until they stopped.
3. Copy the snapshot to every member (SHA-256 checked on arrival).
4. On every member: `etcdutl snapshot restore` with the same `--initial-cluster` (every member) and
   token, its own name and peer URL, revisions bumped and marked compacted (so watchers re-list); the
   old data directory is kept beside it as `/var/lib/etcd.before-restore-<id>`.
5. Put etcd's manifests back on every member; wait until every member answers a quorum read.
   With Secrets encrypted at rest: give every control plane (still held) an EncryptionConfiguration that
   writes with the current key and reads every key the stack ever had (`secretsEncryptionKeys`): a snapshot
   from before a rotation holds Secrets written with a key the control planes have since dropped.
6. Put the control-plane manifests back.
7. With encryption: once the API answers, re-write every Secret with the current key, then give each
   control plane the final file back (the current key, then identity), one API server at a time behind
   the load balancers: the program's own `encryption-rewrite` and `encryption-drop` scripts.

Works for both topologies: stacked members are the control planes, external ones the etcd VMs.
Do not run `pulumi up` while a restore runs: its steps would put held manifests back.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import sys
import time
from pathlib import Path

from render.encryption import (
    CONFIG_PATH,
    IDENTITY,
    Key,
    configuration,
    entries,
    phase_script,
    restore_file_script,
    restore_order,
    rewrite_script,
)
from render.etcd_restore import (
    api_ready_script,
    health_script,
    hold_script,
    quorum_probe_script,
    receive_snapshot_script,
    release_script,
    restore_data_script,
)
from render.scripts import BundleFile, encode_bundle
from tools.access import (
    Node,
    SshTransport,
    StackAccess,
    ToolError,
    Transport,
    access_from_outputs,
    private_workdir,
    read_stack_outputs,
    run_checked,
    say,
)
from tools.etcd_backup import file_sha256

PROBE_TIMEOUT = 360.0
HOLD_TIMEOUT = 300.0
PUSH_TIMEOUT = 3600.0
RESTORE_TIMEOUT = 900.0
HEALTH_BOUND_SECONDS = 300.0
HEALTH_POLL_SECONDS = 2.0
REWRITE_TIMEOUT = 1800.0
RESTART_TIMEOUT = 600.0


def quorum_alive(access: StackAccess, transport: Transport) -> list[str]:
    """The members that answer a quorum read now; a member whose node does not answer stops the restore."""
    alive = []
    for node in access.etcd_nodes:
        answer = run_checked(transport, node, quorum_probe_script(node.hostname), timeout=PROBE_TIMEOUT)
        state = "quorum" if "quorum" in answer.split() else "no quorum"
        say(f"  {node.hostname}: {state}")
        if state == "quorum":
            alive.append(node.hostname)
    return alive


def _roles(access: StackAccess) -> list[tuple[Node, bool, bool]]:
    """(node, runs an etcd member, runs a control plane) for every node the restore touches."""
    members = {node.hostname for node in access.etcd_nodes}
    control_planes = {node.hostname for node in access.role("cp")}
    touched = [node for node in access.nodes.values() if node.hostname in members | control_planes]
    # Control planes first (nothing writes while etcd stops), then the members, each in index order.
    ordered = sorted(touched, key=lambda node: (node.hostname not in control_planes, node.hostname))
    return [(node, node.hostname in members, node.hostname in control_planes) for node in ordered]


def wait_healthy(access: StackAccess, transport: Transport, bound: float) -> float:
    """Poll from every member in turn until one sees every member healthy; the seconds it took."""
    members = access.etcd_members
    started = time.monotonic()
    last = ""
    while True:
        for node in access.etcd_nodes:
            try:
                last = run_checked(transport, node, health_script(node.hostname, members), timeout=120)
            except ToolError as error:
                last = str(error)
                continue
            healthy = {line.split()[1] for line in last.splitlines() if line.startswith("healthy ")}
            if healthy == {member.name for member in members}:
                return time.monotonic() - started
        if time.monotonic() - started > bound:
            raise ToolError(f"etcd is not healthy {bound:.0f} s after the restore; last report:\n{last.strip()}")
        time.sleep(HEALTH_POLL_SECONDS)


def restore(
    access: StackAccess, transport: Transport, snapshot: Path, *, force: bool, restore_id: str | None = None
) -> dict[str, float]:
    """Run the procedure; returns the duration of each phase in seconds."""
    restore_id = restore_id or datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    timings: dict[str, float] = {}
    members = access.etcd_members
    if not members:
        raise ToolError(f"stack {access.stack} has no etcd members in its outputs")
    digest = file_sha256(snapshot)
    say(f"restore {restore_id} of {access.stack} ({access.etcd_topology} etcd: {', '.join(m.name for m in members)})")
    say(f"snapshot {snapshot} sha256 {digest}")

    say("1. probing every member for a live quorum")
    alive = quorum_alive(access, transport)
    if alive and not force:
        raise ToolError(
            f"a healthy quorum exists ({', '.join(alive)} answer quorum reads): a restore would discard every "
            "write since the snapshot. Refusing; pass --force to restore anyway"
        )
    if alive:
        say(f"   --force: restoring although {', '.join(alive)} answer")

    phase = time.monotonic()
    say("2. holding the control-plane and etcd static pods")
    for node, etcd_member, control_plane in _roles(access):
        run_checked(
            transport, node, hold_script(node.hostname, etcd_member=etcd_member, control_plane=control_plane),
            timeout=HOLD_TIMEOUT,
        )  # fmt: skip
        say(f"   {node.hostname}: held" + (" (etcd stopped)" if etcd_member else ""))
    timings["hold"] = time.monotonic() - phase

    phase = time.monotonic()
    say("3. copying the snapshot to every member")
    for node in access.etcd_nodes:
        with open(snapshot, "rb") as source:
            run_checked(
                transport, node, receive_snapshot_script(node.hostname, digest), stdin=source, timeout=PUSH_TIMEOUT
            )
        say(f"   {node.hostname}: received, sha256 checked")
    timings["copy"] = time.monotonic() - phase

    phase = time.monotonic()
    say("4. etcdutl snapshot restore on every member (same initial cluster)")
    by_name = {node.hostname: node for node in access.etcd_nodes}
    for member in members:
        script = restore_data_script(member, members, token=access.etcd_token, digest=digest, restore_id=restore_id)
        run_checked(transport, by_name[member.name], script, timeout=RESTORE_TIMEOUT)
        say(f"   {member.name}: data restored (previous data kept as /var/lib/etcd.before-restore-{restore_id})")
    timings["restore"] = time.monotonic() - phase

    phase = time.monotonic()
    say("5. starting etcd on every member")
    for node, etcd_member, control_plane in _roles(access):
        if etcd_member:
            release = release_script(node.hostname, etcd_member=True, control_plane=control_plane, which="etcd")
            run_checked(transport, node, release, timeout=HOLD_TIMEOUT)
    took = wait_healthy(access, transport, HEALTH_BOUND_SECONDS)
    say(f"   every member healthy after {took:.1f} s")
    timings["etcd healthy"] = time.monotonic() - phase

    if access.encryption_key:
        _place_restore_keys(access, transport)

    phase = time.monotonic()
    say("6. starting the control planes")
    for node, etcd_member, control_plane in _roles(access):
        if control_plane:
            release = release_script(node.hostname, etcd_member=etcd_member, control_plane=True, which="control-plane")
            run_checked(transport, node, release, timeout=HOLD_TIMEOUT)
            say(f"   {node.hostname}: control-plane manifests back")
    timings["control planes"] = time.monotonic() - phase
    if access.encryption_key:
        phase = time.monotonic()
        say(f"7. re-writing every Secret with {access.encryption_key}, then dropping the older keys again")
        _finish_encryption(access, transport)
        timings["secrets re-encrypted"] = time.monotonic() - phase
    say("restore done: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    return timings


def _secret_bundle(order: tuple[str, ...], access: StackAccess) -> bytes:
    keys = [Key(name, base64.b64decode(access.encryption_keys[name])) for name in order if name != IDENTITY]
    return encode_bundle([BundleFile(CONFIG_PATH, configuration(order, keys), 0o600)]).encode()


def _place_restore_keys(access: StackAccess, transport: Transport) -> None:
    missing = access.encryption_key not in access.encryption_keys
    if missing:
        raise ToolError(
            f"stack {access.stack} encrypts Secrets with {access.encryption_key} but its secretsEncryptionKeys output "
            "lacks it: the snapshot's Secrets could not be read. Run the tool with this program's outputs"
        )
    order = restore_order(access.encryption_key, list(access.encryption_keys))
    payload = _secret_bundle(order, access)
    for node in access.role("cp"):
        # Given secrets on stdin: its output is kept on the node and only a scrubbed summary shown.
        script = dataclasses.replace(restore_file_script(node.hostname), secret_stdin=True)
        run_checked(transport, node, script, stdin=payload, timeout=HOLD_TIMEOUT)
        say(f"   {node.hostname}: encryption reads {' '.join(order)}")


def _finish_encryption(access: StackAccess, transport: Transport) -> None:
    control_planes = access.role("cp")
    wait_api(access, transport, control_planes[0], HEALTH_BOUND_SECONDS)
    run_checked(transport, control_planes[0], rewrite_script(control_planes[0].hostname, access.encryption_key),
                timeout=REWRITE_TIMEOUT)  # fmt: skip
    say(f"   every Secret re-written with {access.encryption_key}")
    final = _secret_bundle(entries("drop", access.encryption_key, access.encryption_key), access)
    for node in control_planes:
        script = dataclasses.replace(
            phase_script(node.hostname, "drop", access.encryption_key, access.encryption_key), secret_stdin=True
        )
        said = run_checked(transport, node, script, stdin=final, timeout=RESTART_TIMEOUT)
        # A stack that never rotated had only the current key to place: nothing to drop, nothing restarted.
        done = "already done" in said
        say(f"   {node.hostname}: " + ("only the current key" if done else "older keys dropped, API server restarted"))


def wait_api(access: StackAccess, transport: Transport, node: Node, bound: float) -> None:
    """Until the API server on `node` answers /readyz (bounded)."""
    deadline = time.monotonic() + bound
    while True:
        try:
            run_checked(transport, node, api_ready_script(node.hostname), timeout=30)
            return
        except ToolError as error:
            if time.monotonic() >= deadline:
                raise ToolError(
                    f"the API server on {node.hostname} did not become ready within {bound:.0f} s: {error}"
                ) from None
        time.sleep(HEALTH_POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.etcd_restore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--snapshot", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="restore even while a healthy quorum exists")
    parser.add_argument("--outputs", type=Path, help="the stack's `pulumi stack output --json --show-secrets`")
    args = parser.parse_args(argv)
    try:
        if not args.snapshot.is_file():
            raise ToolError(f"{args.snapshot} is not a file")
        access = access_from_outputs(args.stack, read_stack_outputs(args.stack, Path.cwd(), args.outputs))
        with private_workdir() as workdir:
            restore(access, SshTransport(access, workdir), args.snapshot, force=args.force)
    except ToolError as error:
        print(f"etcd_restore: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
