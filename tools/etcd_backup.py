"""Copy the newest verified etcd snapshot of a stack to this machine.

    python -m tools.etcd_backup --stack NAME --out DIR [--now] [--outputs FILE]

Every etcd member keeps its own snapshots (the `etcdBackups` output says where). This lists them on
every member over SSH (host keys pinned from `hostKeys`), takes the newest, copies it, and keeps it
only if its SHA-256 matches the digest written beside it when it was taken (and, with `etcdutl` on
PATH, if `etcdutl snapshot status` reads it). `--now` first takes a fresh snapshot on the first
member that answers. The copy is DIR/<snapshot name>, mode 0600, with its `.sha256`.

For every member it says how old its newest good snapshot (one with its digest) is, and calls it OVERDUE past
two timer intervals: the timer's failures show on the member (`systemctl status`), this shows them from here.
When `--now` fails on every member it says which good snapshot is the newest and how old, copies nothing,
and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.backup import ETCD_BACKUPS_OUTPUT
from render.backup import BACKUP_SCRIPT_PATH, FORCE_VARIABLE, SERVICE, UNIT_TIMEOUT_SECONDS
from render.scripts import Script, quote
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

_NAME = re.compile(r"^etcd-[a-z0-9-]+-\d{8}T\d{6}Z\.db$")
LIST_TIMEOUT = 60.0
# `--now` runs the timer's script, whose own bounds end a slow snapshot within the unit's limit; the tool waits
# a little longer, so that the script's own message (and its clean-up) is what an operator sees.
SNAPSHOT_TIMEOUT = float(UNIT_TIMEOUT_SECONDS + 60)
COPY_TIMEOUT = 3600.0


@dataclass(frozen=True, order=True)
class Snapshot:
    taken: str  # the UTC stamp in the name: names of every member sort by time through it
    name: str
    node: str
    digest: str

    def taken_at(self) -> datetime.datetime:
        return datetime.datetime.strptime(self.taken, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)

    def age(self, now: datetime.datetime) -> str:
        return age_text((now - self.taken_at()).total_seconds())


Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def age_text(seconds: float) -> str:
    """42m, 3h05m, 2d04h."""
    minutes = max(0, int(seconds // 60))
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def overdue(snapshot: Snapshot | None, now: datetime.datetime, interval_minutes: int | None) -> bool:
    """Older than two timer intervals (or none at all): at least one run of the timer failed or did not run."""
    if interval_minutes is None:
        return False
    return snapshot is None or now - snapshot.taken_at() > datetime.timedelta(minutes=2 * interval_minutes)


def newest_good(snapshots: list[Snapshot], now: datetime.datetime) -> str:
    if not snapshots:
        return "there is no snapshot on any member"
    newest = max(snapshots)
    return f"the newest good snapshot is {newest.name} on {newest.node}, taken {newest.age(now)} ago"


def list_script(host: str, directory: str) -> Script:
    """Print `NAME DIGEST` for every snapshot with its digest file on `host`."""
    return Script(
        step="etcd-backup-list",
        host=host,
        done_when="false",
        on_node=False,
        body=(
            f"for digest in {quote(directory)}/etcd-*.db.sha256; do",
            '  [ -f "$digest" ] || continue',
            '  name="$(basename "$digest" .sha256)"',
            f'  [ -f {quote(directory)}/"$name" ] || continue',
            '  printf \'%s %s\\n\' "$name" "$(cut -d" " -f1 "$digest")"',
            "done",
        ),
    )


def copy_script(host: str, directory: str, name: str) -> Script:
    if not _NAME.match(name):
        raise ToolError(f"{name!r} is not a snapshot name")
    return Script(
        step="etcd-backup-copy",
        host=host,
        done_when="false",
        on_node=False,
        # exec: the renderer's closing "done" line must not follow the file's bytes on stdout.
        body=(f"exec cat -- {quote(directory)}/{quote(name)}",),
    )


def snapshot_now_script(host: str) -> Script:
    return Script(
        step="etcd-backup-now",
        host=host,
        done_when="false",
        on_node=False,
        body=(f"{FORCE_VARIABLE}=1 {quote(BACKUP_SCRIPT_PATH)}",),
    )


def parse_listing(node: str, text: str) -> list[Snapshot]:
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and _NAME.match(words[0]) and re.fullmatch(r"[0-9a-f]{64}", words[1]):
            stamp = words[0].rsplit("-", 1)[1].removesuffix(".db")
            found.append(Snapshot(stamp, words[0], node, words[1]))
    return found


def newest_snapshots(
    access: StackAccess,
    transport: Transport,
    *,
    now: datetime.datetime | None = None,
    interval_minutes: int | None = None,
) -> list[Snapshot]:
    """Every member's snapshots, newest first; a member that does not answer is reported and skipped. Each member's
    newest is reported with its age, and as OVERDUE past two timer intervals."""
    now = now or utc_now()
    found: list[Snapshot] = []
    for node in access.etcd_nodes:
        try:
            listing = run_checked(
                transport, node, list_script(node.hostname, access.backup_directory), timeout=LIST_TIMEOUT
            )
        except ToolError as error:
            say(f"  {node.hostname}: not listed ({error})")
            continue
        mine = parse_listing(node.hostname, listing)
        newest = max(mine) if mine else None
        if newest is None:
            say(f"  {node.hostname}: no snapshot")
        else:
            say(f"  {node.hostname}: {len(mine)} snapshot(s), newest {newest.name}, taken {newest.age(now)} ago")
        if overdue(newest, now, interval_minutes):
            since = f"for {newest.age(now)}" if newest else "at all"
            say(
                f"  OVERDUE: no new snapshot on {node.hostname} {since} (the timer runs every {interval_minutes} min):"
                f" its backups have stopped; see `systemctl status {SERVICE}` and `journalctl -u {SERVICE}` there"
            )
        found += mine
    return sorted(found, reverse=True)


def fetch(access: StackAccess, transport: Transport, snapshot: Snapshot, out: Path, etcdutl: str | None) -> Path:
    """Copy `snapshot` into `out`, verified; nothing stays behind if it does not verify."""
    node = access.nodes[snapshot.node]
    target = out / snapshot.name
    part = out / f".{snapshot.name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as sink:
            run_checked(
                transport, node, copy_script(node.hostname, access.backup_directory, snapshot.name),
                stdout=sink, timeout=COPY_TIMEOUT,
            )  # fmt: skip
        digest = file_sha256(part)
        if digest != snapshot.digest:
            raise ToolError(f"{snapshot.name} from {node.hostname} has SHA-256 {digest}, not {snapshot.digest}")
        if etcdutl is not None:
            status = subprocess.run(
                [etcdutl, "snapshot", "status", str(part), "--write-out=json"],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if status.returncode != 0:
                raise ToolError(f"etcdutl does not accept {snapshot.name}: {status.stderr.strip()[-200:]}")
            say(f"  etcdutl snapshot status: {status.stdout.strip()}")
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
    digest_file = out / f"{snapshot.name}.sha256"
    digest_file.write_text(f"{snapshot.digest}  {snapshot.name}\n")
    digest_file.chmod(0o600)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backup(
    access: StackAccess,
    transport: Transport,
    out: Path,
    *,
    now: bool,
    etcdutl: str | None,
    interval_minutes: int | None = None,
    clock: Clock = utc_now,
) -> Path:
    """Copy the newest verified snapshot into `out` (after a fresh one, with `now`); `interval_minutes`, the
    timer's, marks members whose newest snapshot is older than two intervals as OVERDUE."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh_failed = False
    if now:
        for node in access.etcd_nodes:
            say(f"taking a snapshot now on {node.hostname}")
            try:
                run_checked(transport, node, snapshot_now_script(node.hostname), timeout=SNAPSHOT_TIMEOUT)
                break
            except ToolError as error:
                say(f"  failed: {error}")
        else:
            fresh_failed = True
    say(f"listing snapshots on the etcd members of {access.stack}")
    listed_at = clock()
    candidates = newest_snapshots(access, transport, now=listed_at, interval_minutes=interval_minutes)
    if fresh_failed:
        # An older snapshot is not what --now asked for: say what there is, copy nothing.
        raise ToolError(f"no member could take a snapshot; {newest_good(candidates, listed_at)}; nothing copied")
    if not candidates:
        raise ToolError(f"no snapshot found on any etcd member of {access.stack} (in {access.backup_directory})")
    for snapshot in candidates:
        say(f"copying {snapshot.name} from {snapshot.node}")
        try:
            path = fetch(access, transport, snapshot, out, etcdutl)
        except ToolError as error:
            say(f"  not kept: {error}")
            continue
        say(f"verified (sha256 {snapshot.digest}, taken {snapshot.age(clock())} ago); written to {path}")
        return path
    raise ToolError("no snapshot could be copied and verified")


def backup_interval(outputs: Mapping[str, Any]) -> int | None:
    """The snapshot timer's interval in minutes, from the `etcdBackups` output (none from an older program)."""
    interval = (outputs.get(ETCD_BACKUPS_OUTPUT) or {}).get("intervalMinutes")
    return int(interval) if interval else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.etcd_backup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--now", action="store_true", help="take a fresh snapshot first")
    parser.add_argument("--outputs", type=Path, help="the stack's `pulumi stack output --json --show-secrets`")
    args = parser.parse_args(argv)
    try:
        outputs = read_stack_outputs(args.stack, Path.cwd(), args.outputs)
        access = access_from_outputs(args.stack, outputs)
        with private_workdir() as workdir:
            backup(
                access, SshTransport(access, workdir), args.out, now=args.now, etcdutl=shutil.which("etcdutl"),
                interval_minutes=backup_interval(outputs),
            )  # fmt: skip
    except ToolError as error:
        print(f"etcd_backup: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Node", "Snapshot", "backup", "main"]
