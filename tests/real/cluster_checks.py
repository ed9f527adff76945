"""The cluster lab's checks through the VIP (tests/real/cluster_lab.py): kubectl with the stack's kubeconfig
output, run in the lab's network namespace; and what the guests sent past the lab (a packet capture).

Every command is bounded; every failure says what was asked and what came back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.real.cluster_images import BUSYBOX_REPOSITORY

KUBECTL_TIMEOUT_SECONDS = 120
READY_TIMEOUT_SECONDS = 900
POD_TIMEOUT_SECONDS = 600
SERVICE_IP = "10.96.0.1"
SERVICE_NAME = "kubernetes.default"
DNS_IP = "10.96.0.10"


class CheckFailed(AssertionError):
    pass


@dataclass(frozen=True)
class Kubectl:
    binary: Path
    kubeconfig: Path
    prefix: tuple[str, ...]

    def run(
        self, *args: str, stdin: str = "", timeout: float = KUBECTL_TIMEOUT_SECONDS
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.prefix, str(self.binary), "--kubeconfig", str(self.kubeconfig), "--request-timeout=60s", *args]
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, -1, "", f"kubectl {' '.join(args)}: timed out after {timeout} s")

    def json(self, *args: str) -> Any:
        done = self.run(*args, "-o", "json")
        if done.returncode != 0:
            raise CheckFailed(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout)


def server_of(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"])


def nodes_ready(kubectl: Kubectl, expected: list[str], timeout: float = READY_TIMEOUT_SECONDS) -> str:
    """Every expected node registered and Ready within `timeout`; a one-line account."""
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    # What the polls saw before the end, in order and without repeats: a slow check says why it was slow.
    seen: list[dict[str, str]] = []
    while True:
        try:
            items = kubectl.json("get", "nodes")["items"]
            state = {
                item["metadata"]["name"]: next(
                    (c["status"] for c in item["status"].get("conditions", []) if c["type"] == "Ready"), "Unknown"
                )
                for item in items
            }
        except CheckFailed as failed:
            state = {"(kubectl)": str(failed)[:200]}
        if sorted(state) == sorted(expected) and set(state.values()) == {"True"}:
            before = f" (before: {seen})" if seen else ""
            return f"{len(state)} nodes Ready: {', '.join(sorted(state))}{before}"
        if not seen or seen[-1] != state:
            seen.append(state)
        if time.monotonic() > deadline:
            raise CheckFailed(f"nodes not all Ready after {timeout:.0f} s: {seen}")
        time.sleep(10)


def _pod(name: str, node: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "cluster-lab"}},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "command": command}],
        },
    }


def busybox_image(kubectl: Kubectl) -> str:
    """The lab's busybox, as the bundle imported it (the node's image list)."""
    del kubectl
    from tests.real.cluster_images import busybox_image as image

    reference = image().reference
    assert reference.startswith(BUSYBOX_REPOSITORY)
    return reference


def pods_talk(kubectl: Kubectl, server_node: str, client_node: str) -> dict[str, str]:
    """A busybox httpd pod on one node, a busybox pod on another: the client resolves kubernetes.default through
    CoreDNS and fetches the server's page over the pod network. What each check showed."""
    image = busybox_image(kubectl)
    serve = (
        "busybox mkdir -p /srv && echo hello-from-$(busybox hostname) >/srv/index.html"
        " && exec busybox httpd -f -p 8080 -h /srv"
    )
    pods = [
        _pod("lab-server", server_node, image, ["/bin/busybox", "sh", "-c", serve]),
        _pod("lab-client", client_node, image, ["/bin/busybox", "sleep", "3600"]),
    ]
    text = "\n---\n".join(yaml.safe_dump(pod) for pod in pods)
    applied = kubectl.run("apply", "-f", "-", stdin=text)
    if applied.returncode != 0:
        raise CheckFailed(f"kubectl apply of the test pods: {applied.stderr.strip()}")
    waited = kubectl.run(
        "wait", "--for=condition=Ready", "pod/lab-server", "pod/lab-client", f"--timeout={POD_TIMEOUT_SECONDS}s",
        timeout=POD_TIMEOUT_SECONDS + 30,
    )  # fmt: skip
    if waited.returncode != 0:
        described = kubectl.run("describe", "pod", "lab-server", "lab-client").stdout[-3000:]
        raise CheckFailed(f"test pods not Ready: {waited.stderr.strip()}\n{described}")
    server = kubectl.json("get", "pod", "lab-server")
    client = kubectl.json("get", "pod", "lab-client")
    shown = {
        "server": f"{server['spec']['nodeName']} {server['status']['podIP']}",
        "client": f"{client['spec']['nodeName']} {client['status']['podIP']}",
    }
    # CoreDNS answers for the Service's full name (busybox nslookup asks exactly the name it is given) ...
    looked = kubectl.run("exec", "lab-client", "--", "/bin/busybox", "nslookup", f"{SERVICE_NAME}.svc.cluster.local")
    shown["nslookup"] = (looked.stdout + looked.stderr).strip().replace("\n", " | ")
    # ... and the pod's resolver finds kubernetes.default through its search path (ping prints what it resolved;
    # a ClusterIP does not answer ICMP, so its exit status says nothing).
    pinged = kubectl.run("exec", "lab-client", "--", "/bin/busybox", "ping", "-c", "1", "-W", "2", SERVICE_NAME)
    shown["resolved"] = (pinged.stdout.splitlines() or [pinged.stderr.strip()])[0]
    if SERVICE_IP not in looked.stdout or f"PING {SERVICE_NAME} ({SERVICE_IP})" not in pinged.stdout:
        raise CheckFailed(f"CoreDNS did not resolve {SERVICE_NAME} to {SERVICE_IP}: {shown}")
    shown["dns"] = f"{SERVICE_NAME} -> {SERVICE_IP} (server {DNS_IP})"
    # busybox 1.35's wget dies of SIGSEGV with -T (exit 139, measured): no -T; kubectl's own bound holds.
    url = f"http://{server['status']['podIP']}:8080/"
    fetched = kubectl.run("exec", "lab-client", "--", "/bin/busybox", "wget", "-q", "-O", "-", url)
    shown["fetch"] = (fetched.stdout + fetched.stderr).strip()
    if fetched.returncode != 0 or "hello-from-lab-server" not in fetched.stdout:
        raise CheckFailed(f"the client pod on {client_node} did not reach the server pod on {server_node}: {shown}")
    return shown


def delete_test_pods(kubectl: Kubectl) -> None:
    kubectl.run("delete", "pod", "-l", "app=cluster-lab", "--wait=true", "--timeout=120s", timeout=180)


# --- the capture --------------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """tcpdump in the lab's namespace on every interface: packets between the lab network and anything outside
    it, and every DNS query (the guests' name server is the lab's own dnsmasq)."""

    process: subprocess.Popen[bytes]
    path: Path
    cidr: str

    @classmethod
    def start(cls, prefix: list[str], path: Path, cidr: str) -> Capture:
        # Not the lab namespace's own loopback (the engine and its plugins), nor link-local IPv6 (neighbour
        # discovery on the bridge); every IPv4 packet between the lab network and anything else, every global IPv6.
        outside = (
            f"(ip and not (src net {cidr} and dst net {cidr})) or (ip6 and not ip6 multicast and not net fe80::/10)"
        )
        expression = f"not net 127.0.0.0/8 and ({outside} or port 53 or port 123)"
        argv = [*prefix, "tcpdump", "-i", "any", "-n", "-U", "-s", "300", "-w", str(path), expression]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return cls(process, path, cidr)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)

    def lines(self, expression: str) -> list[str]:
        if not self.path.is_file():
            return []
        done = subprocess.run(
            ["tcpdump", "-r", str(self.path), "-n", "-tt", expression],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        return done.stdout.splitlines()

    def leaving(self) -> list[str]:
        """Packets from the lab to an address outside its network (not multicast, broadcast or link-local), and any
        global IPv6 packet (the lab has none)."""
        return self.lines(
            f"(ip and not dst net {self.cidr} and not multicast and not broadcast and not dst net 169.254.0.0/16"
            " and not dst host 255.255.255.255 and not net 127.0.0.0/8)"
            " or (ip6 and not ip6 multicast and not net fe80::/10 and not net ::1/128)"
        )

    def dns_queries(self) -> list[str]:
        return [line for line in self.lines("udp dst port 53 or tcp dst port 53") if "?" in line]

    def ntp(self) -> list[str]:
        return self.lines("udp port 123")
