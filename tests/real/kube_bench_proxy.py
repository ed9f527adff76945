"""kube-proxy on the kube-bench lab's node, as kubeadm's kube-proxy addon runs it (tests/real/kube_bench_node.py).

What is real: kube-proxy 1.37 (built by tests/real/build-binaries); `kubeadm init phase addon kube-proxy --config`
on the program's init.yaml, as `kubeadm init` runs it, against the lab's API server (through the program's load
balancer: kubeadm's admin.conf and kube-proxy's kubeconfig name the controlPlaneEndpoint, so HAProxy from the
`configure-lb` step is started first); the DaemonSet and ConfigMap kubeadm created, read back from the API; the
ServiceAccount token, a TokenRequest bound to the Pod the DaemonSet controller made for the node, as kubelet asks
for it.

What the lab plays: the DaemonSet's Pod. On a node, kubelet and the container runtime start kube-proxy in a
container; no image can be pulled here (the real kubelet keeps failing to make that Pod's sandbox), so the lab
stands in for both: it writes the ConfigMap's keys (config.conf, kubeconfig.conf) where the DaemonSet mounts them
(/var/lib/kube-proxy, the configMap volume's default mode 0644), the Pod's projected ServiceAccount volume (token,
ca.crt from kube-root-ca.crt, namespace) at its mount path, creates the FileOrCreate hostPath (/run/xtables.lock),
and starts the kube-proxy binary with the DaemonSet container's command and args ($(NODE_NAME) expanded from the
downward API's spec.nodeName, as kubelet does) in the node's network and mount namespaces: hostNetwork, and every
hostPath volume is mounted at its own path, so the node's filesystem is what the container would see there. On a
node the ConfigMap's files live in the Pod's volume directory under /var/lib/kubelet/pods, not at
/var/lib/kube-proxy; no kube-bench check reads either place.

What kube-bench reads of it: 4.3.1 looks for --metrics-bind-address on kube-proxy's command line (`ps -fC
kube-proxy`); kubeadm's DaemonSet passes only --config and --hostname-override, so the check passes whatever
config.conf says (measured: with metricsBindAddress 0.0.0.0:10249 in the lab's copy it passed while kube-proxy
listened on *:10249). Its config audit, like 4.1.3/4.1.4, reads `$proxykubeconfig`: the first existing file of
kube-bench's kube-proxy kubeconfig list (cfg/config.yaml), else /etc/kubernetes/proxy.conf; kubeadm's kube-proxy
reads its kubeconfig from the ConfigMap, at none of those paths, so they find no file. The runner therefore
reports the addresses kube-proxy really listens on, and config.conf's metricsBindAddress.

The machine's conntrack limits are global (nf_conntrack_max, the module's hashsize): kube-proxy raises them only
when below what its configuration asks (kubeadm leaves both unset: kube-proxy defaults to 32768 per core, at
least 131072; this 2-core machine has 262144 of both, so it writes neither), and nf_conntrack_max is read-only in
any network namespace but the machine's (measured: "Permission denied"). They are compared before and after.
What kube-proxy does set (its conntrack TCP timeouts, route_localnet, its iptables rules) belongs to the node's
network namespace and ends with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from render.kubeadm import INIT_CONFIG_PATH
from tests.integration.conftest import require_programs
from tests.integration.netns import Process, poll_until
from tests.real.node_root import DEFAULT_PATH, Ran

if TYPE_CHECKING:
    from tests.real.kube_bench import BenchLab

NAMES = ("kube-proxy",)
NAMESPACE = "kube-system"
ADMIN_KUBECONFIG = "/etc/kubernetes/admin.conf"  # kubeadm's, as kubeadm's own phases use it
DEFAULT_MODE = 0o644  # a configMap or projected volume without defaultMode (kubelet's 0644)
READY_BOUND = 60.0  # the API through the VIP; the DaemonSet's Pod; kube-proxy serving
STOP_BOUND = 10.0
GLOBAL = ("/proc/sys/net/netfilter/nf_conntrack_max", "/sys/module/nf_conntrack/parameters/hashsize")


def say(message: str) -> None:
    print(f"[kube-bench proxy] {message}", flush=True)


def global_state() -> dict[str, str]:
    """The machine's conntrack limits, as this process (the machine's network namespace) reads them."""
    return {path: Path(path).read_text().strip() if Path(path).exists() else "(absent)" for path in GLOBAL}


@dataclasses.dataclass
class KubeProxy:
    process: Process
    argv: list[str]
    notes: list[str]

    def check_alive(self, when: str) -> None:
        if not self.process.alive():
            raise SystemExit(f"kube-proxy exited {when} (status {self.process.popen.returncode}):\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.process.log().splitlines()[-lines:])


def kubectl(bench: BenchLab, binaries: dict[str, str], *args: str) -> Ran:
    """kubectl on the node as kubeadm's admin.conf (through the controlPlaneEndpoint), bounded."""
    argv = [binaries["kubectl"], "--kubeconfig", ADMIN_KUBECONFIG, *args]
    return bench.node.root.run(argv, netns=bench.node.namespace.name, timeout=30)


def get(bench: BenchLab, binaries: dict[str, str], *args: str) -> Any:
    ran = kubectl(bench, binaries, "-n", NAMESPACE, "get", *args, "-o", "json")
    assert ran.returncode == 0, ran.output
    return json.loads(ran.stdout)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's command and args: `$$` is a literal `$`, an unknown
    $(VAR) stays as written."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def container_env(container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    """The container's env as kubelet resolves it (literal values, the downward API's fields)."""
    fields = {"spec.nodeName": pod["spec"]["nodeName"], "metadata.name": pod["metadata"]["name"],
              "metadata.namespace": pod["metadata"]["namespace"]}  # fmt: skip
    env = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in fields, f"the lab resolves no {path} (env {item['name']})"
            env[item["name"]] = fields[path]
    return env


def write_in_node(bench: BenchLab, path: str, mode: int, content: str) -> None:
    """A file at `path` as the node's processes see it (through the node's mount namespace, so /var/run's link
    to /run, the node's own tmpfs, is followed)."""
    script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
    ran = bench.node.root.run(["sh", "-c", script, "sh", path, f"{mode:o}"], stdin=content, timeout=30)
    assert ran.returncode == 0, ran.output


def mount_path(container: dict[str, Any], volume: str) -> str:
    (path,) = [mount["mountPath"] for mount in container.get("volumeMounts") or [] if mount["name"] == volume]
    return str(path)


def place_volumes(
    bench: BenchLab, binaries: dict[str, str], daemonset: dict[str, Any], pod: dict[str, Any], notes: list[str]
) -> None:
    """What kubelet mounts into the container, at the paths the container sees it."""
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    for volume in daemonset["spec"]["template"]["spec"]["volumes"]:
        target = mount_path(container, volume["name"])
        if "configMap" in volume:
            data = get(bench, binaries, "configmap", volume["configMap"]["name"])["data"]
            mode = volume["configMap"].get("defaultMode", DEFAULT_MODE)
            for key, text in data.items():
                write_in_node(bench, f"{target}/{key}", mode, text)
            say(f"configMap {volume['configMap']['name']} -> {target}/{{{','.join(sorted(data))}}} ({mode:o})")
        elif "hostPath" in volume:
            host = volume["hostPath"]
            assert host["path"] == target, f"hostPath {host['path']} mounted at {target}: not the node's own path"
            if host.get("type") == "FileOrCreate":
                ran = bench.node.root.run(["sh", "-c", 'test -e "$1" || install -m 644 /dev/null "$1"', "sh", target])
                assert ran.returncode == 0, ran.output
            if bench.node.root.run(["test", "-e", target]).returncode != 0:
                # An untyped hostPath is not checked by kubelet; this machine's kernel has no loadable modules.
                assert not host.get("type"), f"hostPath {target} ({host['type']}) is missing"
                notes.append(f"node: kube-proxy's hostPath {target} does not exist on this machine")
        else:
            raise AssertionError(f"the lab does not mount volume {volume}")
    # The ServiceAccount admission plugin's projected volume (kube-api-access-*), from the Pod.
    (api_access,) = [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-")]
    target = mount_path(pod["spec"]["containers"][0], api_access["name"])
    mode = api_access["projected"].get("defaultMode", DEFAULT_MODE)
    for source in api_access["projected"]["sources"]:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            args = ["-n", NAMESPACE, "create", "token", pod["spec"]["serviceAccountName"], "--bound-object-kind",
                    "Pod", "--bound-object-name", pod["metadata"]["name"], "--bound-object-uid",
                    pod["metadata"]["uid"], f"--duration={token.get('expirationSeconds', 3607)}s"]  # fmt: skip
            if token.get("audience"):
                args.append(f"--audience={token['audience']}")
            ran = kubectl(bench, binaries, *args)
            assert ran.returncode == 0, ran.output
            write_in_node(bench, f"{target}/{token['path']}", mode, ran.stdout.strip())
        elif "configMap" in source:
            data = get(bench, binaries, "configmap", source["configMap"]["name"])["data"]
            for item in source["configMap"]["items"]:
                write_in_node(bench, f"{target}/{item['path']}", mode, data[item["key"]])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                assert item["fieldRef"]["fieldPath"] == "metadata.namespace", item
                write_in_node(bench, f"{target}/{item['path']}", mode, pod["metadata"]["namespace"])
        else:
            raise AssertionError(f"the lab does not project {source}")
    say(f"ServiceAccount {pod['spec']['serviceAccountName']}: token bound to Pod {pod['metadata']['name']} -> {target}")


def listening(bench: BenchLab, pid: int) -> list[str]:
    """The TCP sockets `pid` listens on, in the node's network namespace (address:port)."""
    ran = bench.node.root.run(["ss", "-Hltnp"], netns=bench.node.namespace.name, timeout=30)
    return sorted(line.split()[3] for line in ran.stdout.splitlines() if f"pid={pid}," in line)


@contextlib.contextmanager
def running(bench: BenchLab, binaries: dict[str, str]) -> Iterator[KubeProxy]:
    """kubeadm's kube-proxy addon applied, kube-proxy started from it and serving; stopped on the way out."""
    live, node = bench.live, bench.node
    before = global_state()
    notes: list[str] = []
    live.programs = {**live.programs, **require_programs("haproxy")}
    live.start_load_balancers()  # admin.conf and kube-proxy's kubeconfig.conf name the controlPlaneEndpoint
    poll_until(lambda: kubectl(bench, binaries, "get", "--raw", "/readyz").returncode == 0, timeout=READY_BOUND,
               interval=1, message="the API through the load balancer")  # fmt: skip
    ran = live.kubeadm(node, "init", "phase", "addon", "kube-proxy", "--config", INIT_CONFIG_PATH)
    assert ran.returncode == 0, ran.output
    say(f"kubeadm init phase addon kube-proxy: {ran.stdout.strip().splitlines()[-1]}")
    daemonset = get(bench, binaries, "daemonset", "kube-proxy")

    def pod() -> Any:
        pods = get(bench, binaries, "pods", "-l", "k8s-app=kube-proxy", f"--field-selector=spec.nodeName={node.name}")
        return pods["items"][0] if len(pods["items"]) == 1 else None

    the_pod = poll_until(pod, timeout=READY_BOUND, interval=1, message=f"the DaemonSet's Pod on {node.name}")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert the_pod["spec"]["containers"][0]["command"] == container["command"], "the Pod runs another command"
    place_volumes(bench, binaries, daemonset, the_pod, notes)
    env = container_env(container, the_pod)
    argv = [expand(word, env) for word in [*container["command"], *(container.get("args") or [])]]
    assert Path(argv[0]).name == "kube-proxy", argv
    argv[0] = binaries["kube-proxy"]
    say("$ " + shlex.join(argv))
    started = time.monotonic()
    env = {"PATH": DEFAULT_PATH, **env}
    process = bench.lab.spawn(node.namespace, node.root.wrap(argv), name="kube-proxy", env=env)
    proxy = KubeProxy(process, argv, notes)
    try:

        def serving() -> list[str]:
            proxy.check_alive("while starting")
            sockets = listening(bench, process.pid)
            return sockets if len(sockets) >= 2 else []  # metrics and healthz

        sockets = poll_until(serving, timeout=READY_BOUND, interval=1, message="kube-proxy's metrics and healthz")
        say(f"kube-proxy serving {time.monotonic() - started:.1f} s after start, listening on {', '.join(sockets)}")
        config = node.root.run(["cat", "/var/lib/kube-proxy/config.conf"]).stdout
        bind = re.search(r"^metricsBindAddress:.*$", config, re.M)
        notes.append(
            f"node: kube-proxy from kubeadm's addon (DaemonSet command, ConfigMap, bound token), the lab playing its"
            f" Pod; config.conf has {bind[0] if bind else 'no metricsBindAddress'}; it listens on {', '.join(sockets)}"
        )
        yield proxy
        proxy.check_alive("after kube-bench")
        # 200 once kube-proxy has synced its rules with what it read from the API (503 before).
        health = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:10256/healthz"]
        status = node.root.run(health, netns=node.namespace.name, timeout=30).stdout
        notes.append(f"node: kube-proxy's /healthz answered {status or 'nothing'} after kube-bench")
        errors = [line for line in process.log().splitlines() if line.startswith("E")]
        if errors:
            notes.append(f"node: kube-proxy logged {len(errors)} error line(s), the last: {errors[-1][:200]}")
    finally:
        if process.alive():
            process.stop(timeout=STOP_BOUND)
        after = global_state()
        if after != before:
            notes.append(f"node: the machine's conntrack limits changed {before} -> {after}")
            say(notes[-1])
