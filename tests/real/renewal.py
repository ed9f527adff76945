"""The certificate renewal step, run for real and proven: shared by the external-etcd lab
(tests/real/test_renewal_live.py) and the stacked one (tests/real/test_stacked_control_plane_live.py).

`renew_and_prove` makes one control plane due (its API server certificate re-issued by the program's CA, same
key and names, ending in SHORT_DAYS, and served), runs the program's `certificates` step for that node
unmodified (bash -c, as root, in the node's namespaces, with the real kubeadm and the crictl stand-in) while
clients loop through the VIP, and checks what an operator relies on: the renewed certificate is served,
every static pod restarted, no client noticed, the API server is back behind every load balancer when the
step returns, and a second run changes nothing.

`interrupt_then_finish` (issue 18, defect 1): the step killed after the renew with the API server's manifest
held, then run again; the re-run finishes every restart and only then is the step done.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import re
import ssl
import threading
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from render import lb_config
from render.kubeadm import PKI_DIR
from render.renewal import HELD_DIR, parse_expiry
from render.scripts import LOG_DIR
from tests.integration.netns import haproxy_servers, poll_until
from tests.real.control_plane_lab import COMPONENTS, MANIFESTS, ControlPlaneLab, Node, report
from tests.real.kubelet import STOP_GRACE, Kubelet
from tests.real.node_root import Ran
from tests.real.steps import kill_group, run_node_step, start_node_step
from tools.plan import mask, script_of

SHORT_DAYS = 20
CLIENT_ATTEMPTS = 3
CLIENT_BACKOFF = 0.5


# What VipClient reads by default: kubeadm's ClusterConfiguration, which every control plane serves.
KUBEADM_CONFIG = ("/api/v1/namespaces/kube-system/configmaps/kubeadm-config", '"ClusterConfiguration"')


@dataclass
class VipClient:
    """GETs through the VIP in a loop: each request bounded, retried as client-go would; counts what failed.
    `reads`: (path, text the answer must hold), taken in turn."""

    lab: ControlPlaneLab
    reads: tuple[tuple[str, str], ...] = (KUBEADM_CONFIG,)
    requests: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    workers: int = 4
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, number: int) -> None:
        path, expected = self.reads[number % len(self.reads)]
        last = ""
        for attempt in range(CLIENT_ATTEMPTS):
            if attempt:
                with self._lock:
                    self.retried += 1
                time.sleep(CLIENT_BACKOFF * attempt)
            try:
                response = self.lab.request("GET", path)
            except (OSError, http.client.HTTPException) as error:
                last = repr(error)
                continue
            if response.status == 200 and expected in response.body:
                return
            last = f"HTTP {response.status}: {response.body[:200]}"
            if response.status < 500 and response.status != 429:
                break
        self.failures.append(last)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.requests += 1
                number = self.requests
            self.one(number)
            self._stop.wait(0.02)

    def __enter__(self) -> VipClient:
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"vip-client-{n}") for n in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def served_certificate(
    lab: ControlPlaneLab, node: Node, *, port: int = 6443, ca_file: str = "", client: tuple[str, str] | None = None
) -> x509.Certificate:
    """The certificate `node` serves on `port` (the API server's by default), verified against `ca_file` (the
    program's cluster CA by default) and for the node's address; `client`: a (certificate, key) pair to present."""
    context = ssl.create_default_context(cafile=ca_file or str(lab.ca_file))
    if client is not None:
        context.load_cert_chain(*client)
    with lab.client.entered():
        connection = http.client.HTTPSConnection(node.address, port, timeout=5, context=context)
        connection.connect()
    try:
        assert connection.sock is not None
        der = connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def sans(certificate: x509.Certificate) -> set[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in names}


def signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    certificate.verify_directly_issued_by(ca)  # raises unless the CA's key signed it and it names the CA
    return True


def on_node(node: Node, *argv: str) -> None:
    ran = node.root.run(list(argv), netns=node.namespace.name, timeout=30)
    assert ran.returncode == 0, ran.output


def write_on_node(lab: ControlPlaneLab, node: Node, path: str, content: bytes) -> None:
    """Write a file as a process of the node does (inside its mount namespace), keeping the file's mode."""
    ran = node.root.run(
        ["bash", "-c", 'cat >"$1"', "write", path], netns=node.namespace.name, timeout=30, stdin=content.decode()
    )
    assert ran.returncode == 0, ran.output


def reissue_due(lab: ControlPlaneLab, node: Node) -> x509.Certificate:
    """The node's API server certificate again, by the program's CA, same key and names, ending in SHORT_DAYS."""
    current = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/apiserver.crt").encode())
    ca = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/ca.crt").encode())
    ca_key = serialization.load_pem_private_key(node.root.read(f"{PKI_DIR}/ca.key").encode(), password=None)
    assert isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca.subject)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SHORT_DAYS))
    )
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    short = builder.sign(ca_key, hashes.SHA256())
    write_on_node(lab, node, f"{PKI_DIR}/apiserver.crt", short.public_bytes(serialization.Encoding.PEM))
    return short


def run_certificates_step(lab: ControlPlaneLab, node: Node, script: str) -> tuple[Ran, float]:
    """The step as pulumi-command runs it (bash -c, as root, no stdin), with kubeadm and the crictl stand-in."""
    return run_node_step(lab, node, script, name="certificates")


def haproxy_retries(lab: ControlPlaneLab, server: str) -> dict[str, tuple[int, int, int]]:
    """Per load balancer: HAProxy's (sessions, retries, redispatches) for `server` in the API backend."""
    found = {}
    for plan in lab.plan.load_balancers:
        namespace = lab.nodes[plan.hostname].namespace
        servers = haproxy_servers(
            namespace, lb_config.HAPROXY_HEALTH_PORT, lb_config.HAPROXY_STATS_URI, "kube-apiserver"
        )
        row = servers.get(server)
        if row is not None:
            found[plan.hostname] = (int(row["stot"] or 0), int(row["wretr"] or 0), int(row["wredis"] or 0))
    return found


def digest(node: Node, path: str) -> str:
    return hashlib.sha256(node.root.path(path).read_bytes()).hexdigest()


def renew_and_prove(lab: ControlPlaneLab, node: Node, kubelet: Kubelet, *, watched: tuple[str, ...] = ()) -> Ran:
    """Make `node` due, run its certificates step with clients on the VIP, and prove the outcome (see the
    module). `watched`: more files the second run must leave untouched. Returns the first run."""
    days = lab.config.certificates.renew_before_days
    assert days > SHORT_DAYS
    original = served_certificate(lab, node)
    ca = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/ca.crt").encode())
    assert signed_by(original, ca)

    # Due: the API server certificate ends in SHORT_DAYS; the API server restarted (by its manifest) to serve it.
    short = reissue_due(lab, node)
    manifest, held = f"{MANIFESTS}/kube-apiserver.yaml", "/etc/kubernetes/kube-apiserver.yaml.test-held"
    on_node(node, "mv", manifest, held)
    poll_until(lambda: not node.processes["kube-apiserver"].alive(), timeout=STOP_GRACE + 10, interval=0.2,
               message="the kubelet stand-in to stop kube-apiserver")  # fmt: skip
    on_node(node, "mv", held, manifest)
    lab.wait_apiserver_ready(node.name, timeout=240)
    lab.wait_backends({node.name: "UP"}, timeout=60)
    before = served_certificate(lab, node)
    assert before.serial_number == short.serial_number
    assert sans(before) == sans(original)

    script = script_of(lab.evaluation.named(f"{node.name}-certificates"))
    kubelet.events.clear()
    counters = haproxy_retries(lab, node.name)
    with VipClient(lab) as client:
        time.sleep(2)  # the client runs before the step starts
        ran, took = run_certificates_step(lab, node, script)
        # The step moves on only once the load balancers route to the restarted API server again.
        in_rotation = {lb: lab.backend_states(lb).get(node.name) for lb in lab.load_balancer_names()}
        time.sleep(2)
    log = node.root.path(f"{LOG_DIR}/kubeadm-certs-renew.log")
    renew_log = log.read_text() if log.exists() else "(no log)"
    assert ran.returncode == 0, f"{ran.output}\n--- kubeadm certs renew:\n{renew_log}"
    assert "Falling back to default configuration" not in renew_log, renew_log  # the program's document was read
    report(f"renewal step on {node.name}: {took:.1f}s; kubelet stand-in: {', '.join(kubelet.events)}")
    report(
        f"VIP client: {client.requests} requests, {len(client.failures)} failed, {client.retried} retries"
        + (f"; failures: {client.failures[:5]}" if client.failures else "")
    )
    shielded = {
        lb: tuple(now - then for now, then in zip(values, counters[lb], strict=True))
        for lb, values in haproxy_retries(lab, node.name).items()
    }
    report(f"HAProxy (sessions, retries, redispatches) to {node.name} during the step: {shielded}")
    for component in kubelet.pods[node.name]:
        if component in node.processes:
            assert f"{component} restarted with the renewed certificates" in ran.stdout, ran.output
            assert f"stopped {component} on {node.name}" in kubelet.events
            assert f"started {component} on {node.name}" in kubelet.events

    # The API server serves a renewed certificate: later end, the program's CA, the same names.
    after = served_certificate(lab, node)
    assert after.not_valid_after_utc > before.not_valid_after_utc + datetime.timedelta(days=300)
    assert signed_by(after, ca)
    assert sans(after) == sans(original)
    recorded = parse_expiry(ran.stdout)
    assert recorded is not None
    recorded_at = datetime.datetime.fromisoformat(recorded.replace("Z", "+00:00"))
    assert recorded_at > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    report(f"served notAfter {before.not_valid_after_utc:%Y-%m-%d} -> {after.not_valid_after_utc:%Y-%m-%d}; "
           f"step recorded {recorded}")  # fmt: skip

    # Clients through the VIP noticed nothing, and the API server was back behind every load balancer.
    assert set(in_rotation.values()) == {"UP"}, in_rotation
    assert client.requests >= 10
    assert client.failures == []

    # A second run changes nothing: nothing renewed, nothing restarted.
    files = [f"{PKI_DIR}/apiserver.crt", f"{PKI_DIR}/front-proxy-client.crt", "/etc/kubernetes/admin.conf", *watched]
    digests = {path: digest(node, path) for path in files}
    pids = {name: process.pid for name, process in node.processes.items()}
    kubelet.events.clear()
    again, _ = run_certificates_step(lab, node, script)
    assert again.returncode == 0, again.output
    assert "already done" in again.stdout and "restarted" not in again.stdout, again.output
    assert parse_expiry(again.stdout) == recorded
    assert {path: digest(node, path) for path in files} == digests
    assert {name: process.pid for name, process in node.processes.items()} == pids
    assert kubelet.events == []
    return ran


# --- issue 18, defect 1: a renewal interrupted after the renew --------------------------------------------

INTERRUPT_BOUND = 180.0  # the renew and the API server's manifest moved out, on a loaded 2-core machine
_GUARD = re.compile(r'^if .+; then\n  echo "kubeadm-ha: \$\{KUBEADM_HA_STEP\} already done', re.M)


def freshness_alone(lab: ControlPlaneLab, node: Node, script: str) -> int:
    """Exit status of the step's own `certificates_fresh` on the node now: the whole guard before issue 18
    (0: the step would have printed "already done" and exited 0)."""
    found = _GUARD.search(script)
    assert found is not None, "the rendered step has no idempotency guard"
    ran, _ = run_node_step(lab, node, script[: found.start()] + "certificates_fresh\n", name="certificates-fresh",
                           timeout=60)  # fmt: skip
    return ran.returncode


def put_back_held(node: Node) -> list[str]:
    """Test cleanup after a failure: every manifest left in the step's hold directory moved back."""
    back = []
    for name in COMPONENTS:
        held = f"{HELD_DIR}/{name}.yaml"
        if node.root.exists(held):
            on_node(node, "mv", "-f", held, f"{MANIFESTS}/{name}.yaml")
            back.append(name)
    return back


def interrupt_then_finish(lab: ControlPlaneLab, node: Node, kubelet: Kubelet) -> None:
    """Make `node` due, kill its certificates step once the certificates are renewed and the API server's
    manifest is held, then prove the next run finishes the renewal (see tests/real/test_renewal_live.py)."""
    days = lab.config.certificates.renew_before_days
    components = kubelet.pods[node.name]
    started = {name: node.processes[name].pid for name in components}
    served_before = served_certificate(lab, node)
    ca = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/ca.crt").encode())
    # Due on disk only: the API server keeps serving its year-long certificate until the step restarts it.
    short = reissue_due(lab, node)
    script = script_of(lab.evaluation.named(f"{node.name}-certificates"))
    held = f"{HELD_DIR}/kube-apiserver.yaml"

    # Run 1, interrupted: killed once kubeadm has renewed and the API server's manifest is out.
    first = start_node_step(lab, node, script, lab.work / f"{node.name}-interrupted.out", name="certificates")
    try:
        poll_until(lambda: node.root.exists(held) or first.poll() is not None, timeout=INTERRUPT_BOUND,
                   interval=0.05, message="the step to hold kube-apiserver's manifest")  # fmt: skip
    finally:
        kill_group(first)
    output = mask((lab.work / f"{node.name}-interrupted.out").read_text(errors="replace"))
    assert node.root.exists(held), f"the step ended before holding kube-apiserver:\n{output}"
    renewed = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/apiserver.crt").encode())
    assert renewed.serial_number != short.serial_number, "killed before kubeadm renewed"
    stopped = f"stopped kube-apiserver on {node.name}"
    poll_until(lambda: stopped in kubelet.events, timeout=STOP_GRACE + 10, interval=0.2,
               message="the kubelet stand-in to stop the held kube-apiserver")  # fmt: skip
    assert not node.processes["kube-apiserver"].alive()
    # The state a failed `pulumi up` leaves: fresh files, the API server down, the others on the old files.
    assert freshness_alone(lab, node, script) == 0, "the renewed files should already be fresh"
    report(f"interrupted on {node.name} with kube-apiserver held; the pre-fix guard (certificates_fresh) passes")
    kubelet.events.clear()

    # Run 2: the same step (the failed create recorded nothing, so Pulumi runs the same script again).
    again, took = run_certificates_step(lab, node, script)
    said = again.stdout + again.stderr  # what the step printed (its script is in the evaluation)
    assert again.returncode == 0, said
    assert "already done" not in again.stdout, (
        f"the re-run said the renewal was done while kube-apiserver's manifest was held:\n{said}"
    )
    report(f"re-run on {node.name}: {took:.1f}s; kubelet stand-in: {', '.join(kubelet.events)}")
    # The guard said why the step was not done.
    assert "left kube-apiserver's manifest held; finishing it" in again.stdout, said
    for name in components:
        assert f"{name} restarted with the renewed certificates" in again.stdout, said
        assert node.root.exists(f"{MANIFESTS}/{name}.yaml"), f"{name}'s manifest is not back"
        assert not node.root.exists(f"{HELD_DIR}/{name}.yaml"), f"{name}'s manifest is still held"
        # Started after the renew (the events were cleared after it), so on the renewed files.
        assert f"started {name} on {node.name}" in kubelet.events, kubelet.events
        assert node.processes[name].alive() and node.processes[name].pid != started[name], name
    assert set(kubelet.events) == {f"{verb} {name} on {node.name}" for name in components for verb in
                                   ("stopped", "started")} - {stopped}  # fmt: skip

    # The API server serves the renewed certificate, and is back behind every load balancer.
    on_disk = x509.load_pem_x509_certificate(node.root.read(f"{PKI_DIR}/apiserver.crt").encode())
    served = served_certificate(lab, node)
    assert served.serial_number == on_disk.serial_number != served_before.serial_number
    assert served.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    assert signed_by(served, ca) and sans(served) == sans(served_before)
    assert {lab.backend_states(lb).get(node.name) for lb in lab.load_balancer_names()} == {"UP"}
    recorded = parse_expiry(again.stdout)
    assert recorded is not None
    report(f"served serial {served_before.serial_number:x} -> {served.serial_number:x} (the renewed file's), "
           f"notAfter {served.not_valid_after_utc:%Y-%m-%d}")  # fmt: skip

    # Run 3: now it is done, and nothing is restarted again.
    pids = {name: node.processes[name].pid for name in components}
    kubelet.events.clear()
    third, _ = run_certificates_step(lab, node, script)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "already done" in third.stdout and "restarted" not in third.stdout, third.stdout + third.stderr
    assert parse_expiry(third.stdout) == recorded
    assert {name: node.processes[name].pid for name in components} == pids
    assert kubelet.events == []
