"""The drill's production target: a deployed stack, reached over SSH (host keys pinned) and HTTPS to the VIP
with the stack's kubeconfig. `tools.drill` runs the drill against it; the tests run the same drill against
the namespace lab (tests/real/drill_target.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from render.backup import HELD_MANIFEST_DIR, etcd_tool_functions
from render.etcd_restore import CONTROL_PLANE_MANIFESTS, hold_script, release_script
from render.node_prep import STATIC_POD_DIR
from render.scripts import Script, command, quote
from tools.access import (
    StackAccess,
    ToolError,
    Transport,
    run_checked,
)

DRILL_CONFIGMAP = "kubeadm-ha-drill"


def agreed_leader(statuses: Sequence[Any], members: Any) -> str | None:
    """The member that every answering endpoint names as leader; None while they disagree or none answers.

    `statuses`: `etcdctl endpoint status -w json` entries, each endpoint asked on its own. Asked together,
    etcdctl fails the whole call when one endpoint does not answer, and the drill asks exactly while one member
    is stopped: the re-elected leader was never seen (tests/real/test_stacked_control_plane_live.py).
    `members`: `etcdctl member list -w json`."""
    listed = members.get("members", []) if isinstance(members, Mapping) else []
    names = {int(member["ID"]): member.get("name", "") for member in listed}
    leaders = {int(status["Status"]["leader"]) for status in statuses}
    return names.get(leaders.pop()) if len(leaders) == 1 else None


def _script(step: str, host: str, *body: str, functions: tuple[str, ...] = ()) -> Script:
    return Script(step=step, host=host, done_when="false", on_node=False, functions=functions, body=body)


class StackTarget:
    """The drill against a deployed stack."""

    def __init__(self, access: StackAccess, transport: Transport, workdir: Path) -> None:
        self.access, self.transport = access, transport
        kubeconfig = yaml.safe_load(access.kubeconfig)
        cluster, user = kubeconfig["clusters"][0]["cluster"], kubeconfig["users"][0]["user"]
        self.ca = workdir / "ca.crt"
        self.ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        cert, key = workdir / "client.crt", workdir / "client.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.touch(mode=0o600)
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        self.context = ssl.create_default_context(cafile=str(self.ca))
        self.context.load_cert_chain(str(cert), str(key))
        server = urlsplit(cluster["server"])
        self.host, self.port = server.hostname or "", server.port or 443
        self._members: Any = None

    def _on(self, host: str, script: Script, timeout: float = 60) -> str:
        return run_checked(self.transport, self.access.nodes[host], script, timeout=timeout)

    def control_planes(self) -> list[str]:
        return [node.hostname for node in self.access.role("cp")]

    def load_balancers(self) -> list[str]:
        return [node.hostname for node in self.access.role("lb")]

    def etcd_members(self) -> list[str]:
        return [node.hostname for node in self.access.etcd_nodes]

    def stacked_etcd(self) -> bool:
        return self.access.etcd_topology != "external"

    def _etcd_on(self, host: str, *args: str) -> Any:
        """etcdctl's JSON from `host`, against its own member (`kha_etcdctl` names the local endpoint; a second
        `--endpoints` would be added to it, not replace it); None when that fails."""
        script = _script(
            "drill-etcd", host, "kha_etcdctl " + " ".join(quote(arg) for arg in args),
            functions=etcd_tool_functions(writable=()),
        )  # fmt: skip
        try:
            return json.loads(self._on(host, script).split("\nkubeadm-ha:")[0])
        except (ToolError, json.JSONDecodeError):
            return None

    def _etcd(self, *args: str) -> Any:
        """etcdctl's JSON from the first member that answers."""
        for member in self.access.etcd_members:
            found = self._etcd_on(member.name, *args)
            if found is not None:
                return found
        return None

    def etcd_leader(self) -> str | None:
        # Each member on its own node: a stopped member fails only its own query (see `agreed_leader`).
        statuses: list[Any] = []
        for member in self.access.etcd_members:
            statuses += self._etcd_on(member.name, "endpoint", "status", "-w", "json") or []
        if self._members is None:  # the members do not change during a drill: listed once
            self._members = self._etcd("member", "list", "-w", "json")
        return agreed_leader(statuses, self._members)

    def etcd_healthy(self) -> set[str]:
        healthy = set()
        for member in self.access.etcd_members:
            found = self._etcd_on(member.name, "endpoint", "health", "-w", "json")
            if found and all(entry.get("health") for entry in found):
                healthy.add(member.name)
        return healthy

    def _request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=5, context=self.context)
        try:
            payload = json.dumps(body) if body is not None else None
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode(errors="replace")
            return response.status, json.loads(text) if text.startswith("{") else text
        finally:
            connection.close()

    def lease_holder(self, lease: str) -> str | None:
        status, body = self._request("GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{lease}")
        return holder_host(body, self.control_planes()) if status == 200 else None

    def api_ready(self) -> bool:
        return self._request("GET", "/readyz")[0] == 200

    def api_write(self, value: str) -> bool:
        return write_configmap(self._request, value)

    def stop_control_plane(self, host: str) -> None:
        self._on(host, hold_script(host, etcd_member=self.stacked_etcd(), control_plane=True), timeout=300)

    def start_control_plane(self, host: str) -> None:
        for which in ("etcd", "control-plane"):
            script = release_script(host, etcd_member=self.stacked_etcd(), control_plane=True, which=which)
            self._on(host, script)

    def control_plane_ready(self, host: str) -> bool:
        probe = "curl --silent --fail --max-time 5 --cacert /etc/kubernetes/pki/ca.crt https://127.0.0.1:6443/readyz"
        return "ok" in self._on(host, _script("drill-ready", host, f"{probe} || true"))

    def vip_holder(self) -> str | None:
        vip = self.host
        for host in self.load_balancers():
            check = f"if ip -4 -o addr show | grep -qw {quote('inet ' + vip)}; then echo holder; fi"
            try:
                if "holder" in self._on(host, _script("drill-vip", host, check)).split():
                    return host
            except ToolError:
                continue
        return None

    def stop_load_balancer(self, host: str) -> None:
        self._on(host, _script("drill-lb-stop", host, "systemctl stop keepalived haproxy"))

    def start_load_balancer(self, host: str) -> None:
        self._on(host, _script("drill-lb-start", host, "systemctl start haproxy keepalived"))

    def start_command(self, host: str, kind: str) -> str:
        return manual_start(self.access, host, kind)


def manual_start(access: StackAccess, host: str, kind: str) -> str:
    """What an operator runs to undo the drill's stop of `kind` on `host` (printed when the drill's own
    restore failed): the held manifests moved back (etcd's first, as `release_script` orders them) for
    kubelet to start, or the load balancer's services started. Both do nothing when nothing is stopped."""
    if kind == "load-balancer":
        remote = command("sudo", "systemctl", "start", "haproxy", "keepalived")
    else:
        stacked = access.etcd_topology != "external"
        names = ("etcd.yaml", *CONTROL_PLANE_MANIFESTS) if stacked else CONTROL_PLANE_MANIFESTS
        held, back = quote(HELD_MANIFEST_DIR) + '/"$name"', quote(STATIC_POD_DIR + "/")
        loop = f"for name in {command(*names)}; do if [ -f {held} ]; then mv -f {held} {back}; fi; done"
        remote = command("sudo", "sh", "-c", loop)
    return command("ssh", "-l", access.ssh_user, access.nodes[host].address, remote)


def holder_host(lease: Any, hosts: list[str]) -> str | None:
    """The host in a Lease's `holderIdentity` (`<hostname>_<uuid>`), if it is one of `hosts`."""
    identity = str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")
    name = identity.split("_", 1)[0]
    return name if name in hosts else None


def write_configmap(request: Callable[..., tuple[int, Any]], value: str) -> bool:
    """Create or replace the drill's ConfigMap in kube-system: a write that must reach etcd."""
    path = "/api/v1/namespaces/kube-system/configmaps"
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": DRILL_CONFIGMAP}, "data": {"last": value}}
    status, _ = request("PUT", f"{path}/{DRILL_CONFIGMAP}", body)
    if status == 404:
        status, _ = request("POST", path, body)
    return status in (200, 201)
