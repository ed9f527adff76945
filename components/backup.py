"""etcd snapshots on a timer, on every etcd member, and the node side of a restore.

Every member (each control plane with stacked etcd, each etcd VM with external etcd) gets a systemd
timer that runs `etcdctl snapshot save` against its local member, checks the file with
`etcdutl snapshot status`, and keeps the newest `etcd.backup.keep` snapshots, root-only (0600 in a
0700 directory), each beside a `.sha256` the tools verify after copying.

etcdctl and etcdutl come from the etcd image the member itself runs (read from its static pod
manifest at run time, so a kubeadm upgrade or an `etcd.version` change moves them too), run with
`ctr run` on host networking: Ubuntu's `etcd-client` is 3.4, which has no etcdutl, and a second
download path would need its own verification. The image is on the node already, since etcd runs it.

The restore scripts follow etcd's documented disaster-recovery procedure (tools/etcd_restore.py runs
them): hold the control-plane static pods and etcd's out of kubelet's directory, `etcdutl snapshot
restore` on every member with the same initial cluster, then put the manifests back.

Everything here is pure: typed inputs in, scripts and units out. `EtcdBackups` only wires the steps.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pulumi
import pulumi_command as command

from components.etcd import CLIENT_PORT, DATA_DIR, MANIFEST_PATH, EtcdMember, EtcdPaths
from components.remote import run_step
from render.kubeadm import CONFIG_DIR
from render.node_prep import STATIC_POD_DIR
from render.scripts import Script, files_match, logged, quote, sha256_hex, write_file
from render.scripts import command as shell

if TYPE_CHECKING:
    from components.nodes import NodeContext
    from components.vm import Vm
    from model.addressing import NodePlan
    from model.config import ClusterConfig

BACKUP_DIR = "/var/backups/kubeadm-ha/etcd"
BACKUP_SCRIPT_PATH = "/usr/local/sbin/kubeadm-ha-etcd-backup"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "kubeadm-ha-etcd-backup.service"
TIMER = "kubeadm-ha-etcd-backup.timer"
# Snapshot names sort by time: etcd-<host>-<UTC YYYYmmddTHHMMSSZ>.db, beside <name>.sha256.
SNAPSHOT_GLOB = "etcd-*.db"
# Set to 1 (e.g. `systemctl set-environment` or the tools) to snapshot even if a recent one exists.
FORCE_VARIABLE = "KUBEADM_HA_BACKUP_FORCE"
# A snapshot of a large keyspace over a slow disk; systemd stops the service beyond this.
SNAPSHOT_TIMEOUT_SECONDS = 600
TOOL_TIMEOUT_SECONDS = 300
# Where the restore keeps manifests while their pods must stay down, and the pushed snapshot.
HELD_MANIFEST_DIR = f"{CONFIG_DIR}/restore-held"
RESTORE_DIR = "/var/lib/kubeadm-ha/etcd-restore"
CONTROL_PLANE_MANIFESTS = ("kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")
STOP_TIMEOUT_SECONDS = 120
POLL_SECONDS = 2
# Kubernetes' advice for a restore: move revisions far past anything a watcher saw, and mark them
# compacted, so informers re-list instead of waiting for revisions that will never come.
BUMP_REVISION = 1_000_000_000

_PATHS = EtcdPaths()


@dataclass(frozen=True)
class BackupPolicy:
    interval_minutes: int
    keep: int


def snapshot_name_pattern(host: str) -> str:
    return f"etcd-{host}-<UTC time>.db"


# --- running etcdctl / etcdutl on a node -----------------------------------------------------------------


def etcd_tool_functions(*, writable: Sequence[str], paths: EtcdPaths = _PATHS) -> tuple[str, ...]:
    """`kha_etcdctl` (bounded, against the local member, as the healthcheck client) and `kha_etcdutl`.

    Both run inside the member's own etcd image (`ctr run` on the host network), which sees the
    certificate directory read-only and `writable` read-write at the same paths as the host.
    """
    cert_dir = posixpath.dirname(paths.trusted_ca)
    client = (
        f"--endpoints=https://127.0.0.1:{CLIENT_PORT}",
        f"--cacert={paths.trusted_ca}",
        f"--cert={paths.healthcheck_cert}",
        f"--key={paths.healthcheck_key}",
        "--dial-timeout=3s",
        # Bounds every request but `snapshot save`, which etcdctl streams without a deadline.
        "--command-timeout=10s",
    )
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
        "kha_etcd_tool() {",
        "  local image",
        '  image="$(etcd_image)"',
        '  if [ -z "$image" ]; then',
        '    echo "kubeadm-ha: no etcd manifest on ${KUBEADM_HA_HOST} to take the etcd image from" >&2',
        "    return 1",
        "  fi",
        f"  timeout {TOOL_TIMEOUT_SECONDS} "
        + shell("ctr", "--namespace", "k8s.io", "run", "--rm", "--net-host", *mounts)
        + ' "$image" "kubeadm-ha-$1-$$-${RANDOM}" "$@"',
        "}",
        "kha_etcdctl() {",
        f'  kha_etcd_tool etcdctl {shell(*client)} "$@"',
        "}",
        "kha_etcdutl() {",
        '  kha_etcd_tool etcdutl "$@"',
        "}",
    )


# --- the timer --------------------------------------------------------------------------------------------


def backup_script(host: str, policy: BackupPolicy) -> Script:
    """What the timer runs: snapshot the local member, verify it, keep the newest `policy.keep`.

    The guard skips a run while a snapshot younger than half the interval exists (a catch-up right
    after a manual run), unless KUBEADM_HA_BACKUP_FORCE=1.
    """
    recent = max(1, policy.interval_minutes // 2)
    newest = f"find {quote(BACKUP_DIR)} -maxdepth 1 -name {quote(SNAPSHOT_GLOB)} -mmin -{recent} -print -quit"
    final = '"$final"'
    empty = quote(f"kubeadm-ha: the snapshot on {host} holds no keys; kept nothing")
    prune = 'while read -r old; do rm -f "$old" "$old.sha256"; done'
    verify_failed = quote(f"kubeadm-ha: etcdutl does not accept the snapshot just taken on {host}; kept nothing")
    return Script(
        step="etcd-backup",
        host=host,
        done_when=f'[ "${{{FORCE_VARIABLE}:-0}}" != 1 ] && [ -n "$({newest} 2>/dev/null)" ]',
        functions=etcd_tool_functions(writable=(BACKUP_DIR,)),
        body=(
            shell("install", "-d", "-m", "0700", BACKUP_DIR),
            'stamp="$(date -u +%Y%m%dT%H%M%SZ)"',
            f'final={quote(BACKUP_DIR)}/etcd-{quote(host)}-"$stamp".db',
            f'part={quote(BACKUP_DIR)}/.etcd-{quote(host)}-"$stamp".db.part',
            # A half-written snapshot never stays behind, however the run ends.
            "trap 'rm -f \"$part\"' EXIT",
            logged("etcd-backup", "kha_etcdctl", "snapshot", "save") + ' "$part"',
            'if ! status="$(kha_etcdutl snapshot status "$part" --write-out=json 2>&1)"; then',
            f'  echo {verify_failed}": $status" >&2',
            "  exit 1",
            "fi",
            # `totalKey` is 0 only for an empty keyspace, which a running cluster never has.
            f'case "$status" in *\'"totalKey":0\'*) echo {empty} >&2; exit 1 ;; esac',
            'chmod 0600 "$part"',
            'digest="$(sha256sum "$part" | cut -d" " -f1)"',
            f'mv -f "$part" {final}',
            f'printf \'%s  %s\\n\' "$digest" "$(basename {final})" >{final}.sha256',
            f"chmod 0600 {final}.sha256",
            # Names sort by time: drop all but the newest `keep`, with their digests.
            f"ls -1 {quote(BACKUP_DIR)}/{quote(f'etcd-{host}-')}*.db | sort | head -n -{policy.keep} | {prune}",
            'echo "kubeadm-ha: snapshot $final ($status)"',
        ),
    )


def service_unit(host: str) -> str:
    return "\n".join(
        [
            "[Unit]",
            f"Description=kubeadm-ha: snapshot the etcd member of {host} (etcdctl snapshot save, etcdutl status)",
            "After=containerd.service kubelet.service",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={BACKUP_SCRIPT_PATH}",
            f"TimeoutStartSec={SNAPSHOT_TIMEOUT_SECONDS}",
            "UMask=0077",
            "Nice=10",
            "IOSchedulingClass=best-effort",
            "IOSchedulingPriority=7",
            "",
        ]
    )


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
    files = backup_files(host, policy)
    digests = {path: sha256_hex(content) for path, (content, _) in files.items()}
    body: list[str] = [shell("install", "-d", "-m", "0700", BACKUP_DIR)]
    for path, (content, mode) in files.items():
        body += write_file(path, content, mode)
    body += [
        shell("systemctl", "daemon-reload"),
        shell("systemctl", "enable", TIMER),
        # restart, not start: an interval change must reschedule a timer that is already running.
        shell("systemctl", "restart", TIMER),
    ]
    return Script(
        step="etcd-backup-timer",
        host=host,
        done_when=f"{files_match(digests)} && {shell('systemctl', 'is-enabled', '--quiet', TIMER)}"
        f" && {shell('systemctl', 'is-active', '--quiet', TIMER)}",
        body=tuple(body),
    )


# --- restore (run by tools/etcd_restore.py, one script per node and phase) -------------------------------


def _wait(what: str, condition: str, limit: int) -> tuple[str, ...]:
    return (
        f"deadline=$((SECONDS + {limit}))",
        f"until {condition}; do",
        '  if [ "$SECONDS" -ge "$deadline" ]; then',
        f'    echo {quote(f"kubeadm-ha: gave up after {limit}s waiting for {what}")}" on ${{KUBEADM_HA_HOST}}" >&2',
        "    exit 1",
        "  fi",
        f"  sleep {POLL_SECONDS}",
        "done",
    )


def _manifests(etcd_member: bool, control_plane: bool) -> tuple[str, ...]:
    return (*(CONTROL_PLANE_MANIFESTS if control_plane else ()), *(("etcd.yaml",) if etcd_member else ()))


def quorum_probe_script(host: str) -> Script:
    """Exit 0 and print `quorum` when the local member answers a quorum read, `no-quorum` when it does not.

    Fails (exit 1, naming what ctr said) when etcdctl itself cannot run on the node: a `no-quorum` then would
    let the restore go ahead against a cluster nobody looked at (the image gone, containerd down; found with
    the real ctr in tests/real/test_ctr_etcd_tools.py). `etcdctl version` needs no member.
    """
    cannot = quote(f"kubeadm-ha: etcdctl cannot run on {host} (through ctr, in the member's etcd image), so")
    return Script(
        step="etcd-quorum-probe",
        host=host,
        done_when="false",
        functions=etcd_tool_functions(writable=()),
        on_node=False,
        body=(
            'if ! tool="$(kha_etcdctl version 2>&1)"; then',
            f'  echo {cannot}" whether etcd has a quorum is unknown: $tool" >&2',
            "  exit 1",
            "fi",
            "if kha_etcdctl endpoint health >/dev/null 2>&1; then echo quorum; else echo no-quorum; fi",
        ),
    )


def hold_script(host: str, *, etcd_member: bool, control_plane: bool) -> Script:
    """Move the node's control-plane and etcd manifests out of kubelet's directory and wait for etcd to stop.

    The API servers go first, so nothing writes to etcd while its members stop.
    """
    manifests = _manifests(etcd_member, control_plane)
    present = " || ".join(f"[ -f {quote(f'{STATIC_POD_DIR}/{name}')} ]" for name in manifests)
    body: list[str] = [shell("install", "-d", "-m", "0700", HELD_MANIFEST_DIR)]
    for name in manifests:
        source = f"{STATIC_POD_DIR}/{name}"
        body += [
            f"if [ -f {quote(source)} ]; then",
            "  " + shell("mv", "-f", source, f"{HELD_MANIFEST_DIR}/{name}"),
            f"  echo {quote(f'kubeadm-ha: held {name} on {host}')}",
            "fi",
        ]
    if etcd_member:
        body += _wait("etcd to stop", "! pgrep -x etcd >/dev/null", STOP_TIMEOUT_SECONDS)
    if control_plane:
        body += _wait("kube-apiserver to stop", "! pgrep -x kube-apiserver >/dev/null", STOP_TIMEOUT_SECONDS)
    return Script(
        step="etcd-restore-hold",
        host=host,
        done_when=f"! {{ {present}; }} && ! pgrep -x etcd >/dev/null && ! pgrep -x kube-apiserver >/dev/null",
        body=tuple(body),
    )


def receive_snapshot_script(host: str, digest: str) -> Script:
    """Store the snapshot arriving on stdin as RESTORE_DIR/<digest>.db, root-only, once its digest matches."""
    target = f"{RESTORE_DIR}/{digest}.db"
    mismatch = quote(f"kubeadm-ha: the snapshot received on {host} does not have SHA-256 {digest}; discarded")
    return Script(
        step="etcd-restore-receive",
        host=host,
        done_when=f"{files_match({target: digest})}",
        body=(
            shell("install", "-d", "-m", "0700", RESTORE_DIR),
            f"part={quote(target + '.part')}",
            "trap 'rm -f \"$part\"' EXIT",
            'cat >"$part"',
            f"if ! printf '%s  %s\\n' {quote(digest)} \"$part\" | sha256sum --check --status --strict; then",
            f"  echo {mismatch} >&2",
            "  exit 1",
            "fi",
            shell("mv", "-f", target + ".part", target),
        ),
    )


def restore_data_script(
    member: EtcdMember,
    initial_cluster: Sequence[EtcdMember],
    *,
    token: str,
    digest: str,
    restore_id: str,
    data_dir: str = DATA_DIR,
) -> Script:
    """`etcdutl snapshot restore` into a new data directory, then swap it in; the old one is kept aside.

    Every member is restored with the same `initial_cluster` and `token`, which is how etcd's procedure
    makes one new cluster of them. Refuses while etcd runs on the node.
    """
    snapshot = f"{RESTORE_DIR}/{digest}.db"
    parent = posixpath.dirname(data_dir)
    fresh = f"{data_dir}.kubeadm-ha-restore"
    marker = f"{RESTORE_DIR}/{restore_id}.restored"
    kept = f"{data_dir}.before-restore-{restore_id}"
    cluster = ",".join(f"{peer.name}={peer.peer_url}" for peer in initial_cluster)
    running = quote(f"kubeadm-ha: etcd still runs on {member.name}; hold its manifest first")
    return Script(
        step="etcd-restore-data",
        host=member.name,
        done_when=f"[ -f {quote(marker)} ]",
        functions=etcd_tool_functions(writable=(parent, RESTORE_DIR)),
        body=(
            f"if pgrep -x etcd >/dev/null; then echo {running} >&2; exit 1; fi",
            f"printf '%s  %s\\n' {quote(digest)} {quote(snapshot)} | sha256sum --check --status --strict",
            shell("rm", "-rf", fresh),
            logged(
                "etcd-restore",
                "kha_etcdutl",
                "snapshot",
                "restore",
                snapshot,
                f"--name={member.name}",
                f"--initial-cluster={cluster}",
                f"--initial-cluster-token={token}",
                f"--initial-advertise-peer-urls={member.peer_url}",
                f"--data-dir={fresh}",
                f"--bump-revision={BUMP_REVISION}",
                "--mark-compacted",
            ),
            f"if [ -d {quote(data_dir)} ]; then",
            "  " + shell("mv", data_dir, kept),
            "fi",
            shell("mv", fresh, data_dir),
            shell("chmod", "0700", data_dir),
            shell("touch", marker),
            f"echo {quote(f'kubeadm-ha: {member.name} restored from {digest[:12]}; old data in {kept}')}",
        ),
    )


def release_script(
    host: str, *, etcd_member: bool, control_plane: bool, which: Literal["etcd", "control-plane"]
) -> Script:
    """Put held manifests back: `etcd` first on every member, then `control-plane` once etcd is healthy."""
    wanted = ("etcd.yaml",) if which == "etcd" else CONTROL_PLANE_MANIFESTS
    names = tuple(name for name in wanted if name in _manifests(etcd_member, control_plane))
    held = " || ".join(f"[ -f {quote(f'{HELD_MANIFEST_DIR}/{name}')} ]" for name in names) or "false"
    body: list[str] = []
    for name in names:
        source = f"{HELD_MANIFEST_DIR}/{name}"
        body += [
            f"if [ -f {quote(source)} ]; then",
            "  " + shell("mv", "-f", source, f"{STATIC_POD_DIR}/{name}"),
            f"  echo {quote(f'kubeadm-ha: released {name} on {host}')}",
            "fi",
        ]
    return Script(
        step=f"etcd-restore-release-{which}", host=host, done_when=f"! {{ {held}; }}", body=tuple(body) or ("true",)
    )


def health_script(host: str, members: Sequence[EtcdMember]) -> Script:
    """From `host`: every member answers a quorum read, printed as `healthy NAME` / `unhealthy NAME` lines."""
    lines = [
        f"if kha_etcdctl --endpoints={quote(member.client_url)} endpoint health >/dev/null 2>&1; then "
        f"echo {quote('healthy ' + member.name)}; else echo {quote('unhealthy ' + member.name)}; fi"
        for member in members
    ]
    return Script(
        step="etcd-restore-health",
        host=host,
        done_when="false",
        functions=etcd_tool_functions(writable=()),
        on_node=False,
        body=tuple(lines),
    )


# --- the component ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupTarget:
    """An etcd member's node, its VM, and the step after which etcd runs there."""

    node: NodePlan
    vm: Vm
    after: pulumi.Resource


@dataclass(frozen=True)
class EtcdBackupsArgs:
    context: NodeContext
    targets: Sequence[BackupTarget]


class EtcdBackups(pulumi.ComponentResource):
    """The snapshot timer on every etcd member."""

    def __init__(self, name: str, args: EtcdBackupsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:EtcdBackups", name, None, opts)
        backup = args.context.config.etcd.backup
        policy = BackupPolicy(backup.interval_minutes, backup.keep)
        self.installed: dict[str, command.remote.Command] = {}
        for target in args.targets:
            host = target.node.hostname
            self.installed[host] = run_step(
                f"{host}-etcd-backup-timer",
                args.context.access(target.node),
                install_timer_script(host, policy),
                parent=self,
                depends_on=[target.after],
                replace_with=target.vm.domain.id,
            )
        self.register_outputs({"directory": BACKUP_DIR, "members": list(self.installed)})


# --- outputs ----------------------------------------------------------------------------------------------

HOST_KEYS_OUTPUT = "hostKeys"
ETCD_BACKUPS_OUTPUT = "etcdBackups"


def backup_locations(config: ClusterConfig, members: Sequence[str]) -> dict[str, object]:
    """The `etcdBackups` output: where snapshots live on which nodes, and the policy that writes them."""
    backup = config.etcd.backup
    return {
        "directory": BACKUP_DIR,
        "members": list(members),
        "pattern": "etcd-<hostname>-<UTC YYYYmmddTHHMMSSZ>.db (+ .sha256)",
        "intervalMinutes": backup.interval_minutes,
        "keep": backup.keep,
        "timer": TIMER,
    }
