"""EtcdCluster: the external etcd topology, a dedicated etcd cluster on its own VMs.

Each member runs etcd as a kubelet static pod (`registry.k8s.io/etcd`), as
kubeadm's guide for an external etcd cluster does, rather than as a systemd
service: the image is the exact etcd build kubeadm pins for the configured
Kubernetes minor (Ubuntu's `etcd-server` is a 3.4 release, older than any
kubeadm this program supports, and a release tarball would need its own
download and verification path), kubelet supervises and restarts it, and an
upgrade is a new image tag in one file.

Everything that decides how a member starts is pure and lives here: the
membership plan (`plan_membership`), the member's flags (`etcd_member_flags`,
also used by the live test against a real etcd), the static pod and the scripts.

Membership changes:

* A new stack bootstraps every planned member with `initial-cluster-state: new`.
  Those names are exported (`etcdInitialMembers`) and re-exported unchanged
  forever, so an initial member keeps exactly the same flags on every run (etcd
  ignores the `initial-*` flags once it has data, and unchanged flags mean no
  restart).
* Any other member is *added*: its step waits for the existing members to be
  healthy, runs `etcdctl member add`, then starts with state `existing` and an
  initial cluster of every lower-numbered member plus itself. Each member step
  depends on the previous one, and an added member's step returns only once it
  is healthy, so additions happen one at a time.
* Lowering `etcd.replicas` drops the highest-numbered members. Each member step
  carries a `delete` command that removes the member from the cluster and stops
  it; pulumi-command runs it before the VM goes (the step depends on the VM), and
  the chain makes deletes run one at a time, highest first. An initial member
  that was removed and comes back is added like any other (the planned members
  are exported as `etcdMembers` for that).
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pulumi
import pulumi_command as command

from components.pki import (
    ETCD_CA,
    ETCD_HEALTHCHECK_CLIENT,
    ETCD_PEER_CERT_PATH,
    ETCD_PEER_KEY_PATH,
    ETCD_SERVER_CERT_PATH,
    ETCD_SERVER_KEY_PATH,
    EtcdPki,
)
from components.remote import run_step, secret
from components.vm import Vm, VmSize
from model.addressing import AddressPlan
from model.config import ClusterConfig
from model.offsets import role_address
from model.previous import PreviousDeployment
from model.running import etcd_image_tag
from render import yamldoc
from render.kubeadm import CONFIG_DIR
from render.node_prep import STATIC_POD_DIR, etcd_node_preparation
from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    BundleFile,
    Script,
    bounded_wait_function,
    encode_bundle,
    files_match,
    quote,
    sha256_hex,
)
from render.scripts import command as shell

if TYPE_CHECKING:
    from components.nodes import NodeContext

CLIENT_PORT = 2379
PEER_PORT = 2380
# Plain-HTTP /livez, /readyz and /metrics on loopback only, for kubelet's probes.
METRICS_PORT = 2381
DATA_DIR = "/var/lib/etcd"
# kubeadm's value: a snapshot (and WAL compaction) every 10k writes.
SNAPSHOT_COUNT = 10000
ETCD_IMAGE_REPOSITORY = "registry.k8s.io/etcd"
MANIFEST_PATH = f"{STATIC_POD_DIR}/etcd.yaml"
# The manifest arrives here first: kubelet starts whatever lands in STATIC_POD_DIR, and an added member
# must not start before `member add`.
STAGED_MANIFEST_PATH = f"{CONFIG_DIR}/etcd.yaml"
STOPPED_MANIFEST_PATH = f"{CONFIG_DIR}/etcd.yaml.stopped"

# Every etcdctl call on a node is bounded: dial, request, and the whole process.
ETCDCTL_DIAL_TIMEOUT = "3s"
ETCDCTL_COMMAND_TIMEOUT = "10s"
ETCDCTL_PROCESS_TIMEOUT_SECONDS = 20
# Long enough for a first image pull and kubelet noticing a new manifest; short enough to fail a stuck run.
MEMBER_READY_TIMEOUT_SECONDS = 300
CLUSTER_READY_TIMEOUT_SECONDS = 300
STOP_TIMEOUT_SECONDS = 60
POLL_SECONDS = 2

MemberState = Literal["new", "existing"]


@dataclass(frozen=True)
class EtcdPaths:
    """Where a member's data and certificates are; kubeadm's layout unless a test remaps them."""

    data_dir: str = DATA_DIR
    trusted_ca: str = ETCD_CA.cert_path
    server_cert: str = ETCD_SERVER_CERT_PATH
    server_key: str = ETCD_SERVER_KEY_PATH
    peer_cert: str = ETCD_PEER_CERT_PATH
    peer_key: str = ETCD_PEER_KEY_PATH
    healthcheck_cert: str = ETCD_HEALTHCHECK_CLIENT.cert_path
    healthcheck_key: str = ETCD_HEALTHCHECK_CLIENT.key_path


@dataclass(frozen=True)
class EtcdMember:
    name: str
    index: int
    address: ipaddress.IPv4Address

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"


@dataclass(frozen=True)
class MemberStart:
    """How a member joins: bootstrapping a new cluster, or added to an existing one."""

    state: MemberState
    initial_cluster: tuple[EtcdMember, ...]


@dataclass(frozen=True)
class EtcdClusterSpec:
    token: str
    image: str
    members: tuple[EtcdMember, ...]  # planned, by index
    starts: Mapping[str, MemberStart]
    initial_members: tuple[str, ...]  # exported and re-exported forever
    paths: EtcdPaths = field(default_factory=EtcdPaths)

    def member(self, name: str) -> EtcdMember:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"{name} is not a planned etcd member")

    @property
    def client_urls(self) -> tuple[str, ...]:
        return tuple(member.client_url for member in self.members)


def _member_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def plan_membership(config: ClusterConfig, plan: AddressPlan, previous: PreviousDeployment) -> EtcdClusterSpec:
    """Who bootstraps the cluster and who is added to it, from the plan and the last deployment's outputs."""
    members = tuple(
        EtcdMember(node.hostname, node.index, node.address) for node in sorted(plan.etcd_members, key=lambda n: n.index)
    )
    initial_names = previous.etcd_initial_members or tuple(member.name for member in members)
    # Addresses come from the name, so a bootstrapping member keeps the same initial cluster even after
    # other initial members were removed.
    initial_cluster = tuple(
        EtcdMember(name, _member_index(name), role_address(plan.network, "etcd", _member_index(name)))
        for name in sorted(initial_names, key=_member_index)
    )
    last_members = previous.etcd_members
    starts: dict[str, MemberStart] = {}
    for member in members:
        bootstrapped = member.name in initial_names and (last_members is None or member.name in last_members)
        if bootstrapped:
            starts[member.name] = MemberStart("new", initial_cluster)
        else:
            # Additions run in index order after every lower-numbered member, so those are the cluster it joins.
            below = tuple(other for other in members if other.index < member.index)
            starts[member.name] = MemberStart("existing", (*below, member))
    return EtcdClusterSpec(
        token=f"{config.cluster_name}-etcd",
        image=f"{ETCD_IMAGE_REPOSITORY}:{etcd_image_tag(config, previous)}",
        members=members,
        starts=starts,
        initial_members=tuple(member.name for member in initial_cluster),
    )


def etcd_member_flags(member: EtcdMember, cluster: EtcdClusterSpec) -> tuple[str, ...]:
    """etcd's command-line flags for `member`: the static pod's command, and what the live test runs.

    Only flags etcd 3.4 through 3.6 all accept, so Debian's etcd 3.4 can prove them.
    """
    start = cluster.starts[member.name]
    paths = cluster.paths
    return (
        f"--name={member.name}",
        f"--data-dir={paths.data_dir}",
        # Loopback too, for etcdctl on the node; clients elsewhere use the member address.
        f"--listen-client-urls=https://127.0.0.1:{CLIENT_PORT},{member.client_url}",
        f"--advertise-client-urls={member.client_url}",
        f"--listen-peer-urls={member.peer_url}",
        f"--initial-advertise-peer-urls={member.peer_url}",
        "--initial-cluster=" + ",".join(f"{peer.name}={peer.peer_url}" for peer in start.initial_cluster),
        f"--initial-cluster-state={start.state}",
        f"--initial-cluster-token={cluster.token}",
        "--client-cert-auth=true",
        f"--trusted-ca-file={paths.trusted_ca}",
        f"--cert-file={paths.server_cert}",
        f"--key-file={paths.server_key}",
        "--peer-client-cert-auth=true",
        f"--peer-trusted-ca-file={paths.trusted_ca}",
        f"--peer-cert-file={paths.peer_cert}",
        f"--peer-key-file={paths.peer_key}",
        f"--snapshot-count={SNAPSHOT_COUNT}",
        f"--listen-metrics-urls=http://127.0.0.1:{METRICS_PORT}",
    )


def _probe(path: str, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"host": "127.0.0.1", "path": path, "port": METRICS_PORT, "scheme": "HTTP"},
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "timeoutSeconds": 15,
        "failureThreshold": failure_threshold,
    }


def etcd_static_pod(member: EtcdMember, cluster: EtcdClusterSpec) -> dict[str, Any]:
    """The member's static Pod, shaped like kubeadm's own etcd manifest."""
    paths = cluster.paths
    cert_dir = posixpath.dirname(paths.trusted_ca)
    files = (paths.trusted_ca, paths.server_cert, paths.server_key, paths.peer_cert, paths.peer_key)
    if any(posixpath.dirname(path) != cert_dir for path in files):
        raise ValueError(f"etcd's certificates and keys must share one directory (mounted into the pod): {files}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "etcd",
            "namespace": "kube-system",
            "labels": {"component": "etcd", "tier": "control-plane"},
            "annotations": {"kubeadm.kubernetes.io/etcd.advertise-client-urls": member.client_url},
        },
        "spec": {
            "hostNetwork": True,
            "priority": 2000001000,
            "priorityClassName": "system-node-critical",
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "etcd",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["etcd", *etcd_member_flags(member, cluster)],
                    "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}},
                    # kubeadm's probes: /livez ignores quorum (a restart cannot bring a leader back, and a
                    # crash loop would make things worse); /readyz gates the start-up period only.
                    "livenessProbe": _probe("/livez", 8),
                    "startupProbe": _probe("/readyz", 24),
                    "volumeMounts": [
                        {"name": "etcd-data", "mountPath": paths.data_dir},
                        {"name": "etcd-certs", "mountPath": cert_dir, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "etcd-data", "hostPath": {"path": paths.data_dir, "type": "DirectoryOrCreate"}},
                {"name": "etcd-certs", "hostPath": {"path": cert_dir, "type": "DirectoryOrCreate"}},
            ],
        },
    }


def render_manifest(member: EtcdMember, cluster: EtcdClusterSpec) -> str:
    return yamldoc.dump(etcd_static_pod(member, cluster))


# --- scripts -------------------------------------------------------------------------------------------


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


# --- the component --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdClusterArgs:
    context: NodeContext
    spec: EtcdClusterSpec


class EtcdCluster(pulumi.ComponentResource):
    """The external etcd members' VMs and steps; `ready` is the step `kubeadm init` waits for."""

    def __init__(self, name: str, args: EtcdClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("kubeadm-ha:index:EtcdCluster", name, None, opts)
        context, spec = args.context, args.spec
        pki = context.pki.etcd
        if pki is None or not spec.members:
            raise ValueError("EtcdCluster needs planned members and their certificates (external topology)")
        etcd = context.config.etcd
        size = VmSize(etcd.cpus, etcd.memory_mib, etcd.disk_gib)
        nodes = {node.hostname: node for node in context.plan.etcd_members}
        self.vms: dict[str, Vm] = {}
        self.members: dict[str, command.remote.Command] = {}
        previous: command.remote.Command | None = None
        for member in spec.members:
            node = nodes[member.name]
            preparation = etcd_node_preparation(node.hostname, context.config.kubernetes)
            vm = Vm(node.hostname, context.vm_args(node, size, preparation), pulumi.ResourceOptions(parent=self))
            script, bundle = _member_outputs(member, spec, context.pki.cas[ETCD_CA.name].cert_pem, pki)
            step = run_step(
                f"{member.name}-etcd-member",
                context.access(node),
                script,
                parent=self,
                stdin=bundle,
                delete=member_delete_script(member, spec.paths),
                # The chain serialises additions, restarts and (in reverse) removals.
                depends_on=[vm.ready, *([previous] if previous is not None else [])],
                # Tearing down the whole cluster removes no members one by one.
                deleted_with=context.hypervisor_for(node).anchor,
            )
            self.vms[member.name], self.members[member.name] = vm, step
            previous = step
        first = nodes[spec.members[0].name]
        self.ready = run_step(
            f"{first.hostname}-etcd-health",
            context.access(first),
            cluster_health_script(first.hostname, spec),
            parent=self,
            depends_on=list(self.members.values()),
        )
        self.endpoints = spec.client_urls
        self.register_outputs({"endpoints": list(self.endpoints), "initialMembers": list(spec.initial_members)})


def _member_outputs(
    member: EtcdMember, spec: EtcdClusterSpec, ca_cert: pulumi.Output[str], pki: EtcdPki
) -> tuple[pulumi.Output[Script], pulumi.Output[str]]:
    """The member's script (public: it holds the certificates' digests) and its secret stdin bundle."""
    issued = pki.members[member.name]
    paths = spec.paths
    public = {
        paths.trusted_ca: ca_cert,
        paths.server_cert: issued.server.cert_pem,
        paths.peer_cert: issued.peer.cert_pem,
        paths.healthcheck_cert: pki.healthcheck_client.cert_pem,
    }
    digests = pulumi.Output.all(*public.values()).apply(
        lambda pems: {path: sha256_hex(pem) for path, pem in zip(public, pems, strict=True)}
    )
    pems = pulumi.Output.all(
        ca_cert,
        issued.server.cert_pem,
        issued.server.key_pem,
        issued.peer.cert_pem,
        issued.peer.key_pem,
        pki.healthcheck_client.cert_pem,
        pki.healthcheck_client.key_pem,
    )
    bundle = secret(pems.apply(lambda values: encode_bundle(member_files(member, spec, MemberPems(*values)))))
    return digests.apply(lambda found: member_script(member, spec, found)), bundle
