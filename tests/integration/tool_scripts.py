"""The scripts the operator tools and the etcd timers run on nodes, for the static checks.

They are not remote steps of the program (tests/integration/rendered.py collects those): the timers run
the installed backup and maintenance scripts, and tools/etcd_backup.py, tools/etcd_restore.py and
tools/drill.py send the rest over SSH. Rendered for the members of every stack file.
"""

from __future__ import annotations

from collections.abc import Iterator

from render.backup import BackupPolicy, backup_script
from render.etcd_maintenance import maintenance_script
from render.etcd_restore import (
    health_script,
    hold_script,
    quorum_probe_script,
    receive_snapshot_script,
    release_script,
    restore_data_script,
)
from render.scripts import Script
from tests.stacks import STACK_FILES, evaluated
from tools.access import access_from_outputs
from tools.etcd_backup import copy_script, list_script, snapshot_now_script

DIGEST = "0" * 64


def operator_tool_scripts() -> Iterator[tuple[str, str]]:
    for stack in STACK_FILES:
        outputs = {key: output.value for key, output in evaluated(stack).outputs.items()}
        access = access_from_outputs(stack, outputs)
        members = access.etcd_members
        first = members[0]
        scripts: list[Script] = [
            backup_script(first.name, BackupPolicy(60, 24)),
            maintenance_script(first.name, 24),
            quorum_probe_script(first.name),
            receive_snapshot_script(first.name, DIGEST),
            restore_data_script(first, members, token=access.etcd_token, digest=DIGEST, restore_id="20260101T000000Z"),
            health_script(first.name, members),
            list_script(first.name, access.backup_directory),
            copy_script(first.name, access.backup_directory, f"etcd-{first.name}-20260101T000000Z.db"),
            snapshot_now_script(first.name),
        ]
        stacked = access.etcd_topology != "external"
        for which in ("etcd", "control-plane"):
            scripts.append(release_script(first.name, etcd_member=True, control_plane=stacked, which=which))
        scripts.append(hold_script(first.name, etcd_member=True, control_plane=stacked))
        for script in scripts:
            yield f"{stack}/tools/{script.step}", script.render()
