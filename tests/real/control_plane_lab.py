"""A real control plane of one stack, in network namespaces at its planned addresses (section 3 of issue 9).

What runs, and where each piece comes from:

* etcd members (external topology): the files of each member's `etcd-member` step, and the command of the
  static pod that step stages, with etcd built at the version kubeadm pins;
* per control plane: the `place-pki` bundle, then real kubeadm's `init phase certs/kubeconfig/control-plane`
  on the program's InitConfiguration (the first control plane's own `init.yaml`; the others' from the same
  builder with their name and address, as `kubeadm join` derives them), then kube-apiserver,
  kube-controller-manager (and kube-scheduler) started with the commands of kubeadm's static-pod manifests;
* `kubeadm init phase upload-config all` and `bootstrap-token` on the first control plane, as `kubeadm
  init` runs them (kubeadm-config, kubelet-config, cluster-info, the program's token and its RBAC);
* per load balancer: HAProxy and keepalived from the `configure-lb` bundle.

Each node is a network namespace (tests/integration/netns.py) plus a NodeRoot (its own /etc and /var as
overlays), so the manifests' absolute paths are used unchanged and nothing on the host is written. A
client namespace plays the operator, with the program's `kubeconfig` output. Everything is torn down by
`close()`, after a failure too.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from components.cluster import cluster_shape
from components.etcd import plan_membership
from components.pki import ETCD_CA, ETCD_HEALTHCHECK_CLIENT
from model.addressing import AddressPlan, NodePlan, plan_addresses
from model.config import ClusterConfig
from model.previous import NEW_STACK
from render import lb_config
from render.etcd import STAGED_MANIFEST_PATH, EtcdClusterSpec
from render.kubeadm import INIT_CONFIG_PATH, JOIN_CONFIG_PATH, init_documents
from tests.integration.netns import (
    Lab,
    Namespace,
    Process,
    haproxy_servers,
    install_executable,
    poll_until,
    scratch_dir,
    wait_for_backends,
)
from tests.real.documents import evaluated_at, init_step, step_files
from tests.real.node_root import DEFAULT_PATH, NodeRoot, Ran
from tests.stacks import stack_config
from tools.offline import Evaluation
from tools.plan import mask

MANIFESTS = "/etc/kubernetes/manifests"
BundleFilter = Callable[[dict[str, tuple[int, str]]], dict[str, tuple[int, str]]]
CLIENT_OFFSET = 200
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Bounds for a loaded 2-core machine.
ETCD_BOUND = 60.0
APISERVER_BOUND = 240.0
KUBEADM_BOUND = 180.0


def report(message: str) -> None:
    print(f"[control-plane-live] {message}", flush=True)


@dataclasses.dataclass
class Node:
    plan: NodePlan
    namespace: Namespace
    root: NodeRoot
    processes: dict[str, Process] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plan.hostname

    @property
    def address(self) -> str:
        return str(self.plan.address)


@dataclasses.dataclass(frozen=True)
class ApiResponse:
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class ControlPlaneLab:
    def __init__(
        self,
        lab: Lab,
        work: Path,
        stack: str,
        version: str,
        binaries: dict[str, str],
        programs: dict[str, str],
        *,
        evaluation: Evaluation | None = None,
        bundle_filter: BundleFilter | None = None,
    ) -> None:
        """`evaluation`: the program run whose steps set the nodes up (the stack as written by default);
        `bundle_filter`: what the kubeadm init/join bundles become before they are placed (a cluster set up by an
        older program)."""
        self.lab, self.work, self.stack, self.version = lab, work, stack, version
        self.binaries, self.programs = binaries, programs
        self.evaluation: Evaluation = evaluation or evaluated_at(stack, version)
        self.bundle_filter = bundle_filter
        self.config: ClusterConfig = stack_config(stack)
        self.plan: AddressPlan = plan_addresses(self.config)
        self.etcd_spec: EtcdClusterSpec | None = (
            plan_membership(self.config, self.plan, NEW_STACK) if self.config.etcd.external else None
        )
        network = self.plan.network
        self.bridge = lab.bridge()
        self.client = lab.namespace("client")
        lab.attach(
            self.client,
            self.bridge,
            ipaddress.IPv4Interface(f"{network.network_address + CLIENT_OFFSET}/{network.prefixlen}"),
        )
        self.nodes: dict[str, Node] = {}
        self._etcd_argv: dict[str, list[str]] = {}
        self.token = ""
        self.script_dir = scratch_dir("cpscripts", mode=0o755)
        self._client_files()

    # setup -------------------------------------------------------------------------------------

    def add_node(self, plan: NodePlan) -> Node:
        namespace = self.lab.namespace(plan.hostname.removeprefix(f"{self.stack}-"))
        self.lab.attach(
            namespace, self.bridge, ipaddress.IPv4Interface(f"{plan.address}/{self.plan.network.prefixlen}")
        )
        node = Node(plan, namespace, NodeRoot(self.work / plan.hostname))
        self.nodes[plan.hostname] = node
        return node

    def hold(self, node: Node) -> None:
        """From now on every process of `node` shares one mount namespace (one /etc, one /var), as on a machine."""
        holder = self.lab.spawn(node.namespace, node.root.holder_argv(), name=f"mounts-{node.name}")
        node.processes["mounts"] = holder
        node.root.hold(holder.pid)

    def _client_files(self) -> None:
        """The program's `kubeconfig` output, split into files the client's TLS context loads."""
        kubeconfig = yaml.safe_load(self.evaluation.outputs["kubeconfig"].value)
        self.kubeconfig_server = kubeconfig["clusters"][0]["cluster"]["server"]
        user = kubeconfig["users"][0]["user"]
        directory = self.work / "client"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]))
        self.cert_file = directory / "admin.crt"
        self.cert_file.write_bytes(base64.b64decode(user["client-certificate-data"]))
        self.key_file = directory / "admin.key"
        self.key_file.write_bytes(b"")
        self.key_file.chmod(0o600)
        self.key_file.write_bytes(base64.b64decode(user["client-key-data"]))

    def start_etcd(self) -> None:
        assert self.etcd_spec is not None
        for member in self.etcd_spec.members:
            plan = next(node for node in self.plan.etcd_members if node.hostname == member.name)
            node = self.add_node(plan)
            files = step_files(self.evaluation, f"{member.name}-etcd-member")
            node.root.place(files)
            self.hold(node)
            pod = yaml.safe_load(files[STAGED_MANIFEST_PATH][1])
            command = pod["spec"]["containers"][0]["command"]
            assert command[0] == "etcd"
            self._etcd_argv[member.name] = [self.binaries["etcd"], *command[1:]]
            self.start_etcd_member(member.name)
        started = time.monotonic()
        poll_until(self.etcd_healthy, timeout=ETCD_BOUND, interval=0.5, message="every etcd member healthy")
        report(f"{len(self.etcd_spec.members)} etcd members healthy after {time.monotonic() - started:.1f}s")

    def start_etcd_member(self, name: str) -> None:
        node = self.nodes[name]
        node.processes["etcd"] = self.spawn(node, self._etcd_argv[name], "etcd")

    def etcd_client_urls(self) -> dict[str, str]:
        """Every etcd member's client URL by name: the etcd VMs, or with stacked etcd the control planes."""
        if self.etcd_spec is not None:
            return {member.name: member.client_url for member in self.etcd_spec.members}
        return {plan.hostname: f"https://{plan.address}:2379" for plan in self.plan.control_planes}

    def etcdctl(self, *args: str, endpoints: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """etcdctl on an etcd member's node (the first whose etcd runs), with the healthcheck client pair placed
        there, bounded."""
        members = self.etcd_client_urls()
        running = [name for name in members if name in self.nodes and self.nodes[name].processes.get("etcd")]
        alive = [name for name in running if self.nodes[name].processes["etcd"].alive()]
        node = self.nodes[(alive or running or list(members))[0]]
        urls = endpoints or list(members.values())
        argv = [
            self.binaries["etcdctl"], f"--endpoints={','.join(urls)}", f"--cacert={ETCD_CA.cert_path}",
            f"--cert={ETCD_HEALTHCHECK_CLIENT.cert_path}", f"--key={ETCD_HEALTHCHECK_CLIENT.key_path}",
            "--dial-timeout=2s", "--command-timeout=3s", *args,
        ]  # fmt: skip
        ran = node.root.run(argv, netns=node.namespace.name, timeout=30, env={"ETCDCTL_API": "3"})
        return subprocess.CompletedProcess(argv, ran.returncode, ran.stdout, ran.stderr)

    def etcd_healthy(self) -> bool:
        return self.etcdctl("endpoint", "health").returncode == 0

    def prepare_control_planes(self, *, only_first: bool = False) -> None:
        """PKI placed, then kubeadm's own phases write certificates, kubeconfigs and static-pod manifests."""
        init_files = self.kubeadm_files(init_step(self.evaluation))
        init_yaml = init_files[INIT_CONFIG_PATH][1]
        # What `kubeadm init` reads beside its documents (the audit policy, the EncryptionConfiguration): every
        # control plane gets the same from its init or join step.
        beside = {path: file for path, file in init_files.items() if path not in (INIT_CONFIG_PATH, JOIN_CONFIG_PATH)}
        token = next(yaml.safe_load_all(init_yaml))["bootstrapTokens"][0]["token"]
        self.token = token
        shape = cluster_shape(self.config, self.plan, self.etcd_spec)
        shape = dataclasses.replace(shape, kubernetes_version=self.version)
        for index, plan in enumerate(self.plan.control_planes[:1] if only_first else self.plan.control_planes):
            node = self.add_node(plan)
            node.root.place(step_files(self.evaluation, f"{plan.hostname}-place-pki"))
            # What its `kubeadm init`/`join` step installs besides the documents: the files the flags name (the
            # audit policy, the encryption configuration), which kube-apiserver refuses to start without; through
            # `bundle_filter`, as a cluster set up by an older program had them (none, for the encryption lab).
            bootstrap = init_step(self.evaluation) if index == 0 else f"{plan.hostname}-kubeadm-join"
            node.root.place(self.kubeadm_files(bootstrap))
            documents = (
                init_yaml
                if index == 0
                else init_documents(shape, hostname=plan.hostname, address=str(plan.address), token=token)
            )
            node.root.place({**beside, INIT_CONFIG_PATH: (0o600, documents)})
            phases = [["certs", "all"], ["kubeconfig", "all"], ["control-plane", "all"]]
            if not self.config.etcd.external:
                phases.append(["etcd", "local"])
            self.hold(node)
            for phase in phases:
                ran = self.kubeadm(node, "init", "phase", *phase, "--config", INIT_CONFIG_PATH)
                assert ran.returncode == 0, ran.output

    def kubeadm_files(self, step: str) -> dict[str, tuple[int, str]]:
        """The files a kubeadm init or join step installs (through `bundle_filter`, if any)."""
        files = step_files(self.evaluation, step)
        return self.bundle_filter(files) if self.bundle_filter is not None else files

    def kubeadm(self, node: Node, *args: str, timeout: float = KUBEADM_BOUND, env: dict[str, str] | None = None) -> Ran:
        argv = [self.binaries["kubeadm"], *args]
        return node.root.run(argv, netns=node.namespace.name, timeout=timeout, env=env)

    def start_stacked_etcd(self, node: Node) -> Process:
        """etcd from the manifest kubeadm wrote on `node` (stacked topology), as kubelet would start it."""
        command = self.manifest_command(node, "etcd")
        process = self.spawn(node, [self.binaries["etcd"], *command[1:]], "etcd")
        node.processes["etcd"] = process
        return process

    def mirror_pod(self, node: Node, component: str) -> None:
        """What kubelet posts for a static pod (its mirror pod): kubeadm finds the etcd members of a stacked
        cluster by listing these (label component=etcd, annotation with the client URL)."""
        text = node.root.read(f"{MANIFESTS}/{component}.yaml")
        pod = yaml.safe_load(text)
        metadata = pod["metadata"]
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        # kubelet marks a mirror pod with these annotations; the API server's ServiceAccount admission skips
        # mirror pods, so the post does not race the controller manager creating kube-system's default account.
        kubelet = {
            "kubernetes.io/config.hash": digest,
            "kubernetes.io/config.mirror": digest,
            "kubernetes.io/config.source": "file",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{component}-{node.name}",
                "namespace": "kube-system",
                "labels": metadata.get("labels", {}),
                "annotations": {**metadata.get("annotations", {}), **kubelet},
            },
            "spec": {**pod["spec"], "nodeName": node.name},
        }
        response = self.request("POST", "/api/v1/namespaces/kube-system/pods", body=body)
        assert response.status == 201, (response.status, response.body[:500])

    def join_stacked_control_plane(self, plan: NodePlan, components: tuple[str, ...]) -> float:
        """`kubeadm join` of a stacked control plane, phase by phase with the program's own JoinConfiguration and
        placed PKI, this test playing kubelet: it starts etcd once kubeadm writes its manifest (kubeadm adds the
        member, then waits for it), then the other static pods. Returns the seconds it took."""
        started = time.monotonic()
        node = self.add_node(plan)
        node.root.place(step_files(self.evaluation, f"{plan.hostname}-place-pki"))
        node.root.place(self.kubeadm_files(f"{plan.hostname}-kubeadm-join"))
        self.hold(node)
        ran = self.kubeadm(node, "join", "phase", "control-plane-prepare", "all", "--config", JOIN_CONFIG_PATH)
        assert ran.returncode == 0, ran.output
        # kubeadm >= 1.35 has etcd's join as a phase of its own (it was control-plane-join etcd).
        join_etcd = [self.binaries["kubeadm"], "join", "phase", "etcd-join", "--config", JOIN_CONFIG_PATH]
        joining = subprocess.Popen(  # the real kubeadm, with the program's document; output masked below
            ["ip", "netns", "exec", node.namespace.name, *node.root.wrap(join_etcd)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": DEFAULT_PATH},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + KUBEADM_BOUND
            while not node.root.exists(f"{MANIFESTS}/etcd.yaml"):
                if joining.poll() is not None:
                    output, _ = joining.communicate(timeout=10)
                    raise AssertionError(f"kubeadm ended before writing etcd's manifest:\n{mask(output)}")
                assert time.monotonic() < deadline, f"no etcd manifest from kubeadm on {plan.hostname}"
                time.sleep(0.2)
            self.start_stacked_etcd(node)
            output, _ = joining.communicate(timeout=KUBEADM_BOUND)
        finally:
            if joining.poll() is None:
                os.killpg(joining.pid, signal.SIGKILL)
                joining.wait(timeout=5)
        assert joining.returncode == 0, mask(output)
        self.mirror_pod(node, "etcd")
        for component in components:
            self.start_component(node, component)
        self.wait_apiserver_ready(plan.hostname, timeout=APISERVER_BOUND)
        return time.monotonic() - started

    def manifest_command(self, node: Node, component: str) -> list[str]:
        pod = yaml.safe_load(node.root.read(f"{MANIFESTS}/{component}.yaml"))
        command = pod["spec"]["containers"][0]["command"]
        assert command[0] == component
        return list(command)

    def start_component(self, node: Node, component: str) -> Process:
        command = self.manifest_command(node, component)
        process = self.spawn(node, [self.binaries[component], *command[1:]], component)
        node.processes[component] = process
        return process

    def spawn(self, node: Node, argv: list[str], what: str) -> Process:
        env = {"PATH": DEFAULT_PATH}
        return self.lab.spawn(node.namespace, node.root.wrap(argv), name=f"{what}-{node.name}", env=env)

    def start_control_planes(self, components: tuple[str, ...], *, only: list[str] | None = None) -> None:
        started = time.monotonic()
        names = only or [plan.hostname for plan in self.plan.control_planes]
        for name in names:
            for component in components:
                self.start_component(self.nodes[name], component)
        for name in names:
            self.wait_apiserver_ready(name, timeout=APISERVER_BOUND)
        report(f"{len(names)} kube-apiserver(s) ready {time.monotonic() - started:.1f}s after start")

    def start_load_balancers(self) -> None:
        for plan in self.plan.load_balancers:
            node = self.add_node(plan)
            files = step_files(self.evaluation, f"{plan.hostname}-configure-lb")
            haproxy_cfg = self.work / f"{plan.hostname}-haproxy.cfg"
            haproxy_cfg.write_text(files[lb_config.HAPROXY_CFG_PATH][1])
            node.processes["haproxy"] = self.lab.spawn(
                node.namespace, [self.programs["haproxy"], "-db", "-f", str(haproxy_cfg)], name=f"haproxy-{node.name}"
            )
            if lb_config.KEEPALIVED_CONF_PATH not in files:
                continue
            # One per load balancer: the first keepalived already runs its copy every second.
            check = install_executable(
                self.script_dir / f"check_haproxy-{plan.hostname}.sh", files[lb_config.KEEPALIVED_CHECK_SCRIPT_PATH][1]
            )
            conf = self.work / f"{plan.hostname}-keepalived.conf"
            conf.write_text(
                files[lb_config.KEEPALIVED_CONF_PATH][1].replace(lb_config.KEEPALIVED_CHECK_SCRIPT_PATH, str(check))
            )
            run_dir = self.work / f"{plan.hostname}-run"
            run_dir.mkdir(exist_ok=True)
            argv = [
                self.programs["keepalived"], "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
                "--use-file", str(conf), "--pid", str(run_dir / "keepalived.pid"),
                "--vrrp_pid", str(run_dir / "vrrp.pid"),
            ]  # fmt: skip
            node.processes["keepalived"] = self.lab.spawn(node.namespace, argv, name=f"keepalived-{node.name}")
        started = time.monotonic()
        self.wait_vip_holder(timeout=30)
        report(f"VIP {self.plan.vip} held by {self.vip_holders()} after {time.monotonic() - started:.1f}s")

    # probes --------------------------------------------------------------------------------------

    def tls_context(self, *, client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def request(
        self,
        method: str,
        path: str,
        *,
        host: str | None = None,
        body: Any = None,
        admin: bool = True,
        timeout: float = 5,
        content_type: str = "application/json",
    ) -> ApiResponse:
        """One HTTPS request from the client namespace (to the VIP unless `host`), as the program's admin."""
        address = host or str(self.plan.vip)
        port = self.config.load_balancer.port if host is None else 6443
        with self.client.entered():
            connection = http.client.HTTPSConnection(
                address, port, timeout=timeout, context=self.tls_context(client_cert=admin)
            )
            connection.connect()
        try:
            payload = json.dumps(body) if body is not None and not isinstance(body, str) else body
            headers = {"Content-Type": content_type} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return ApiResponse(response.status, response.read().decode(errors="replace"))
        finally:
            connection.close()

    def apiserver_ready(self, hostname: str) -> bool:
        process = self.nodes[hostname].processes["kube-apiserver"]
        assert process.alive(), f"kube-apiserver on {hostname} exited:\n{mask(process.log()[-3000:])}"
        return self.request("GET", "/readyz", host=self.nodes[hostname].address, admin=False, timeout=3).status == 200

    def wait_apiserver_ready(self, hostname: str, *, timeout: float) -> float:
        started = time.monotonic()
        poll_until(lambda: self.apiserver_ready(hostname), timeout=timeout, interval=1, message=f"{hostname} /readyz")
        return time.monotonic() - started

    def vip_holders(self) -> set[str]:
        return {
            name
            for name, node in self.nodes.items()
            if node.plan.role == "lb" and self.plan.vip in node.namespace.ipv4_addresses()
        }

    def wait_vip_holder(self, *, timeout: float, exclude: str = "") -> str:
        def single() -> str | None:
            holders = self.vip_holders() - {exclude}
            return next(iter(holders)) if len(holders) == 1 and not (self.vip_holders() & {exclude}) else None

        return poll_until(single, timeout=timeout, interval=0.2, message="exactly one load balancer holding the VIP")

    def backend_states(self, lb: str) -> dict[str, str]:
        namespace, port = self.nodes[lb].namespace, lb_config.HAPROXY_HEALTH_PORT
        servers = haproxy_servers(namespace, port, lb_config.HAPROXY_STATS_URI, lb_config.HAPROXY_BACKEND)
        return {name: row["status"] for name, row in servers.items()}

    def load_balancer_names(self) -> list[str]:
        return [node.name for node in self.nodes.values() if node.plan.role == "lb"]

    def wait_backends(self, expected: dict[str, str], *, timeout: float) -> float:
        return wait_for_backends(
            self.backend_states, self.load_balancer_names(), expected, timeout=timeout, interval=0.2
        )

    # scripts ----------------------------------------------------------------------------------------

    def run_step(self, node: Node, script: str, stdin: str, *, timeout: float = 180) -> Ran:
        """A program step's script on `node`, as pulumi-command runs it (bash -c, stdin = the bundle)."""
        bin_dir = self.work / "bin"
        if not bin_dir.exists():
            bin_dir.mkdir()
            for name in ("kubeadm", "kubectl"):
                (bin_dir / name).symlink_to(self.binaries[name])
        env = {"PATH": f"{bin_dir}:{DEFAULT_PATH}"}
        return node.root.run(
            ["bash", "-c", script, "step"], netns=node.namespace.name, timeout=timeout, env=env, stdin=stdin
        )

    def spawn_step(self, node: Node, script: str, stdin: str, name: str) -> subprocess.Popen[str]:
        bin_dir = self.work / "bin"
        env = {"PATH": f"{bin_dir}:{DEFAULT_PATH}"}
        log = open(self.work / f"{name}.out", "w")  # noqa: SIM115 - closed by the caller through collect()
        process = subprocess.Popen(  # the program's own step script, as pulumi-command runs it
            ["ip", "netns", "exec", node.namespace.name, *node.root.wrap(["bash", "-c", script, "step"])],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
        log.close()
        return process

    @contextlib.contextmanager
    def stopped(self, process: Process) -> Iterator[None]:
        process.stop(signal.SIGKILL)
        yield

    def close(self) -> None:
        shutil.rmtree(self.script_dir, ignore_errors=True)
