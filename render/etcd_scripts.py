"""The scripts of an external etcd member's steps, and the files its step installs.

`member_script` places a member's certificates and manifest and starts it, adding it to the cluster
first when it is new to it; `member_delete_script` removes it; `cluster_health_script` is the step
`kubeadm init` waits for. How the member chain runs them as membership changes is told in
components/etcd.py, which wires the steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from render.etcd import (
    CLIENT_PORT,
    MANIFEST_PATH,
    STAGED_MANIFEST_PATH,
    STOPPED_MANIFEST_PATH,
    EtcdClusterSpec,
    EtcdMember,
    EtcdPaths,
    MemberStart,
    render_manifest,
)
from render.node_prep import STATIC_POD_DIR
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    BundleFile,
    Script,
    bounded_wait_function,
    files_match,
    quote,
    sha256_hex,
)
from render.scripts import command as shell

# Every etcdctl call on a node is bounded: dial, request, and the whole process.
ETCDCTL_DIAL_TIMEOUT = "3s"
ETCDCTL_COMMAND_TIMEOUT = "10s"
ETCDCTL_PROCESS_TIMEOUT_SECONDS = 20
# Long enough for a first image pull and kubelet noticing a new manifest; short enough to fail a stuck run.
MEMBER_READY_TIMEOUT_SECONDS = 300
CLUSTER_READY_TIMEOUT_SECONDS = 300
STOP_TIMEOUT_SECONDS = 60
POLL_SECONDS = 2


def etcdctl_functions(paths: EtcdPaths) -> tuple[str, ...]:
    """Shell helpers for etcdctl on an etcd node, every call bounded in time.

    They authenticate with the healthcheck client certificate: etcd runs without its own auth, so any
    certificate the etcd CA signed is a full client, and that one is already on every member.
    """
    etcdctl = shell(
        "timeout",
        ETCDCTL_PROCESS_TIMEOUT_SECONDS,
        "etcdctl",
        f"--cacert={paths.trusted_ca}",
        f"--cert={paths.healthcheck_cert}",
        f"--key={paths.healthcheck_key}",
        f"--dial-timeout={ETCDCTL_DIAL_TIMEOUT}",
        f"--command-timeout={ETCDCTL_COMMAND_TIMEOUT}",
    )
    return (
        "kha_etcdctl() {",
        # Ubuntu's etcdctl is 3.4; say v3 explicitly rather than rely on its default.
        f'  ETCDCTL_API=3 {etcdctl} "$@"',
        "}",
        "member_healthy() {",
        '  kha_etcdctl --endpoints="$1" endpoint health >/dev/null 2>&1',
        "}",
        "etcd_stopped() {",
        "  ! pgrep -x etcd >/dev/null",
        "}",
        *bounded_wait_function(POLL_SECONDS),
    )


@dataclass(frozen=True)
class MemberPems:
    """The PEM texts a member's step installs (keys are secret: keep this inside a secret Output)."""

    ca_cert: str
    server_cert: str
    server_key: str
    peer_cert: str
    peer_key: str
    healthcheck_cert: str
    healthcheck_key: str


def member_files(member: EtcdMember, cluster: EtcdClusterSpec, pems: MemberPems) -> tuple[BundleFile, ...]:
    """Everything a member's step installs from its stdin bundle: certificates, keys and the staged manifest."""
    paths = cluster.paths
    return (
        BundleFile(paths.trusted_ca, pems.ca_cert, 0o644),
        BundleFile(paths.server_cert, pems.server_cert, 0o644),
        BundleFile(paths.server_key, pems.server_key, 0o600),
        BundleFile(paths.peer_cert, pems.peer_cert, 0o644),
        BundleFile(paths.peer_key, pems.peer_key, 0o600),
        BundleFile(paths.healthcheck_cert, pems.healthcheck_cert, 0o644),
        BundleFile(paths.healthcheck_key, pems.healthcheck_key, 0o600),
        # kubeadm writes its static pod manifests 0600.
        BundleFile(STAGED_MANIFEST_PATH, render_manifest(member, cluster), 0o600),
    )


def member_key_paths(paths: EtcdPaths) -> tuple[str, ...]:
    return (paths.server_key, paths.peer_key, paths.healthcheck_key)


def member_script(member: EtcdMember, cluster: EtcdClusterSpec, cert_digests: Mapping[str, str]) -> Script:
    """Place the member's certificates, add it to the cluster if it is new to it, and start it.

    `cert_digests` maps each certificate's path to its sha256. The guard holds those and the
    manifest's digest, so new certificates or a new manifest re-run the step. A running member whose
    manifest changes is stopped and waited for before the new manifest goes in, and the step returns
    only once it is healthy again, so the member chain restarts members one at a time. New
    certificates alone need no restart: etcd reads them at every TLS handshake.
    """
    paths = cluster.paths
    start = cluster.starts[member.name]
    added = start.state == "existing"
    expected = {**cert_digests, MANIFEST_PATH: sha256_hex(render_manifest(member, cluster))}
    keys_present = " && ".join(f"[ -s {quote(path)} ]" for path in member_key_paths(paths))
    functions = (*INSTALL_BUNDLE_FUNCTION, *etcdctl_functions(paths))
    body: list[str] = [
        "install_bundle",
        shell("install", "-d", "-m", "0700", paths.data_dir),
        shell("install", "-d", "-m", "0755", STATIC_POD_DIR),
    ]
    if added:
        body += _add_member_lines(member, start, paths)
        existing = ",".join(peer.client_url for peer in start.initial_cluster if peer != member)
        functions += _add_member_function(member, existing)
    body += [
        *([] if added else ["restarted=0"]),
        f"if [ -f {quote(MANIFEST_PATH)} ] && ! cmp -s {quote(STAGED_MANIFEST_PATH)} {quote(MANIFEST_PATH)}; then",
        "  # A new image or new flags for a running member: stop it first, so the health wait below sees the new one.",
        "  " + shell("mv", "-f", MANIFEST_PATH, STOPPED_MANIFEST_PATH),
        "  " + shell("kha_wait", STOP_TIMEOUT_SECONDS, f"the old etcd of {member.name} to stop", "etcd_stopped"),
        *([] if added else ["  restarted=1"]),
        "fi",
        # A dot file: kubelet ignores hidden files in its static pod directory, so it never sees half a manifest.
        shell("install", "-m", "0600", STAGED_MANIFEST_PATH, f"{STATIC_POD_DIR}/.etcd.yaml.kubeadm-ha.tmp"),
        shell("mv", "-f", f"{STATIC_POD_DIR}/.etcd.yaml.kubeadm-ha.tmp", MANIFEST_PATH),
    ]
    what = f"etcd member {member.name} to be healthy"
    wait = shell("kha_wait", MEMBER_READY_TIMEOUT_SECONDS, what, "member_healthy", member.client_url)
    if added:
        # The next addition must find this one healthy: the chain adds members one at a time.
        body.append(wait)
    else:
        # A bootstrapping member cannot be healthy before a quorum of its peers starts: the readiness step
        # waits for the whole cluster instead. A restarted one rejoins a running cluster, so wait for it.
        body += ['if [ "$restarted" -eq 1 ]; then', "  " + wait, "fi"]
    return Script(
        step="etcd-member",
        host=member.name,
        done_when=f"{files_match(expected)} && {keys_present}",
        functions=functions,
        body=tuple(body),
    )


ADD_LOG = "etcd-member-add"


def _add_member_function(member: EtcdMember, endpoints: str) -> tuple[str, ...]:
    """`add_member`: true once `member` is in the cluster's member list, adding it if it is not.

    Checking first makes a retry safe when an earlier `member add` went through but its answer was lost.
    """
    return (
        "add_member() {",
        "  local listed",
        f'  listed="$({shell("kha_etcdctl", f"--endpoints={endpoints}", "member", "list")})" || return 1',
        # `member list` prints `ID, status, name, peer URLs, client URLs, learner`, also for an added
        # member that has not started yet (a run interrupted after `member add`).
        f'  case "$listed" in *{quote(", " + member.peer_url + ", ")}*) return 0 ;; esac',
        "  "
        + shell(
            "kha_etcdctl", f"--endpoints={endpoints}", "member", "add", member.name, f"--peer-urls={member.peer_url}"
        )
        + f' >>"${{KUBEADM_HA_LOG_DIR}}/{ADD_LOG}.log" 2>&1',
        "}",
    )


def _add_member_lines(member: EtcdMember, start: MemberStart, paths: EtcdPaths) -> list[str]:
    existing = [peer for peer in start.initial_cluster if peer != member]
    endpoints = ",".join(peer.client_url for peer in existing)
    lines = [f"# {member.name} joins a running cluster: every existing member must be healthy first."]
    lines += [
        shell(
            "kha_wait",
            MEMBER_READY_TIMEOUT_SECONDS,
            f"etcd member {peer.name} to be healthy before adding {member.name}",
            "member_healthy",
            peer.client_url,
        )
        for peer in existing
    ]
    listing = shell("kha_etcdctl", f"--endpoints={endpoints}", "member", "list")
    refuse = (
        f"kubeadm-ha: {paths.data_dir}/member on {member.name} holds etcd data, but {member.name} is not a member "
        "of the cluster (data of a removed member); move it away to add the member afresh"
    )
    cannot_list = quote(f"kubeadm-ha: cannot list the etcd members at {endpoints}")
    listed = quote(", " + member.peer_url + ", ")
    waiting = shell("kha_wait", MEMBER_READY_TIMEOUT_SECONDS, f"the etcd cluster to accept {member.name}", "add_member")
    lines += [
        f'members="$({listing})" || {{ echo {cannot_list} >&2; exit 1; }}',
        f"if [ -d {quote(paths.data_dir + '/member')} ]; then",
        f'  case "$members" in *{listed}*) ;; *) echo {quote(refuse)} >&2; exit 1 ;; esac',
        "fi",
        # etcd's strict reconfiguration check refuses a new voting member ("unhealthy cluster") until its
        # leader has been in touch with a quorum for a few seconds, e.g. right after a restart: retry in the bound.
        f"if ! {waiting}; then",
        f'  tail -n 25 "${{KUBEADM_HA_LOG_DIR}}/{ADD_LOG}.log" >&2',
        "  exit 1",
        "fi",
    ]
    return lines


def member_delete_script(member: EtcdMember, paths: EtcdPaths) -> Script:
    """Run when the member's step is deleted (the member is scaled away, or the cluster destroyed).

    Removes the member through the other members, then stops it. Bounded throughout, and it never
    blocks a destroy: the last member, or one whose cluster has no quorum left, is simply stopped.
    It only refuses when the removal fails although the others still have quorum, because stopping
    then would leave the cluster counting a dead member.

    pulumi-command would also run this on a *replacement*, which it does only when `triggers` change;
    member steps set none.
    """
    name = member.name
    local = f"https://127.0.0.1:{CLIENT_PORT}"
    # `member list` columns: ID, status, name, peer URLs, client URLs, learner.
    pick_id = f"awk -F', ' -v me={quote(name)} '$3 == me {{ print $1 }}'"
    pick_others = f"awk -F', ' -v me={quote(name)} '$3 != me && $5 != \"\" {{ print $5 }}' | paste -sd, -"
    remove = shell("logged", "etcd-member-remove", "kha_etcdctl")
    no_quorum = f"kubeadm-ha: the other members have no quorum; stopping {name} without removing it"
    refuse = (
        f"kubeadm-ha: could not remove etcd member {name} although the other members have quorum; "
        "refusing to stop it (see /var/log/kubeadm-ha/etcd-member-remove.log)"
    )
    return Script(
        step="etcd-member-remove",
        host=name,
        done_when=f"[ ! -f {quote(MANIFEST_PATH)} ]",
        functions=etcdctl_functions(paths),
        body=(
            'id="" others=""',
            f'if members="$({shell("kha_etcdctl", f"--endpoints={local}", "member", "list")})"; then',
            f'  id="$(printf \'%s\\n\' "$members" | {pick_id})"',
            f'  others="$(printf \'%s\\n\' "$members" | {pick_others})"',
            "else",
            f"  echo {quote(f'kubeadm-ha: etcd on {name} does not answer; stopping it without a member remove')} >&2",
            "fi",
            'if [ -n "$id" ] && [ -n "$others" ]; then',
            f'  if ! {remove} "--endpoints=$others" member remove "$id"; then',
            "    quorum=0",
            '    IFS=, read -ra urls <<<"$others"',
            '    for url in "${urls[@]}"; do',
            '      if member_healthy "$url"; then quorum=1; fi',
            "    done",
            '    if [ "$quorum" -eq 1 ]; then',
            f"      echo {quote(refuse)} >&2",
            "      exit 1",
            "    fi",
            f"    echo {quote(no_quorum)} >&2",
            "  fi",
            "else",
            f"  echo {quote(f'kubeadm-ha: {name} is the last etcd member (or not listed); stopping it')}",
            "fi",
            # kubelet stops the pod once its manifest is gone; the VM usually goes next anyway.
            shell("rm", "-f", MANIFEST_PATH),
            shell("kha_wait", STOP_TIMEOUT_SECONDS, f"etcd on {name} to stop", "etcd_stopped")
            + f" || echo {quote(f'kubeadm-ha: etcd on {name} is still stopping')} >&2",
        ),
    )


def cluster_health_script(host: str, cluster: EtcdClusterSpec) -> Script:
    """Every planned member answers `endpoint health` (a quorum read) in time, or the step names those that do not."""
    checks = [
        f"member_healthy {quote(member.client_url)} || unhealthy+=({quote(f'{member.name} ({member.client_url})')})"
        for member in cluster.members
    ]
    give_up = f'"kubeadm-ha: etcd is not healthy after {CLUSTER_READY_TIMEOUT_SECONDS}s; unhealthy: ${{unhealthy[*]}}"'
    all_healthy = " && ".join(f"member_healthy {quote(member.client_url)}" for member in cluster.members)
    return Script(
        step="etcd-health",
        host=host,
        done_when=all_healthy,
        functions=etcdctl_functions(cluster.paths),
        body=(
            f"deadline=$((SECONDS + {CLUSTER_READY_TIMEOUT_SECONDS}))",
            "while :; do",
            "  unhealthy=()",
            *(f"  {check}" for check in checks),
            '  if [ "${#unhealthy[@]}" -eq 0 ]; then',
            "    break",
            "  fi",
            '  if [ "$SECONDS" -ge "$deadline" ]; then',
            f"    echo {give_up} >&2",
            "    exit 1",
            "  fi",
            f"  sleep {POLL_SECONDS}",
            "done",
        ),
    )
