"""The external etcd cluster the program describes, run for real: Debian's etcd with the program's own material.

prod is evaluated under the offline runtime; each member's certificates and keys are taken from
the secret stdin bundle of its `etcd-member` step, and its command line from `etcd_member_flags`
(the function that also writes the static pod's command; the test checks they agree), with file
paths moved into a temp dir. Every member then runs `/usr/bin/etcd` in its own network namespace
at its planned address on one bridge; a client namespace plays the API server and the operator.

Proven: the cluster forms and every member is healthy to the healthcheck client; the API server's
client pair reads and writes while no certificate, or one from another CA, is refused; the peer
port refuses plain text and foreign certificates; with 3 members, losing the leader keeps the
cluster writable, losing a second stops writes, and bringing one back restores them with every
acknowledged write intact; and the scripts the program registers for a fourth member (after
`etcd.replicas` goes 3 -> 5) add it with `member add` and, as the step's delete, remove it again,
with this test standing in for kubelet (it starts and stops etcd as the static pod comes and goes).

Runs as root. Debian packages: etcd-server etcd-client iproute2 (Debian's etcd is 3.4, so the
flags are proven on the oldest etcd they promise to work with). Under CI=true missing ones fail.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.etcd import plan_membership
from components.pki import APISERVER_ETCD_CLIENT
from model.addressing import plan_addresses
from model.previous import NEW_STACK, PreviousDeployment
from model.stack import config_from_stack_file, parse_config
from render.etcd import (
    MANIFEST_PATH,
    PEER_PORT,
    STAGED_MANIFEST_PATH,
    STOPPED_MANIFEST_PATH,
    EtcdClusterSpec,
    EtcdMember,
    EtcdPaths,
    etcd_member_flags,
)
from render.scripts import BundleFile, encode_bundle
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, Namespace, Process, cleanup_stale, poll_until
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import bundle_by_path, script_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STACK = "prod"
CLIENT_OFFSET = 200
# Bounds for a loaded 2-core runner; etcd's defaults are a 100 ms heartbeat and a 1 s election timeout.
FORM_BOUND = 30.0
ELECTION_BOUND = 15.0
REJOIN_BOUND = 20.0
NO_QUORUM_ATTEMPTS = 3
SCRIPT_BOUND = 90.0
GROWN_REPLICAS = 5
# On a node `pgrep -x etcd` sees that node's etcd only; in the lab every member shares one PID namespace,
# so the scripts get a pgrep limited to the processes of their own network namespace.
NODE_PGREP = '#!/bin/sh\nexec /usr/bin/pgrep --ns $$ --nslist net "$@"\n'
ETCD_ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def report(message: str) -> None:
    print(f"[etcd-live] {message}")


@functools.cache
def program() -> Evaluation:
    return evaluate(STACK, project_dir=REPO)


@functools.cache
def planned() -> EtcdClusterSpec:
    config = config_from_stack_file(str(REPO / f"Pulumi.{STACK}.yaml"), STACK)
    assert config.etcd.external, f"{STACK} is expected to use external etcd"
    return plan_membership(config, plan_addresses(config), NEW_STACK)


def _grown_outputs() -> dict[str, object]:
    """What a deployed prod would report back: its bootstrap members, version and topology."""
    outputs = program().outputs
    return {key: outputs[key].value for key in ("etcdInitialMembers", "etcdTopology", "kubernetesVersion")}


@functools.cache
def grown_program() -> Evaluation:
    """prod after `etcd.replicas` went from 3 to 5 on the running cluster."""
    config = load_stack_config(REPO, STACK)
    config["kubeadm-ha:etcd"] = {**config["kubeadm-ha:etcd"], "replicas": GROWN_REPLICAS}
    return evaluate(STACK, project_dir=REPO, config=config, previous_outputs=_grown_outputs())


@functools.cache
def grown_plan() -> EtcdClusterSpec:
    raw = {key.removeprefix("kubeadm-ha:"): value for key, value in load_stack_config(REPO, STACK).items()}
    raw["etcd"] = {**raw["etcd"], "replicas": GROWN_REPLICAS}
    config = parse_config(raw, stack=STACK)
    return plan_membership(config, plan_addresses(config), PreviousDeployment(_grown_outputs()))


def write(path: Path, content: str, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(mode)
    return path


@dataclasses.dataclass(frozen=True)
class ClientPair:
    cert: Path
    key: Path


@dataclasses.dataclass
class LiveMember:
    member: EtcdMember
    namespace: Namespace
    argv: list[str]
    paths: EtcdPaths
    process: Process | None = None

    @property
    def name(self) -> str:
        return self.member.name


@dataclasses.dataclass
class ScriptRun:
    process: subprocess.Popen[str]
    output: Path

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


class EtcdLab:
    """A running etcd cluster built from the program's output, plus a client namespace to poke it from."""

    def __init__(self, lab: Lab, work: Path, etcd: str, etcdctl: str) -> None:
        self.lab, self.work, self.etcd, self.etcdctl_path = lab, work, etcd, etcdctl
        self.spec = planned()
        ev = program()
        network = plan_addresses(config_from_stack_file(str(REPO / f"Pulumi.{STACK}.yaml"), STACK)).network
        self.network = network
        self.bridge = bridge = lab.bridge()
        self.client = lab.namespace("client")
        lab.attach(
            self.client,
            bridge,
            ipaddress.IPv4Interface(f"{network.network_address + CLIENT_OFFSET}/{network.prefixlen}"),
        )
        self.members: dict[str, LiveMember] = {}
        self.scripts: list[ScriptRun] = []
        for member in self.spec.members:
            namespace = lab.namespace(member.name.removeprefix(f"{STACK}-"))
            lab.attach(namespace, bridge, ipaddress.IPv4Interface(f"{member.address}/{network.prefixlen}"))
            self.members[member.name] = self._prepare(member, namespace, ev)
        # The material the API server and the healthcheck use, exactly as the program places it.
        first = self.members[self.spec.members[0].name]
        self.ca = Path(first.paths.trusted_ca)
        self.healthcheck = ClientPair(Path(first.paths.healthcheck_cert), Path(first.paths.healthcheck_key))
        cp_files = bundle_by_path(ev.named(f"{STACK}-cp-1-place-pki").inputs["stdin"])
        self.apiserver = ClientPair(
            write(work / "apiserver" / "client.crt", cp_files[APISERVER_ETCD_CLIENT.cert_path][1], 0o644),
            write(work / "apiserver" / "client.key", cp_files[APISERVER_ETCD_CLIENT.key_path][1], 0o600),
        )
        # A client certificate from another CA of the same program: the Kubernetes CA's admin certificate.
        kubeconfig = yaml.safe_load(ev.outputs["kubeconfig"].value)
        user = kubeconfig["users"][0]["user"]
        self.foreign = ClientPair(
            write(work / "foreign" / "admin.crt", base64.b64decode(user["client-certificate-data"]).decode(), 0o644),
            write(work / "foreign" / "admin.key", base64.b64decode(user["client-key-data"]).decode(), 0o600),
        )

    def _prepare(self, member: EtcdMember, namespace: Namespace, ev: Evaluation) -> LiveMember:
        """The member's files from its step's bundle, moved under the temp dir; its flags for those paths."""
        default = self.spec.paths
        paths = self.lab_paths(member.name)
        moved = {getattr(default, field.name): getattr(paths, field.name) for field in dataclasses.fields(EtcdPaths)}
        bundle = bundle_by_path(ev.named(f"{member.name}-etcd-member").inputs["stdin"])
        # The flags the test runs are the ones the program's static pod runs, paths aside.
        manifest = yaml.safe_load(bundle[STAGED_MANIFEST_PATH][1])
        assert manifest["spec"]["containers"][0]["command"] == ["etcd", *etcd_member_flags(member, self.spec)]
        for path, (mode, content) in bundle.items():
            if path != STAGED_MANIFEST_PATH:
                write(Path(moved[path]), content, mode)
        flags = etcd_member_flags(member, dataclasses.replace(self.spec, paths=paths))
        return LiveMember(member, namespace, [*ETCD_ENV, self.etcd, *flags], paths)

    def lab_paths(self, name: str) -> EtcdPaths:
        """A node's etcd files in the lab: kubeadm's file names, under `node_root(name)`."""
        root = self.node_root(name)
        default = self.spec.paths
        return EtcdPaths(
            data_dir=str(root / "data"),
            **{
                field.name: str(root / "pki" / Path(getattr(default, field.name)).name)
                for field in dataclasses.fields(EtcdPaths)
                if field.name != "data_dir"
            },
        )

    def add_node(self, member: EtcdMember) -> Namespace:
        """A namespace at `member`'s planned address, on the bridge, with nothing running in it yet."""
        namespace = self.lab.namespace(member.name.removeprefix(f"{STACK}-"))
        address = ipaddress.IPv4Interface(f"{member.address}/{self.network.prefixlen}")
        self.lab.attach(namespace, self.bridge, address)
        return namespace

    def node_root(self, name: str) -> Path:
        """Where a node's absolute paths live in the lab: the same layout `_prepare` uses."""
        return self.work / name

    def localise(self, name: str, text: str) -> str:
        """`text` with the node's absolute paths moved under `node_root(name)` (the layout of `_prepare`)."""
        root = self.node_root(name)
        moves = {
            "/etc/kubernetes/pki/etcd/": f"{root}/pki/",
            "/etc/kubernetes/manifests": f"{root}/manifests",
            "/etc/kubernetes/kubeadm-ha": f"{root}/kubeadm-ha",
            "/var/lib/etcd": f"{root}/data",
            "/var/log/kubeadm-ha": f"{root}/log",
            "/var/lib/kubeadm-ha": f"{root}/state",
        }
        for old, new in moves.items():
            text = text.replace(old, new)
        return text

    def run_script(self, namespace: Namespace, name: str, text: str, stdin: str = "") -> ScriptRun:
        """Start a program step's script, paths localised, on the node `namespace`, as pulumi-command would."""
        root = self.node_root(name)
        bin_dir = root / "bin"
        write(bin_dir / "pgrep", NODE_PGREP, 0o755)
        output = root / f"script-{len(self.scripts)}.out"
        argv = ["/usr/bin/env", "-i", f"PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "bash", "-c"]
        with open(output, "w") as sink:
            process = subprocess.Popen(  # the program's own script, its paths moved into the lab
                namespace.exec_argv([*argv, self.localise(name, text)]),
                stdin=subprocess.PIPE,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
        run = ScriptRun(process, output)
        self.scripts.append(run)
        return run

    # processes -----------------------------------------------------------------

    def start(self, name: str) -> None:
        live = self.members[name]
        live.process = self.lab.spawn(live.namespace, live.argv, name=f"etcd-{name}")

    def stop(self, name: str) -> None:
        process = self.members[name].process
        assert process is not None
        process.stop(signal.SIGKILL)  # a crash, not a graceful hand-over

    def running(self) -> list[LiveMember]:
        return [live for live in self.members.values() if live.process is not None and live.process.alive()]

    # clients -------------------------------------------------------------------

    def etcdctl(
        self, *args: str, endpoints: list[str] | None = None, pair: ClientPair | None = None, timeout: str = "3s"
    ) -> subprocess.CompletedProcess[str]:
        """etcdctl from the client namespace (v3 API, bounded); `pair` None means no client certificate."""
        urls = endpoints or [live.member.client_url for live in self.members.values()]
        argv = [
            "/usr/bin/env", "-i", "ETCDCTL_API=3", self.etcdctl_path,
            f"--endpoints={','.join(urls)}", f"--cacert={self.ca}", "--dial-timeout=2s",
            f"--command-timeout={timeout}",
        ]  # fmt: skip
        if pair is not None:
            argv += [f"--cert={pair.cert}", f"--key={pair.key}"]
        return self.client.run(*argv, *args, check=False, timeout=30)

    def live_endpoints(self) -> list[str]:
        return [live.member.client_url for live in self.running()]

    def put(self, key: str, value: str, *, timeout: str = "3s") -> bool:
        result = self.etcdctl("put", key, value, endpoints=self.live_endpoints(), pair=self.apiserver, timeout=timeout)
        return result.returncode == 0 and result.stdout.strip() == "OK"

    def get(self, key: str) -> str | None:
        result = self.etcdctl("get", key, "--print-value-only", endpoints=self.live_endpoints(), pair=self.apiserver)
        assert result.returncode == 0, result.stderr
        return result.stdout.rstrip("\n") or None

    def statuses(self) -> list[dict[str, object]]:
        result = self.etcdctl(
            "endpoint", "status", "-w", "json", endpoints=self.live_endpoints(), pair=self.healthcheck
        )
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def leader(self) -> str:
        """The name of the member every live member agrees leads the cluster."""
        ids = {}
        leaders = set()
        for status in self.statuses():
            header = status["Status"]["header"]  # type: ignore[index]
            ids[header["member_id"]] = status["Endpoint"]
            leaders.add(status["Status"]["leader"])  # type: ignore[index]
        assert len(leaders) == 1 and 0 not in leaders, f"members disagree on the leader: {leaders}"
        (leader,) = leaders
        url = ids[leader]
        return next(live.name for live in self.members.values() if live.member.client_url == url)

    def wait_healthy(self, *, timeout: float) -> float:
        start = time.monotonic()

        def healthy() -> bool:
            for live in self.members.values():
                assert live.process is not None and live.process.alive(), (
                    f"{live.name} exited:\n{live.process and live.process.log()}"
                )
            return self.etcdctl("endpoint", "health", pair=self.healthcheck).returncode == 0

        poll_until(healthy, timeout=timeout, interval=0.2, message="every etcd member healthy")
        return time.monotonic() - start

    # peer port -----------------------------------------------------------------

    def peer_request(
        self, name: str, pair: ClientPair | None, *, tls: bool = True, source: Namespace | None = None
    ) -> bytes:
        """GET /members on a member's peer port (from the client namespace unless `source`); the raw response."""
        address = str(self.members[name].member.address)
        with (source or self.client).entered():
            raw = socket.create_connection((address, PEER_PORT), timeout=3)
        request = f"GET /members HTTP/1.1\r\nHost: {address}:{PEER_PORT}\r\nConnection: close\r\n\r\n".encode()
        try:
            if not tls:
                raw.sendall(request)
                return _read_response(raw)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(str(self.ca))
            if pair is not None:
                context.load_cert_chain(str(pair.cert), str(pair.key))
            with context.wrap_socket(raw, server_hostname=address) as conn:
                conn.sendall(request)
                return _read_response(conn)
        finally:
            raw.close()


def _read_response(conn: socket.socket) -> bytes:
    """One HTTP response (status line, headers, body by Content-Length); b"" if the peer hung up first."""
    response = http.client.HTTPResponse(conn)
    try:
        response.begin()
    except http.client.RemoteDisconnected:
        return b""
    head = f"HTTP/{response.version // 10}.{response.version % 10} {response.status} {response.reason}\r\n\r\n"
    return head.encode() + response.read()


@pytest.fixture(scope="session")
def stale_etcd_labs_removed() -> None:
    require_root()
    require_programs("ip")
    cleanup_stale()


@pytest.fixture
def etcd_lab(request: pytest.FixtureRequest, tmp_path: Path, stale_etcd_labs_removed: None) -> Iterator[EtcdLab]:
    """prod's etcd cluster, running in namespaces; torn down after the test, even when it fails."""
    programs = require_programs("ip", "etcd", "etcdctl")
    lab = Lab("etcd", log_dir=tmp_path / "logs")
    live: EtcdLab | None = None
    try:
        live = EtcdLab(lab, tmp_path / "work", programs["etcd"], programs["etcdctl"])
        started = time.monotonic()
        for name in live.members:
            live.start(name)
        formed = live.wait_healthy(timeout=FORM_BOUND)
        report(
            f"{len(live.members)} members healthy {time.monotonic() - started:.1f}s after start ({formed:.1f}s waiting)"
        )
        yield live
    finally:
        if phase_failed(request):
            print(f"\n===== etcd logs of lab {lab.prefix} =====\n{lab.logs()}")
        # The data is throwaway: no graceful shutdown to wait for.
        for script in live.scripts if live is not None else ():
            script.kill()
        for process in lab.processes:
            process.stop(signal.SIGKILL)
        lab.close()


# ----------------------------------------------------------------------------- (1) the cluster forms


def test_cluster_forms_with_every_planned_member(etcd_lab: EtcdLab) -> None:
    listing = etcd_lab.etcdctl("member", "list", "-w", "json", pair=etcd_lab.healthcheck)
    assert listing.returncode == 0, listing.stderr
    found = {
        member["name"]: (member["peerURLs"], member["clientURLs"]) for member in json.loads(listing.stdout)["members"]
    }
    assert found == {member.name: ([member.peer_url], [member.client_url]) for member in etcd_lab.spec.members}
    # Every endpoint, one by one, is healthy to the healthcheck client (a quorum read through each member).
    for member in etcd_lab.spec.members:
        health = etcd_lab.etcdctl("endpoint", "health", endpoints=[member.client_url], pair=etcd_lab.healthcheck)
        assert health.returncode == 0 and "is healthy" in health.stdout + health.stderr, health.stderr
    assert etcd_lab.leader() in etcd_lab.members


# ----------------------------------------------------------------------------- (2) client authentication


def test_only_clients_of_the_etcd_ca_get_in(etcd_lab: EtcdLab) -> None:
    assert etcd_lab.put("/registry/kubeadm-ha/probe", "from-apiserver")
    assert etcd_lab.get("/registry/kubeadm-ha/probe") == "from-apiserver"

    # A refused TLS client never gets a connection; etcdctl gives up at its command timeout.
    anonymous = etcd_lab.etcdctl("put", "/registry/kubeadm-ha/probe", "anonymous", pair=None, timeout="2s")
    assert anonymous.returncode != 0
    foreign = etcd_lab.etcdctl("put", "/registry/kubeadm-ha/probe", "foreign", pair=etcd_lab.foreign, timeout="2s")
    assert foreign.returncode != 0
    reads = [
        etcd_lab.etcdctl("get", "/registry/kubeadm-ha/probe", pair=pair, timeout="2s")
        for pair in (None, etcd_lab.foreign)
    ]
    assert all(read.returncode != 0 and "from-apiserver" not in read.stdout for read in reads)
    report(
        f"refused: no certificate -> {anonymous.stderr.strip()[-90:]!r}; other CA -> {foreign.stderr.strip()[-90:]!r}"
    )
    assert etcd_lab.get("/registry/kubeadm-ha/probe") == "from-apiserver"


# ----------------------------------------------------------------------------- (3) peer authentication


def test_peer_port_refuses_plain_text_and_foreign_certificates(etcd_lab: EtcdLab) -> None:
    name = etcd_lab.spec.members[0].name
    other = etcd_lab.members[etcd_lab.spec.members[1].name]
    peer_pair = ClientPair(Path(other.paths.peer_cert), Path(other.paths.peer_key))
    # Control: another member, from its own address with its own peer certificate, gets the member list.
    ok = etcd_lab.peer_request(name, peer_pair, source=other.namespace)
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert {member.name for member in etcd_lab.spec.members} <= {
        member["name"] for member in json.loads(ok.split(b"\r\n\r\n", 1)[1])
    }

    plain = etcd_lab.peer_request(name, None, tls=False)
    assert not plain.startswith(b"HTTP/1.1 200") and b'"peerURLs"' not in plain, plain[:200]
    # etcd also matches a peer certificate's addresses against the dialling address: a member's own
    # certificate used from elsewhere is refused too.
    refusals = (
        ("no certificate", None),
        ("another CA", etcd_lab.foreign),
        ("a peer's certificate elsewhere", peer_pair),
    )
    for label, pair in refusals:
        try:
            answer = etcd_lab.peer_request(name, pair)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as error:
            report(f"peer port, {label}: refused in the handshake ({error.__class__.__name__})")
            continue
        assert b'"peerURLs"' not in answer and not answer.startswith(b"HTTP/1.1 200"), (label, answer[:200])
        report(f"peer port, {label}: connection closed without an answer")
    status_line = plain.split(b"\r\n", 1)[0]
    report(f"peer port, plain text: {status_line!r}" if plain else "peer port, plain text: closed without an answer")


# ----------------------------------------------------------------------------- (4) quorum


def test_quorum_is_lost_and_regained_without_losing_acknowledged_writes(etcd_lab: EtcdLab) -> None:
    acked: dict[str, str] = {}
    attempted: set[str] = set()
    sequence = iter(range(10_000))

    def write_one(**kwargs: str) -> bool:
        key = f"/registry/kubeadm-ha/seq/{next(sequence):05d}"
        value = f"v-{time.monotonic_ns()}"
        attempted.add(key)
        if etcd_lab.put(key, value, **kwargs):
            acked[key] = value
            return True
        return False

    for _ in range(5):
        assert write_one()

    # The leader crashes: the two others elect a new one and keep taking writes.
    old_leader = etcd_lab.leader()
    crashed = time.monotonic()
    etcd_lab.stop(old_leader)
    poll_until(write_one, timeout=ELECTION_BOUND, interval=0.1, message="a write after the leader crashed")
    writable = time.monotonic() - crashed
    new_leader = poll_until(etcd_lab.leader, timeout=ELECTION_BOUND, interval=0.1, message="a new leader")
    assert new_leader != old_leader and new_leader in {live.name for live in etcd_lab.running()}
    report(f"leader {old_leader} killed: writable again after {writable:.1f}s, new leader {new_leader}")
    for _ in range(5):
        assert write_one()

    # A second member goes: one of three is no quorum, so every write fails (each attempt bounded).
    second = next(live.name for live in etcd_lab.running() if live.name != new_leader)
    etcd_lab.stop(second)
    started = time.monotonic()
    failures = [not write_one(timeout="2s") for _ in range(NO_QUORUM_ATTEMPTS)]
    report(
        f"{second} killed too: {sum(failures)}/{NO_QUORUM_ATTEMPTS} writes refused in {time.monotonic() - started:.1f}s"
    )
    assert all(failures)

    # One comes back (same flags, its data intact): quorum again, and nothing acknowledged is lost.
    etcd_lab.start(old_leader)
    back = time.monotonic()
    poll_until(write_one, timeout=REJOIN_BOUND, interval=0.2, message="a write after a member came back")
    report(f"{old_leader} restarted: writable after {time.monotonic() - back:.1f}s; {len(acked)} acknowledged writes")
    for key, value in acked.items():
        assert etcd_lab.get(key) == value, key
    result = etcd_lab.etcdctl(
        "get",
        "/registry/kubeadm-ha/seq/",
        "--prefix",
        "--keys-only",
        pair=etcd_lab.apiserver,
        endpoints=etcd_lab.live_endpoints(),
    )
    assert result.returncode == 0, result.stderr
    # A write that timed out without quorum may still commit once quorum is back (its proposal waited in
    # the leader's log): it was never acknowledged, so either outcome is correct. Nothing else may appear.
    found = {line for line in result.stdout.splitlines() if line}
    assert set(acked) <= found <= attempted

    # And the last one rejoins: the full cluster is healthy again.
    etcd_lab.start(second)
    report(f"{second} restarted: all healthy after {etcd_lab.wait_healthy(timeout=REJOIN_BOUND):.1f}s")


# ----------------------------------------------------------------------------- (5) membership changes


def test_a_member_is_added_and_removed_by_the_programs_own_steps(etcd_lab: EtcdLab) -> None:
    """3 -> 4 -> 3 with the scripts the program registers for member 4, this test playing kubelet."""
    ev, spec = grown_program(), grown_plan()
    member = spec.member(f"{STACK}-etcd-4")
    assert spec.starts[member.name].state == "existing"
    assert etcd_lab.put("/registry/kubeadm-ha/before-growth", "kept")
    namespace = etcd_lab.add_node(member)
    root = etcd_lab.node_root(member.name)
    manifest = Path(etcd_lab.localise(member.name, MANIFEST_PATH))
    step = ev.named(f"{member.name}-etcd-member")
    bundle = encode_bundle(
        BundleFile(etcd_lab.localise(member.name, path), etcd_lab.localise(member.name, content), mode)
        for path, (mode, content) in bundle_by_path(step.inputs["stdin"]).items()
    )

    # Create: the step waits for the others, runs `member add`, then places the manifest and waits for the member.
    started = time.monotonic()
    create = etcd_lab.run_script(namespace, member.name, script_of(step), bundle)

    def placed() -> dict[str, Any] | None:
        assert create.process.poll() is None or manifest.exists(), f"the step ended early:\n{create.text()}"
        return yaml.safe_load(manifest.read_text()) if manifest.exists() else None

    pod = poll_until(placed, timeout=SCRIPT_BOUND, interval=0.1, message="the member step to place the static pod")
    command = pod["spec"]["containers"][0]["command"]
    local = dataclasses.replace(spec, paths=etcd_lab.lab_paths(member.name))
    assert command == ["etcd", *etcd_member_flags(member, local)]
    kubelet = etcd_lab.lab.spawn(namespace, [*ETCD_ENV, etcd_lab.etcd, *command[1:]], name=f"etcd-{member.name}")
    assert create.wait(timeout=SCRIPT_BOUND) == 0, create.text()
    report(f"{member.name} added by its own step in {time.monotonic() - started:.1f}s")
    assert "added to cluster" in (root / "log" / "etcd-member-add.log").read_text()

    endpoints = [*etcd_lab.live_endpoints(), member.client_url]
    listing = etcd_lab.etcdctl("member", "list", "-w", "json", endpoints=endpoints, pair=etcd_lab.healthcheck)
    names = sorted(m.get("name", "") for m in json.loads(listing.stdout)["members"])
    assert names == sorted([*(m.name for m in etcd_lab.spec.members), member.name])
    health = etcd_lab.etcdctl("endpoint", "health", endpoints=[member.client_url], pair=etcd_lab.healthcheck)
    assert health.returncode == 0, health.stderr
    got = etcd_lab.etcdctl(
        "get",
        "/registry/kubeadm-ha/before-growth",
        "--print-value-only",
        endpoints=[member.client_url],
        pair=etcd_lab.apiserver,
    )
    assert got.stdout.strip() == "kept"

    # The same step again: the guard cannot hold here (moving the paths changed the manifest's digest), so the
    # whole body runs on a live member, and must change nothing: no second add, no restart.
    again = etcd_lab.run_script(namespace, member.name, script_of(step), bundle)
    assert again.wait(timeout=SCRIPT_BOUND) == 0, again.text()
    assert (root / "log" / "etcd-member-add.log").read_text().count("added to cluster") == 1
    assert kubelet.alive() and not Path(etcd_lab.localise(member.name, STOPPED_MANIFEST_PATH)).exists()

    # Delete: `member remove` through the others, then the manifest goes; kubelet (this test) stops etcd.
    started = time.monotonic()
    delete = etcd_lab.run_script(namespace, member.name, script_of(step, "delete"))
    poll_until(lambda: not manifest.exists(), timeout=SCRIPT_BOUND, interval=0.1, message="the manifest removed")
    kubelet.stop(signal.SIGTERM)
    assert delete.wait(timeout=SCRIPT_BOUND) == 0, delete.text()
    assert "removed from cluster" in (root / "log" / "etcd-member-remove.log").read_text()
    report(f"{member.name} removed by its step's delete in {time.monotonic() - started:.1f}s")
    listing = etcd_lab.etcdctl("member", "list", "-w", "json", pair=etcd_lab.healthcheck)
    assert sorted(m["name"] for m in json.loads(listing.stdout)["members"]) == sorted(etcd_lab.members)
    etcd_lab.wait_healthy(timeout=REJOIN_BOUND)
    assert etcd_lab.get("/registry/kubeadm-ha/before-growth") == "kept"
