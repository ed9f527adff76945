"""etcd snapshots on a timer, on every etcd member: the snapshot script, its systemd units, and the etcd tools.

Every member (each control plane with stacked etcd, each etcd VM with external etcd) gets a systemd
timer that runs `etcdctl snapshot save` against its local member, checks the file with
`etcdutl snapshot status`, and keeps the newest `etcd.backup.keep` snapshots, root-only (0600 in a
0700 directory), each beside a `.sha256` the tools verify after copying.

etcdctl and etcdutl come from the etcd image the member itself runs (read from its static pod
manifest at run time, so a kubeadm upgrade or an `etcd.version` change moves them too), run with
`ctr run` on host networking: Ubuntu's `etcd-client` is 3.4, which has no etcdutl, and a second
download path would need its own verification. The image is on the node already, since etcd runs it.

The node side of a restore is in render/etcd_restore.py.

Everything here is pure: typed inputs in, scripts and units out. `EtcdBackups` (components/backup.py)
only wires the steps.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from render.etcd import CLIENT_PORT, MANIFEST_PATH, EtcdPaths
from render.kubeadm import CONFIG_DIR
from render.scripts import Script, files_match, logged, quote, sha256_hex, write_file
from render.scripts import command as shell

BACKUP_DIR = "/var/backups/kubeadm-ha/etcd"
BACKUP_SCRIPT_PATH = "/usr/local/sbin/kubeadm-ha-etcd-backup"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "kubeadm-ha-etcd-backup.service"
TIMER = "kubeadm-ha-etcd-backup.timer"
# Snapshot names sort by time: etcd-<host>-<UTC YYYYmmddTHHMMSSZ>.db, beside <name>.sha256.
SNAPSHOT_GLOB = "etcd-*.db"
# Set to 1 (e.g. `systemctl set-environment` or the tools) to snapshot even if a recent one exists.
FORCE_VARIABLE = "KUBEADM_HA_BACKUP_FORCE"
# How long one `etcdctl snapshot save` may stream: a keyspace of gigabytes over a slow disk, under the unit's
# Nice=10 and lowest best-effort I/O priority. The script's own bound (`timeout` around `ctr run`), not etcdctl's
# --command-timeout, which `snapshot save` never gets (see etcd_tool_functions).
SNAPSHOT_TIMEOUT_SECONDS = 600
# Every other etcdctl/etcdutl run (etcdutl reads the whole snapshot for `snapshot status`).
TOOL_TIMEOUT_SECONDS = 300
# What `timeout` gives ctr after its TERM (ctr forwards it to the tool in the container) before a KILL.
KILL_AFTER_SECONDS = 30
# The unit's TimeoutStartSec: above the script's own bounds, so those end a slow run first and its EXIT trap
# removes the partial files. systemd's kill at this limit reaches only the unit's cgroup, and etcdctl runs in
# containerd's shim, outside it.
UNIT_TIMEOUT_SECONDS = SNAPSHOT_TIMEOUT_SECONDS + TOOL_TIMEOUT_SECONDS + 2 * KILL_AFTER_SECONDS + 60
# Where the restore (render/etcd_restore.py) keeps manifests while their pods must stay down.
HELD_MANIFEST_DIR = f"{CONFIG_DIR}/restore-held"

_PATHS = EtcdPaths()


@dataclass(frozen=True)
class BackupPolicy:
    interval_minutes: int
    keep: int


def snapshot_name_pattern(host: str) -> str:
    return f"etcd-{host}-<UTC time>.db"


# --- running etcdctl / etcdutl on a node -----------------------------------------------------------------


def etcdctl_client_flags(paths: EtcdPaths = _PATHS) -> tuple[str, ...]:
    """etcdctl's flags for the local member, as the healthcheck client (any certificate the etcd CA signed is a
    full client: etcd runs without auth), dialling for at most 3 s. No --command-timeout: each caller picks it."""
    return (
        f"--endpoints=https://127.0.0.1:{CLIENT_PORT}",
        f"--cacert={paths.trusted_ca}",
        f"--cert={paths.healthcheck_cert}",
        f"--key={paths.healthcheck_key}",
        "--dial-timeout=3s",
    )


def etcd_tool_functions(*, writable: Sequence[str], paths: EtcdPaths = _PATHS) -> tuple[str, ...]:
    """`kha_etcdctl` (bounded, against the local member, as the healthcheck client), `kha_etcdutl`, and
    `kha_etcd_snapshot_save FILE` (the same client, bounded only by SNAPSHOT_TIMEOUT_SECONDS).

    All run inside the member's own etcd image (`ctr run` on the host network), which sees the
    certificate directory read-only and `writable` read-write at the same paths as the host.
    """
    cert_dir = posixpath.dirname(paths.trusted_ca)
    client = etcdctl_client_flags(paths)
    # etcdctl bounds `snapshot save` by --command-timeout whenever the flag is given, and streams it without a
    # deadline only when it is not (etcd v3.6/v3.7 etcdctl/ctlv3/command/snapshot_command.go
    # `snapshotSaveCommandFunc`: `if isCommandTimeoutFlagSet(cmd) { ctx, cancel = commandCtx(cmd) }`; util.go
    # `isCommandTimeoutFlagSet` is the flag's `Changed`). With it, every snapshot that took over 10 s to stream
    # failed with DeadlineExceeded (tests/real/test_backup_slow_stream.py). So the snapshot gets no such flag.
    command_timeout = "--command-timeout=10s"
    held = f"{HELD_MANIFEST_DIR}/etcd.yaml"
    mounts = [f"--mount=type=bind,src={cert_dir},dst={cert_dir},options=rbind:ro"]
    mounts += [f"--mount=type=bind,src={path},dst={path},options=rbind:rw" for path in writable]
    # The first image: line, and sed stops there (no `| head`, whose early exit is a SIGPIPE under pipefail).
    image_line = r"""/^[[:space:]-]*image:/{s/^[[:space:]-]*image:[[:space:]]*"?([^"[:space:]]+)"?.*/\1/p;q}"""
    return (
        # The image kubelet runs (or ran, while a restore holds the manifest). Only a manifest that exists is
        # read: sed fails (exit 2) on a missing file, and outside an `if` that failure ended the whole step
        # (the drill's etcd queries failed on every node: tests/real/test_stacked_control_plane_live.py).
        "etcd_image() {",
        "  local manifest",
        f"  for manifest in {quote(MANIFEST_PATH)} {quote(held)}; do",
        '    if [ -f "$manifest" ]; then',
        f'      sed -nE {quote(image_line)} "$manifest"',
        "      return 0",
        "    fi",
        "  done",
        "}",
        # kha_etcd_tool SECONDS TOOL ARGS...: `ctr run` forwards the TERM of `timeout` to the tool (containerd
        # cmd/ctr/commands/run/run.go: `commands.ForwardAllSignals` unless --tty or --detach), then removes the
        # container (--rm).
        "kha_etcd_tool() {",
        '  local bound="$1" image',
        "  shift",
        '  image="$(etcd_image)"',
        '  if [ -z "$image" ]; then',
        '    echo "kubeadm-ha: no etcd manifest on ${KUBEADM_HA_HOST} to take the etcd image from" >&2',
        "    return 1",
        "  fi",
        f'  timeout --kill-after={KILL_AFTER_SECONDS} "$bound" '
        + shell("ctr", "--namespace", "k8s.io", "run", "--rm", "--net-host", *mounts)
        + ' "$image" "kubeadm-ha-$1-$$-${RANDOM}" "$@"',
        "}",
        "kha_etcdctl() {",
        f'  kha_etcd_tool {TOOL_TIMEOUT_SECONDS} etcdctl {shell(*client, command_timeout)} "$@"',
        "}",
        "kha_etcdutl() {",
        f'  kha_etcd_tool {TOOL_TIMEOUT_SECONDS} etcdutl "$@"',
        "}",
        "kha_etcd_snapshot_save() {",
        f'  kha_etcd_tool {SNAPSHOT_TIMEOUT_SECONDS} etcdctl {shell(*client)} snapshot save "$1"',
        "}",
    )


# --- the timer --------------------------------------------------------------------------------------------


def backup_script(host: str, policy: BackupPolicy) -> Script:
    """What the timer runs: snapshot the local member, verify it, keep the newest `policy.keep`.

    A run that fails (etcdctl's error, a stream that outlasts SNAPSHOT_TIMEOUT_SECONDS, a snapshot etcdutl
    refuses or that holds no keys) exits non-zero, so the unit fails, says which snapshot is still the newest
    good one, and leaves nothing: a snapshot counts only once its digest is beside it, and that is written last.
    The guard skips a run while such a snapshot younger than half the interval exists (a catch-up right
    after a manual run), unless KUBEADM_HA_BACKUP_FORCE=1.
    """
    recent = max(1, policy.interval_minutes // 2)
    directory = quote(BACKUP_DIR)
    digests = f"find {directory} -maxdepth 1 -name {quote(f'{SNAPSHOT_GLOB}.sha256')}"
    final = '"$final"'
    empty = quote(f"kubeadm-ha: the snapshot on {host} holds no keys; kept nothing")
    prune = 'while read -r old; do rm -f "$old" "$old.sha256"; done'
    verify_failed = quote(f"kubeadm-ha: etcdutl does not accept the snapshot just taken on {host}; kept nothing")
    timed_out = quote(
        f"kubeadm-ha: etcdctl snapshot save on {host} did not finish within {SNAPSHOT_TIMEOUT_SECONDS} s; kept nothing"
    )
    save_failed = quote(f"kubeadm-ha: etcdctl snapshot save failed on {host}; kept nothing")
    # A partial file no run has written to for longer than a run may last is a killed run's (a reboot, systemd's
    # kill): a live run's, e.g. the timer's during `tools.etcd_backup --now`, is never that old.
    stale = UNIT_TIMEOUT_SECONDS // 60 + 1
    return Script(
        step="etcd-backup",
        host=host,
        done_when=f'[ "${{{FORCE_VARIABLE}:-0}}" != 1 ]'
        f' && [ -n "$({digests} -mmin -{recent} -print -quit 2>/dev/null)" ]',
        functions=etcd_tool_functions(writable=(BACKUP_DIR,)),
        body=(
            shell("install", "-d", "-m", "0700", BACKUP_DIR),
            f"find {directory} -maxdepth 1 -name {quote(f'.etcd-{host}-*.part*')} -mmin +{stale} -delete",
            'stamp="$(date -u +%Y%m%dT%H%M%SZ)"',
            f'final={directory}/etcd-{quote(host)}-"$stamp".db',
            f'part={directory}/.etcd-{quote(host)}-"$stamp".db.part',
            # Nothing half-written stays behind, however the run ends: etcdctl streams into "$part.part" and
            # renames it to "$part" once complete (etcd client/v3/snapshot/v3_snapshot.go `SaveWithVersion`), and
            # a tool stopped mid-stream leaves it.
            'trap \'rm -f "$part" "$part.part" "$part.sha256"\' EXIT',
            "saved=0",
            logged("etcd-backup", "kha_etcd_snapshot_save") + ' "$part" || saved=$?',
            'if [ "$saved" -ne 0 ]; then',
            # 124/137: `timeout` ended the stream (TERM, then KILL).
            f'  case "$saved" in 124 | 137) echo {timed_out} >&2 ;; *) echo {save_failed}" (exit $saved)" >&2 ;; esac',
            f'  newest="$({digests} -print | sort | tail -n 1)"',
            '  newest="${newest##*/}"',
            '  newest="${newest%.sha256}"',
            '  echo "kubeadm-ha: the newest good snapshot on ${KUBEADM_HA_HOST} is ${newest:-none}" >&2',
            '  exit "$saved"',
            "fi",
            'if ! status="$(kha_etcdutl snapshot status "$part" --write-out=json 2>&1)"; then',
            f'  echo {verify_failed}": $status" >&2',
            "  exit 1",
            "fi",
            # `totalKey` is 0 only for an empty keyspace, which a running cluster never has.
            f'case "$status" in *\'"totalKey":0\'*) echo {empty} >&2; exit 1 ;; esac',
            'chmod 0600 "$part"',
            'digest="$(sha256sum "$part" | cut -d" " -f1)"',
            f'printf \'%s  %s\\n\' "$digest" "$(basename {final})" >"$part.sha256"',
            'chmod 0600 "$part.sha256"',
            # The digest last: the tools, the guard above and an operator count only a snapshot with its digest.
            f'mv -f "$part" {final}',
            f'mv -f "$part.sha256" {final}.sha256',
            # Names sort by time: drop all but the newest `keep`, with their digests.
            f"ls -1 {directory}/{quote(f'etcd-{host}-')}*.db | sort | head -n -{policy.keep} | {prune}",
            'echo "kubeadm-ha: snapshot $final ($status)"',
        ),
    )


def etcd_tool_service(description: str, exec_start: str, timeout_seconds: int, *extra: str) -> str:
    """A oneshot service running one of the etcd timers' scripts (etcd's tools need containerd; kubelet runs etcd),
    at low CPU and I/O priority, bounded by `timeout_seconds`; `extra` are further [Service] settings."""
    return "\n".join(
        [
            "[Unit]",
            f"Description={description}",
            "After=containerd.service kubelet.service",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={exec_start}",
            f"TimeoutStartSec={timeout_seconds}",
            "UMask=0077",
            "Nice=10",
            "IOSchedulingClass=best-effort",
            "IOSchedulingPriority=7",
            *extra,
            "",
        ]
    )


def service_unit(host: str) -> str:
    description = f"kubeadm-ha: snapshot the etcd member of {host} (etcdctl snapshot save, etcdutl status)"
    return etcd_tool_service(description, BACKUP_SCRIPT_PATH, UNIT_TIMEOUT_SECONDS)


def timer_unit(policy: BackupPolicy) -> str:
    return "\n".join(
        [
            "[Unit]",
            f"Description=kubeadm-ha: etcd snapshot every {policy.interval_minutes} minutes",
            "",
            "[Timer]",
            "OnBootSec=10min",
            f"OnUnitActiveSec={policy.interval_minutes}min",
            "AccuracySec=1min",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )


def backup_files(host: str, policy: BackupPolicy) -> dict[str, tuple[str, int]]:
    """path -> (content, mode) of everything the timer needs on `host`."""
    return {
        BACKUP_SCRIPT_PATH: (backup_script(host, policy).render(), 0o700),
        f"{UNIT_DIR}/{SERVICE}": (service_unit(host), 0o644),
        f"{UNIT_DIR}/{TIMER}": (timer_unit(policy), 0o644),
    }


def install_timer_script(host: str, policy: BackupPolicy) -> Script:
    """Write the backup script and units, then enable the timer; a changed policy rewrites them."""
    first = (shell("install", "-d", "-m", "0700", BACKUP_DIR),)
    return timer_install_script("etcd-backup-timer", host, backup_files(host, policy), TIMER, first=first)


def timer_install_script(
    step: str, host: str, files: Mapping[str, tuple[str, int]], timer: str, *, first: tuple[str, ...] = ()
) -> Script:
    """Write `files` (path -> (content, mode)) after the lines `first`, then enable and (re)start `timer`; done while
    every file has its content and the timer is enabled and active, so a changed file rewrites and reschedules."""
    digests = {path: sha256_hex(content) for path, (content, _) in files.items()}
    body: list[str] = list(first)
    for path, (content, mode) in files.items():
        body += write_file(path, content, mode)
    body += [
        shell("systemctl", "daemon-reload"),
        shell("systemctl", "enable", timer),
        # restart, not start: an interval change must reschedule a timer that is already running.
        shell("systemctl", "restart", timer),
    ]
    return Script(
        step=step,
        host=host,
        done_when=f"{files_match(digests)} && {shell('systemctl', 'is-enabled', '--quiet', timer)}"
        f" && {shell('systemctl', 'is-active', '--quiet', timer)}",
        body=tuple(body),
    )


def snapshot_locations(policy: BackupPolicy, members: Sequence[str]) -> dict[str, object]:
    """The `etcdBackups` output: where snapshots live on which nodes, and the policy that writes them."""
    return {
        "directory": BACKUP_DIR,
        "members": list(members),
        "pattern": "etcd-<hostname>-<UTC YYYYmmddTHHMMSSZ>.db (+ .sha256)",
        "intervalMinutes": policy.interval_minutes,
        "keep": policy.keep,
        "timer": TIMER,
    }
