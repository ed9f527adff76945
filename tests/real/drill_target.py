"""tools.drill's view of the real control-plane lab (tests/real/control_plane_lab.py), external or stacked etcd.

`LabTarget` implements tools.drill.DrillTarget: what SSH and the VIP's HTTPS are in production, processes and
the client namespace are here. Stopping a control plane stops its components (and its etcd member with stacked
etcd); stopping a load balancer stops its keepalived and HAProxy. Lease holders are read from the API; since
every lab process shares the machine's hostname (a lease identity is `<hostname>_<uuid>`), the holder's node is
the one whose component reports `leader_election_master_status 1` on its own metrics endpoint.

`HeldManifestsTarget` is the same view with production's control-plane stop and start: `StackTarget`'s hold
and release scripts (the static pod manifests moved out of /etc/kubernetes/manifests and back) run on the node
through `NodeTransport`, where SSH is in production, and the `Kubelet` stand-in stops and starts the static
pods as their manifests leave and return.
"""

from __future__ import annotations

import http.client
import json
import signal
import ssl
from pathlib import Path
from typing import Any

from tests.integration.netns import Process
from tests.real.control_plane_lab import ControlPlaneLab
from tests.real.kubelet import node_tools
from tests.real.node_transport import NodeTransport
from tools.access import access_from_outputs
from tools.drill_stack import StackTarget, agreed_leader, write_configmap

COMPONENT_PORTS = {"kube-controller-manager": 10257, "kube-scheduler": 10259}


class LabTarget:
    def __init__(self, lab: ControlPlaneLab) -> None:
        self.lab = lab
        self.stopped: dict[str, list[Process]] = {}

    def control_planes(self) -> list[str]:
        return [plan.hostname for plan in self.lab.plan.control_planes]

    def load_balancers(self) -> list[str]:
        return [plan.hostname for plan in self.lab.plan.load_balancers]

    def etcd_members(self) -> list[str]:
        return list(self.lab.etcd_client_urls())

    def stacked_etcd(self) -> bool:
        return not self.lab.config.etcd.external

    def etcd_leader(self) -> str | None:
        statuses: list[Any] = []
        for url in self.lab.etcd_client_urls().values():
            status = self.lab.etcdctl("endpoint", "status", "-w", "json", endpoints=[url])
            if status.returncode == 0:
                statuses += json.loads(status.stdout)
        listing = self.lab.etcdctl("member", "list", "-w", "json")
        return agreed_leader(statuses, json.loads(listing.stdout) if listing.returncode == 0 else None)

    def etcd_healthy(self) -> set[str]:
        return {
            name
            for name, url in self.lab.etcd_client_urls().items()
            if self.lab.etcdctl("endpoint", "health", endpoints=[url]).returncode == 0
        }

    def _leading(self, host: str, component: str) -> bool:
        node = self.lab.nodes[host]
        process = node.processes.get(component)
        if process is None or not process.alive():
            return False
        # The component's own serving certificate is self-signed; the admin pair authenticates.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(str(self.lab.cert_file), str(self.lab.key_file))
        with node.namespace.entered():
            connection = http.client.HTTPSConnection(
                "127.0.0.1", COMPONENT_PORTS[component], timeout=3, context=context
            )
            connection.connect()
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode(errors="replace")
        finally:
            connection.close()
        return any(
            line.startswith("leader_election_master_status") and line.rstrip().endswith(" 1")
            for line in text.splitlines()
        )

    def lease_holder(self, lease: str) -> str | None:
        response = self.lab.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{lease}")
        if response.status != 200 or not (response.json().get("spec") or {}).get("holderIdentity"):
            return None
        leaders = [host for host in self.control_planes() if self._safe_leading(host, lease)]
        return leaders[0] if len(leaders) == 1 else None

    def _safe_leading(self, host: str, component: str) -> bool:
        try:
            return self._leading(host, component)
        except OSError:
            return False

    def api_ready(self) -> bool:
        return self.lab.request("GET", "/readyz", admin=False, timeout=2).status == 200

    def api_write(self, value: str) -> bool:
        def request(method: str, path: str, body: object) -> tuple[int, Any]:
            return self.lab.request(method, path, body=body, timeout=8).status, None

        return write_configmap(request, value)

    def stop_control_plane(self, host: str) -> None:
        """Its static pods, as kubelet stops them; with stacked etcd its member too, last."""
        node = self.lab.nodes[host]
        for component in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if component in node.processes:
                node.processes[component].stop(signal.SIGTERM, timeout=10)

    def start_control_plane(self, host: str) -> None:
        node = self.lab.nodes[host]
        if "etcd" in node.processes:
            self.lab.start_stacked_etcd(node)
        for component in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            if component in node.processes:
                self.lab.start_component(node, component)

    def control_plane_ready(self, host: str) -> bool:
        return self.lab.apiserver_ready(host)

    def vip_holder(self) -> str | None:
        holders = self.lab.vip_holders()
        return next(iter(holders)) if len(holders) == 1 else None

    def stop_load_balancer(self, host: str) -> None:
        node = self.lab.nodes[host]
        self.stopped[host] = [node.processes[name] for name in ("keepalived", "haproxy") if name in node.processes]
        for process in self.stopped[host]:
            process.stop(signal.SIGTERM, timeout=10)

    def start_load_balancer(self, host: str) -> None:
        node = self.lab.nodes[host]
        for process in reversed(self.stopped.pop(host, [])):
            what = process.name.split("-", 1)[0]
            node.processes[what] = self.lab.lab.spawn(node.namespace, process.argv, name=f"{process.name}-again")

    def start_command(self, host: str, kind: str) -> str:
        # The lab has no SSH: what the test itself runs to start them (the production command: drill_stack).
        return f"lab: start_{kind.replace('-', '_')}({host!r})"


class HeldManifestsTarget(LabTarget):
    """The lab target whose control-plane stop and start are production's (`StackTarget`, over the lab's
    transport): a `Kubelet` stand-in must run for the held static pods to stop and the released ones to start."""

    def __init__(self, lab: ControlPlaneLab, workdir: Path) -> None:
        super().__init__(lab)
        outputs = {key: output.value for key, output in lab.evaluation.outputs.items()}
        tools = {
            plan.hostname: node_tools(lab.work / f"drill-bin-{plan.hostname}", {}) for plan in lab.plan.control_planes
        }
        self.stack = StackTarget(access_from_outputs(lab.stack, outputs), NodeTransport(lab, tools), workdir)

    def stop_control_plane(self, host: str) -> None:
        self.stack.stop_control_plane(host)

    def start_control_plane(self, host: str) -> None:
        self.stack.start_control_plane(host)

    def start_command(self, host: str, kind: str) -> str:
        return self.stack.start_command(host, kind)
