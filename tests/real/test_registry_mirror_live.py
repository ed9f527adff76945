"""Mirror mode (render/registry_mirror.py) against the real consumer: containerd 2.2.9's CRI pulling through the
files `mirror_files` renders, asked by the real crictl 1.34.0, from a real registry (distribution v3.0.0).

The lab: a bridge with three network namespaces and no other link, no default route anywhere.
- `mirror`: distribution's registry over TLS with a certificate for its address signed by the test's CA, holding the
  pause image (tests/real/oci_images.py, pushed with the registry API) as `pause:3.10.2` and as
  `proxy-ghcr/kubeadm-ha/pause:3.10.2`, the repository a Harbor-style project path maps to.
- `sink`: the node's only name server (its resolv.conf names nothing else), which answers every question REFUSED
  and records it: a pull that tried any host other than the mirror's address would have to ask it first.
- the node (tests/real/sandbox_node.py: /etc, /var, /usr, /opt overlaid, /run its own): the rendered files at their
  paths (the CA, containerd's config with config_path, a hosts.toml per registry) and containerd started with that
  config, from the cached binary; crictl asks its CRI to pull.

The mirror config: {"registry.k8s.io": "https://MIRROR:5000", "ghcr.io": "https://MIRROR:5000/v2/proxy-ghcr"}; the
second is the Harbor style, which containerd reaches with override_path (the path as given, no /v2 added), and which
distribution serves as the repository proxy-ghcr/<name>.

Proven: `crictl pull registry.k8s.io/pause:3.10.2` succeeds, the image's repo digest is the manifest pushed, and the
registry's access log has the requests; the same for ghcr.io/kubeadm-ha/pause:3.10.2 through the project path; the
node has no route but the bridge's, and the name server was asked nothing (while a pull from a registry the config
does not name did ask it: the sink sees what a stray pull does); with another CA in the CA file the pull fails with a
certificate error naming the mirror, and still asks no name server; with the right CA back, it pulls again.

Runs as root; needs iproute2, util-linux (unshare, nsenter), and tests/real/build-binaries containerd ctr crictl
registry pause. Under CI=true missing ones fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from model.artifacts import RegistryMirrorConfig
from model.versions import DEFAULT_KUBERNETES, release_for
from render.node_prep import CONTAINERD_CONFIG_FILE
from render.registry_mirror import CA_FILE, CERTS_DIR, containerd_mirror_config, mirror_files
from tests.certificates import issue
from tests.integration.conftest import phase_failed, require_programs, require_root, unavailable
from tests.integration.netns import Lab, Namespace, Process, cleanup_stale, poll_until, scratch_dir
from tests.real import lab_binaries
from tests.real.binaries import _builder, binary
from tests.real.oci_images import File, Image, write_archive
from tests.real.sandbox_node import SandboxNode

pytestmark = pytest.mark.real

SUBNET = ipaddress.IPv4Network("10.121.21.0/24")
MIRROR_IP, SINK_IP, NODE_IP = "10.121.21.10", "10.121.21.53", "10.121.21.20"
PORT = 5000
MIRROR = f"https://{MIRROR_IP}:{PORT}"
HARBOR_PROJECT = "proxy-ghcr"
TAG = lab_binaries.PAUSE_VERSION
PAUSE = f"registry.k8s.io/pause:{TAG}"
HARBOR_PAUSE = f"ghcr.io/kubeadm-ha/pause:{TAG}"
UNMIRRORED = "quay.io/kubeadm-ha/not-mirrored:1"
SOCKET = "unix:///run/containerd/containerd.sock"
START_BOUND = 30.0
PULL_BOUND = 90.0
ACCESS_LINE = re.compile(r'^(\S+) - - \[[^\]]+\] "(\w+) (\S+) HTTP/[\d.]+" (\d+)', re.M)


def report(message: str) -> None:
    print(f"[mirror] {message}")


# ----------------------------------------------------------------------------- certificates


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Pki:
    ca: str  # PEM: the site's CA
    other_ca: str  # PEM: a CA that did not sign the mirror's certificate
    certificate: Path
    key: Path


def write_pki(directory: Path) -> Pki:
    directory.mkdir(mode=0o700)
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = issue("kubeadm-ha test mirror CA", ca_key, key_usage=True)
    other = issue("kubeadm-ha test mirror CA", other_key, key_usage=True)  # same name, another key
    server = issue(
        "mirror", server_key, (ca, ca_key), usages=[ExtendedKeyUsageOID.SERVER_AUTH], ips=(MIRROR_IP,), key_usage=True
    )
    (directory / "mirror.crt").write_text(_pem(server))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "mirror.key").write_bytes(key_pem)
    (directory / "mirror.key").chmod(0o600)
    return Pki(_pem(ca), _pem(other), directory / "mirror.crt", directory / "mirror.key")


# ----------------------------------------------------------------------------- the registry


def registry_config(work: Path, pki: Pki) -> Path:
    config = work / "registry.yml"
    config.write_text(
        "\n".join(
            [
                "version: 0.1",
                "log:",
                "  level: info",
                "storage:",
                "  filesystem:",
                f"    rootdirectory: {work / 'registry-data'}",
                "http:",
                f"  addr: {MIRROR_IP}:{PORT}",
                "  tls:",
                f"    certificate: {pki.certificate}",
                f"    key: {pki.key}",
                "",
            ]
        )
    )
    return config


class Registry:
    """The registry API as a pushing client would use it, from inside the mirror's namespace."""

    def __init__(self, namespace: Namespace, ca: str) -> None:
        self.namespace = namespace
        self.context = ssl.create_default_context(cadata=ca)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection(MIRROR_IP, PORT, context=self.context, timeout=10)
        # The socket is made (and so stays) in the mirror's namespace: never a connection from the host's.
        with self.namespace.entered():
            connection.connect()
        connection.auto_open = 0  # and never again outside it
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def push_blob(self, repository: str, data: bytes) -> None:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        status, headers, body = self.request("POST", f"/v2/{repository}/blobs/uploads/")
        assert status == 202, (status, body)
        location = headers["location"]
        location = location.split(f"{MIRROR_IP}:{PORT}", 1)[-1]
        separator = "&" if "?" in location else "?"
        status, _, body = self.request(
            "PUT",
            f"{location}{separator}digest={digest}",
            data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        assert status == 201, (status, body)

    def push_image(self, repository: str, tag: str, archive: Path) -> str:
        """The image in the OCI archive as repository:tag; returns its manifest's digest."""
        with tarfile.open(archive) as tar:
            blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
        (entry,) = json.loads(blobs["index.json"])["manifests"]
        manifest = blobs[f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}"]
        document = json.loads(manifest)
        for descriptor in (document["config"], *document["layers"]):
            self.push_blob(repository, blobs[f"blobs/sha256/{descriptor['digest'].removeprefix('sha256:')}"])
        status, headers, body = self.request(
            "PUT", f"/v2/{repository}/manifests/{tag}", manifest, {"Content-Type": document["mediaType"]}
        )
        assert status == 201, (status, body)
        assert headers["docker-content-digest"] == entry["digest"]
        return str(entry["digest"])


# ----------------------------------------------------------------------------- the name server that answers nothing


@dataclass
class NameSink:
    """A UDP and TCP listener on port 53 that answers every query REFUSED and records each name asked."""

    namespace: Namespace
    asked: list[str] = field(default_factory=list)
    connections: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        with self.namespace.entered():
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp.bind((SINK_IP, 53))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((SINK_IP, 53))
        tcp.listen(8)
        for target, sock in ((self._udp, udp), (self._tcp, tcp)):
            sock.settimeout(0.2)
            thread = threading.Thread(target=target, args=(sock,), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _name(query: bytes) -> str:
        labels, at = [], 12
        while at < len(query) and query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode(errors="replace"))
            at += 1 + query[at]
        return ".".join(labels)

    @staticmethod
    def _refused(query: bytes) -> bytes:
        end = 12
        while end < len(query) and query[end]:
            end += 1 + query[end]
        question = query[12 : end + 5]
        return query[:2] + bytes([0x80 | (query[2] & 0x01), 0x85]) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question

    def _udp(self, sock: socket.socket) -> None:
        with sock:
            while not self.stop.is_set():
                try:
                    query, peer = sock.recvfrom(4096)
                except TimeoutError:
                    continue
                if len(query) > 12:
                    self.asked.append(self._name(query))
                    sock.sendto(self._refused(query), peer)

    def _tcp(self, sock: socket.socket) -> None:
        with sock:
            while not self.stop.is_set():
                try:
                    connection, _ = sock.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                with connection:
                    connection.settimeout(1)
                    with contextlib.suppress(OSError):
                        data = connection.recv(4096)
                        if len(data) > 14:
                            self.asked.append(self._name(data[2:]))

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


# ----------------------------------------------------------------------------- the lab


@dataclass
class MirrorLab:
    lab: Lab
    node: SandboxNode
    node_namespace: Namespace
    registry: Registry
    registry_process: Process
    sink: NameSink
    crictl: str
    digests: dict[str, str]
    pki: Pki
    work: Path

    def crictl_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [self.crictl, "--runtime-endpoint", SOCKET, "--image-endpoint", SOCKET, "--timeout", "60s", *args]
        return self.node.run(argv, timeout=PULL_BOUND)

    def pull(self, reference: str) -> subprocess.CompletedProcess[str]:
        return self.crictl_run("pull", reference)

    def requests(self) -> list[tuple[str, str, str, str]]:
        """(client, method, path, status) of every request in the registry's access log."""
        return ACCESS_LINE.findall(self.registry_process.log())


def _lab_binary(name: str) -> str:
    path = lab_binaries.cached_path(name, lab_binaries.default_version(name), Path(_builder().CACHE))
    if not path.is_file():
        unavailable(f"{name} is not built: run tests/real/build-binaries {name}")
    return str(path)


@pytest.fixture(scope="module")
def mirror_lab(request: pytest.FixtureRequest) -> Iterator[MirrorLab]:
    require_root()
    require_programs("ip", "nsenter", "unshare")
    containerd, ctr = binary("containerd"), binary("ctr")
    crictl, registry_binary, pause_binary = _lab_binary("crictl"), _lab_binary("registry"), _lab_binary("pause")
    cleanup_stale()
    work = scratch_dir("mirror")
    lab = Lab("mirror", log_dir=work / "logs")
    node: SandboxNode | None = None
    sink: NameSink | None = None
    failures = request.session.testsfailed
    failed = False
    try:
        pki = write_pki(work / "pki")
        bridge = lab.bridge()
        namespaces = {name: lab.namespace(name) for name in ("mirror", "sink", "node")}
        for name, address in (("mirror", MIRROR_IP), ("sink", SINK_IP), ("node", NODE_IP)):
            lab.attach(namespaces[name], bridge, ipaddress.IPv4Interface(f"{address}/{SUBNET.prefixlen}"))

        sink = NameSink(namespaces["sink"])
        sink.start()
        registry_process = lab.spawn(
            namespaces["mirror"],
            ["/usr/bin/env", "-i", "OTEL_TRACES_EXPORTER=none", registry_binary, "serve",
             str(registry_config(work, pki))],
            name="registry",
        )  # fmt: skip
        registry = Registry(namespaces["mirror"], pki.ca)

        def answering() -> bool:
            assert registry_process.alive(), f"the registry exited: {registry_process.log()}"
            return registry.request("GET", "/v2/")[0] == 200

        poll_until(answering, timeout=START_BOUND, interval=0.2, message="the registry to answer over TLS")
        image = Image(PAUSE, {"/pause": File(Path(pause_binary))}, entrypoint=("/pause",), user="65535:65535")
        # The project's image differs (the file's mode): its pull must fetch every blob of its own.
        harbor = Image(HARBOR_PAUSE, {"/pause": File(Path(pause_binary), mode=0o555)}, entrypoint=("/pause",))
        digests = {
            PAUSE: registry.push_image("pause", TAG, write_archive(image, work / "pause.tar")),
            HARBOR_PAUSE: registry.push_image(
                f"{HARBOR_PROJECT}/kubeadm-ha/pause", TAG, write_archive(harbor, work / "harbor-pause.tar")
            ),
        }

        # The node: the rendered files at their paths, its only name server the sink, containerd on that config.
        node = SandboxNode(work / "node", netns=namespaces["node"].path)
        mirror = RegistryMirrorConfig.model_validate(
            {
                "registries": {"registry.k8s.io": MIRROR, "ghcr.io": f"{MIRROR}/v2/{HARBOR_PROJECT}"},
                "caCertificate": pki.ca,
            }
        )
        pause_tag = release_for(DEFAULT_KUBERNETES).pause_tag
        files = mirror_files(mirror, pause_tag)
        assert files[CONTAINERD_CONFIG_FILE] == containerd_mirror_config(pause_tag)
        for path, content in {
            **files,
            "/etc/resolv.conf": f"nameserver {SINK_IP}\noptions timeout:1 attempts:1\n",
        }.items():
            target = node.path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            target.chmod(0o644)
        node.start()
        node_log = work / "logs" / "containerd.log"
        with open(node_log, "ab") as log:
            popen = subprocess.Popen(
                node.argv([containerd, "--log-level", "debug"]), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": f"{os.path.dirname(containerd)}:/usr/sbin:/usr/bin:/sbin:/bin"},
            )  # fmt: skip
        lab.processes.append(Process("containerd", namespaces["node"], [containerd], node_log, popen))

        def containerd_ready() -> bool:
            assert popen.poll() is None, f"containerd exited {popen.returncode}"
            return node.run([ctr, "version"], timeout=5).returncode == 0

        poll_until(containerd_ready, timeout=START_BOUND, interval=0.2, message="containerd to answer")
        report(f"registry at {MIRROR} holds {digests}; containerd runs with the rendered mirror config")
        yield MirrorLab(lab, node, namespaces["node"], registry, registry_process, sink, crictl, digests, pki, work)
    except BaseException:
        failed = True
        raise
    finally:
        if failed or phase_failed(request) or request.session.testsfailed > failures:
            print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs(tail=40)}")
        if node is not None:
            node.close()
        if sink is not None:
            sink.close()
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- tests


def assert_pulled_from_mirror(lab: MirrorLab, since: int, repository: str, registry: str, digest: str) -> None:
    """The node's requests since the `since`-th: the tag resolved, then the manifest, config and layer by digest,
    all answered 200, each with containerd's ns= naming the registry the image reference names."""
    requests = lab.requests()[since:]
    assert {client for client, *_ in requests} == {NODE_IP}, requests
    assert all(status == "200" for *_, status in requests), requests
    paths = [(method, path) for _, method, path, _ in requests]
    suffix = f"?ns={registry}"
    assert paths[0] == ("HEAD", f"/v2/{repository}/manifests/{TAG}{suffix}"), paths
    assert paths[1] == ("GET", f"/v2/{repository}/manifests/{digest}{suffix}"), paths
    blobs = [path for method, path in paths[2:] if method == "GET" and f"/v2/{repository}/blobs/sha256:" in path]
    assert len(blobs) == 2 and len(paths) == 4, paths  # the config and the one layer


def test_the_node_reaches_nothing_but_the_lab(mirror_lab: MirrorLab) -> None:
    routes = [line.strip() for line in mirror_lab.node.run(["ip", "-4", "route"]).stdout.splitlines()]
    assert routes == [f"{SUBNET} dev eth0 proto kernel scope link src {NODE_IP}"], routes
    assert "default" not in mirror_lab.node.run(["ip", "-6", "route"]).stdout
    outside = mirror_lab.node.run(["ip", "route", "get", "1.1.1.1"])
    assert outside.returncode != 0 and "unreachable" in outside.stderr, outside.stderr


def test_a_registry_k8s_io_image_comes_from_the_mirror_only(mirror_lab: MirrorLab) -> None:
    asked_before, requests_before = list(mirror_lab.sink.asked), len(mirror_lab.requests())
    started = time.monotonic()
    pulled = mirror_lab.pull(PAUSE)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    report(f"crictl pull {PAUSE} through the mirror in {time.monotonic() - started:.1f} s")
    inspected = json.loads(mirror_lab.crictl_run("inspecti", "-o", "json", PAUSE).stdout)
    assert f"registry.k8s.io/pause@{mirror_lab.digests[PAUSE]}" in inspected["status"]["repoDigests"], inspected
    assert_pulled_from_mirror(mirror_lab, requests_before, "pause", "registry.k8s.io", mirror_lab.digests[PAUSE])
    assert mirror_lab.sink.asked == asked_before, f"the node asked for names: {mirror_lab.sink.asked}"


def test_a_harbor_style_project_path_is_used_as_given(mirror_lab: MirrorLab) -> None:
    hosts = mirror_lab.node.path(f"{CERTS_DIR}/ghcr.io/hosts.toml").read_text()
    assert f'server = "{MIRROR}/v2/{HARBOR_PROJECT}"' in hosts and "override_path = true" in hosts, hosts
    asked_before, requests_before = list(mirror_lab.sink.asked), len(mirror_lab.requests())
    pulled = mirror_lab.pull(HARBOR_PAUSE)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    inspected = json.loads(mirror_lab.crictl_run("inspecti", "-o", "json", HARBOR_PAUSE).stdout)
    assert f"ghcr.io/kubeadm-ha/pause@{mirror_lab.digests[HARBOR_PAUSE]}" in inspected["status"]["repoDigests"]
    repository = f"{HARBOR_PROJECT}/kubeadm-ha/pause"
    assert_pulled_from_mirror(mirror_lab, requests_before, repository, "ghcr.io", mirror_lab.digests[HARBOR_PAUSE])
    assert mirror_lab.sink.asked == asked_before, f"the node asked for names: {mirror_lab.sink.asked}"


def test_a_registry_the_config_does_not_name_is_asked_of_the_name_server(mirror_lab: MirrorLab) -> None:
    """The sink's control: a stray pull does ask it, so its silence in the other tests means something."""
    pulled = mirror_lab.pull(UNMIRRORED)
    assert pulled.returncode != 0, pulled.stdout
    assert "quay.io" in mirror_lab.sink.asked, (mirror_lab.sink.asked, pulled.stderr)


def test_another_ca_fails_the_pull_with_a_certificate_error(mirror_lab: MirrorLab) -> None:
    node = mirror_lab.node
    assert mirror_lab.crictl_run("rmi", PAUSE).returncode == 0
    other = mirror_lab.work / "other-ca.crt"
    other.write_text(mirror_lab.pki.other_ca)
    right = mirror_lab.work / "right-ca.crt"
    right.write_text(mirror_lab.pki.ca)
    assert node.run(["cp", str(other), CA_FILE]).returncode == 0
    asked_before = list(mirror_lab.sink.asked)
    try:
        pulled = mirror_lab.pull(PAUSE)
        assert pulled.returncode != 0, pulled.stdout
        assert "x509: certificate signed by unknown authority" in pulled.stderr, pulled.stderr
        assert f"{MIRROR_IP}:{PORT}" in pulled.stderr, pulled.stderr
        assert mirror_lab.sink.asked == asked_before, f"the node asked for names: {mirror_lab.sink.asked}"
    finally:
        assert node.run(["cp", str(right), CA_FILE]).returncode == 0
    again = mirror_lab.pull(PAUSE)
    assert again.returncode == 0, again.stdout + again.stderr
