"""The failover drill as a command: take one control plane down, then the VIP holder, and measure what held.

    python -m tools.drill --stack NAME [--yes] [--allow-quorum-loss] [--outputs FILE]

Without --yes it reads the cluster's state (etcd leader, lease holders, VIP holder) and prints what it would
do; nothing is stopped. With --yes:

1. record the etcd leader, the kube-scheduler and kube-controller-manager lease holders, the VIP holder;
2. stop one control plane (the controller manager's lease holder: its lease must move), by holding its static
   pod manifests (and, with stacked etcd, its etcd member's); show that the API through the VIP answers and
   takes writes, that etcd elects a new leader if it lost its own, and that the leases move;
3. bring it back and wait until its API server is ready and every etcd member is healthy;
4. stop the load balancer holding the VIP (keepalived and HAProxy) and show the VIP moves and the API answers;
   bring it back;
5. print a table of what held and how long each recovery took.

It never stops a control plane whose loss would cost etcd its quorum (counting only members healthy now)
unless --allow-quorum-loss. Everything the drill does goes through a `DrillTarget`: SSH to the nodes (host
keys pinned) and HTTPS to the VIP with the stack's kubeconfig in production, the namespace lab in the tests.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import yaml

from render.backup import etcd_tool_functions
from render.etcd_restore import hold_script, release_script
from render.scripts import Script, quote
from tools.access import (
    SshTransport,
    StackAccess,
    ToolError,
    Transport,
    access_from_outputs,
    private_workdir,
    read_stack_outputs,
    run_checked,
    say,
)

LEASES = ("kube-scheduler", "kube-controller-manager")
API_BOUND = 60.0
LEADER_BOUND = 60.0
# A lease is taken over once it lapses (15 s by default) and a candidate's retry comes round.
LEASE_BOUND = 120.0
RECOVERY_BOUND = 300.0
VIP_BOUND = 60.0
POLL = 0.5
DRILL_CONFIGMAP = "kubeadm-ha-drill"

T = TypeVar("T")


class DrillTarget(Protocol):
    """What the drill observes and does; production: SSH + HTTPS (`StackTarget`), tests: the namespace lab."""

    def control_planes(self) -> list[str]: ...
    def load_balancers(self) -> list[str]: ...
    def etcd_members(self) -> list[str]: ...
    def stacked_etcd(self) -> bool: ...
    def etcd_leader(self) -> str | None: ...
    def etcd_healthy(self) -> set[str]: ...
    def lease_holder(self, lease: str) -> str | None: ...
    def api_ready(self) -> bool: ...
    def api_write(self, value: str) -> bool: ...
    def stop_control_plane(self, host: str) -> None: ...
    def start_control_plane(self, host: str) -> None: ...
    def control_plane_ready(self, host: str) -> bool: ...
    def vip_holder(self) -> str | None: ...
    def stop_load_balancer(self, host: str) -> None: ...
    def start_load_balancer(self, host: str) -> None: ...


@dataclass
class Row:
    check: str
    before: str
    after: str
    held: bool
    seconds: float | None


@dataclass
class DrillReport:
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, before: object, after: object, held: bool, seconds: float | None) -> None:
        self.rows.append(Row(check, str(before), str(after), held, seconds))
        say(f"   {check}: {before} -> {after} ({'held' if held else 'FAILED'}" + _took(seconds) + ")")

    @property
    def passed(self) -> bool:
        return all(row.held for row in self.rows)

    def table(self) -> str:
        head = ("check", "before", "after", "held", "recovery (s)")
        lines = [head, *((r.check, r.before, r.after, "yes" if r.held else "NO", _num(r.seconds)) for r in self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
        out.insert(1, "-+-".join("-" * width for width in widths))
        return "\n".join(out)


def _num(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _took(seconds: float | None) -> str:
    return "" if seconds is None else f", {seconds:.1f} s"


def wait(probe: Callable[[], T | None], bound: float) -> tuple[T | None, float]:
    """Poll `probe` until truthy or `bound` seconds; (value or None, seconds waited). Errors count as "not yet"."""
    started = time.monotonic()
    while True:
        try:
            value = probe()
        except Exception:  # a probe that fails (a connection refused) is just not ready yet
            value = None
        elapsed = time.monotonic() - started
        if value or elapsed >= bound:
            return (value or None), elapsed
        time.sleep(POLL)


def other_than(probe: Callable[[], str | None], excluded: str) -> Callable[[], str | None]:
    """A probe that answers only once `probe` names someone other than `excluded`."""
    return lambda: (lambda found: found if found not in (None, excluded) else None)(probe())


def quorum(members: int) -> int:
    return members // 2 + 1


def choose_control_plane(target: DrillTarget) -> str:
    """The controller manager's lease holder (its lease must move), else the first control plane."""
    holder = target.lease_holder("kube-controller-manager")
    planes = target.control_planes()
    return holder if holder in planes else planes[0]


def quorum_refusal(target: DrillTarget, host: str) -> str | None:
    """Why stopping `host` would cost etcd its quorum now (None: it would not)."""
    if not target.stacked_etcd():
        return None
    members = target.etcd_members()
    healthy = target.etcd_healthy()
    left = len(healthy - {host})
    if left < quorum(len(members)):
        return (
            f"stopping {host} leaves {left} of {len(members)} etcd members healthy (quorum is "
            f"{quorum(len(members))}; healthy now: {', '.join(sorted(healthy)) or 'none'})"
        )
    return None


def drill(target: DrillTarget, *, yes: bool, allow_quorum_loss: bool = False) -> DrillReport:
    report = DrillReport()
    leader = target.etcd_leader()
    holders = {lease: target.lease_holder(lease) for lease in LEASES}
    vip = target.vip_holder()
    host = choose_control_plane(target)
    say(f"etcd leader: {leader}; " + "; ".join(f"{lease} lease: {who}" for lease, who in holders.items()))
    say(f"VIP held by: {vip or 'no load balancer (one LB owns the VIP as its address)'}")
    refusal = quorum_refusal(target, host)
    plan = [f"stop control plane {host}, check the API, leader and leases, bring it back"]
    if len(target.load_balancers()) > 1 and vip:
        plan.append(f"stop load balancer {vip} (the VIP holder), check the VIP moves, bring it back")
    say("plan:\n" + "\n".join(f"  {index}. {step}" for index, step in enumerate(plan, 1)))
    if refusal and not allow_quorum_loss:
        raise ToolError(f"refusing: {refusal}; pass --allow-quorum-loss to drill anyway")
    if not yes:
        say("dry run: nothing was stopped (pass --yes to run the drill)")
        return report

    say(f"1. stopping control plane {host}")
    target.stop_control_plane(host)
    stopped = time.monotonic()
    ready, took = wait(target.api_ready, API_BOUND)
    report.add("API /readyz through the VIP", "ready", "ready" if ready else "not ready", bool(ready), took)
    wrote, took = wait(lambda: target.api_write(f"{host}-down-{int(time.time())}"), API_BOUND)
    report.add("write through the VIP", "ok", "ok" if wrote else "refused", bool(wrote), took)
    if target.stacked_etcd() and leader == host:
        new, _ = wait(other_than(target.etcd_leader, host), LEADER_BOUND)
        report.add("etcd leader re-elected", leader, new, new is not None, time.monotonic() - stopped)
    else:
        now = target.etcd_leader()
        report.add("etcd leader (unaffected)", leader, now, now is not None, None)
    for lease, before in holders.items():
        if before == host:
            moved, _ = wait(other_than(lambda lease=lease: target.lease_holder(lease), host), LEASE_BOUND)  # type: ignore[misc]
            report.add(f"{lease} lease moved", before, moved, moved is not None, time.monotonic() - stopped)
        else:
            now = target.lease_holder(lease)
            report.add(f"{lease} lease kept", before, now, now is not None and now != host, None)

    say(f"2. starting control plane {host} again")
    target.start_control_plane(host)
    back, took = wait(lambda: target.control_plane_ready(host), RECOVERY_BOUND)
    report.add(f"{host} API server ready again", "stopped", "ready" if back else "not ready", bool(back), took)
    members = set(target.etcd_members())
    healthy, took = wait(lambda: target.etcd_healthy() == members or None, RECOVERY_BOUND)
    report.add("every etcd member healthy", "-", "healthy" if healthy else "unhealthy", bool(healthy), took)

    if len(target.load_balancers()) > 1 and vip:
        say(f"3. stopping load balancer {vip}, which holds the VIP")
        target.stop_load_balancer(vip)
        moved, took = wait(other_than(target.vip_holder, vip), VIP_BOUND)
        report.add("VIP moved", vip, moved, moved is not None, took)
        ready, took = wait(target.api_ready, API_BOUND)
        report.add("API through the moved VIP", "ready", "ready" if ready else "not ready", bool(ready), took)
        say(f"4. starting load balancer {vip} again")
        target.start_load_balancer(vip)
        holder, took = wait(target.vip_holder, VIP_BOUND)
        report.add("VIP held after the LB returned", "-", holder, holder is not None, took)
    say("\n" + report.table())
    say("drill " + ("passed: everything held" if report.passed else "FAILED: see the rows marked NO"))
    return report


# --- production: SSH to the nodes, HTTPS to the VIP --------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--yes", action="store_true", help="really stop things (default: a dry run)")
    parser.add_argument("--allow-quorum-loss", action="store_true", help="drill even if etcd would lose quorum")
    parser.add_argument("--outputs", type=Path, help="the stack's `pulumi stack output --json --show-secrets`")
    args = parser.parse_args(argv)
    try:
        access = access_from_outputs(args.stack, read_stack_outputs(args.stack, Path.cwd(), args.outputs))
        with private_workdir() as workdir:
            target = StackTarget(access, SshTransport(access, workdir), workdir)
            report = drill(target, yes=args.yes, allow_quorum_loss=args.allow_quorum_loss)
    except ToolError as error:
        print(f"drill: {error}", file=sys.stderr)
        return 1
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["DrillTarget", "StackTarget", "drill", "main"]
