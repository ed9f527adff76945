"""The node side of an etcd restore: one script per node and phase.

The restore scripts follow etcd's documented disaster-recovery procedure (tools/etcd_restore.py runs
them): hold the control-plane static pods and etcd's out of kubelet's directory, `etcdutl snapshot
restore` on every member with the same initial cluster, then put the manifests back.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Literal

from render.backup import HELD_MANIFEST_DIR, etcd_tool_functions
from render.etcd import DATA_DIR, EtcdMember
from render.node_files import etcd_owner_lines
from render.node_prep import STATIC_POD_DIR
from render.scripts import Script, files_match, logged, quote
from render.scripts import command as shell

# Where the restore keeps the pushed snapshot.
RESTORE_DIR = "/var/lib/kubeadm-ha/etcd-restore"
CONTROL_PLANE_MANIFESTS = ("kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")
STOP_TIMEOUT_SECONDS = 120
POLL_SECONDS = 2
# Kubernetes' advice for a restore: move revisions far past anything a watcher saw, and mark them
# compacted, so informers re-list instead of waiting for revisions that will never come.
BUMP_REVISION = 1_000_000_000


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
            # The owner the program gives every data directory (render/node_files.py, CIS 1.1.12).
            *etcd_owner_lines(data_dir),
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


def api_ready_script(host: str) -> Script:
    """Exit 0 once this control plane's API server answers /readyz (tools/etcd_restore.py polls it).

    Asked on loopback, but verified as `kubernetes`: kubeadm's serving certificate names that (with the node, its
    address, the first service IP and the endpoint), never 127.0.0.1, so curl refused every answer (exit 60)."""
    return Script(
        step="api-ready",
        host=host,
        done_when="false",
        body=(
            shell("curl", "--silent", "--fail", "--max-time", "5", "--cacert", "/etc/kubernetes/pki/ca.crt",
                  "--resolve", "kubernetes:6443:127.0.0.1", "https://kubernetes:6443/readyz") + " >/dev/null",
        ),
    )  # fmt: skip
