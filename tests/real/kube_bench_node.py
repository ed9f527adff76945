"""Section 4 (worker node) of kube-bench against a real kubelet on the lab's control plane (tests/real/kube_bench.py).

What is real: kubelet 1.37 (built by tests/real/build-binaries) with the file kubeadm writes from the program's
KubeletConfiguration (`kubeadm init phase kubelet-start` on the program's init.yaml, as `kubeadm init` runs it:
/var/lib/kubelet/config.yaml and kubeadm-flags.env), the command line the kubeadm package's systemd drop-in makes
of them (10-kubeadm.conf, expanded here as systemd would), kubelet.conf from kubeadm's kubeconfig phase, the lab's
API server (kubelet registers its Node there), and containerd 2.2 answering the CRI. The packages' unit files
(kubelet.service, 10-kubeadm.conf, /etc/default/kubelet, text and modes from kubernetes/release
cmd/krel/templates/latest at f618b2a) are placed where the debs put them.

What differs from a node, because of this machine (measured: kubelet refuses to start otherwise), each shown
in kubelet's command line after the drop-in's flags (kube-bench's node checks read none of them):

* the machine has cgroup v1 only (Firecracker kernel, no systemd as PID 1, no D-Bus): kubelet 1.37 exits with
  "kubelet is configured to not run on a host using cgroup v1" unless `--fail-cgroupv1=false`; the systemd cgroup
  driver needs systemd, so containerd's runc option SystemdCgroup is false in the lab's copy of the program's
  containerd config (kubelet takes the driver from the CRI) and kubelet gets `--cgroup-driver=cgroupfs`;
  `--cgroups-per-qos=false --enforce-node-allocatable=` keep it from creating cgroups in the machine's
  hierarchies, which the node's mount namespace shows at /sys/fs/cgroup (the lab's `ip netns exec` mounts a
  fresh /sys without them);
* kubelet sets six kernel tunables (vm.overcommit_memory, kernel.panic ...) that are global to the machine: in
  the node's mount namespace each /proc/sys file is covered by a file holding the value kubelet wants, so it
  reads its own value and writes nothing (stand-ins; the machine's values are compared before and after);
* /run and /var/lib/containerd are tmpfs in the node (containerd's socket and state stay off the machine);
* no image can be pulled (no registry), so the pods kubelet would start stay without a sandbox: the lab's
  processes remain the control plane, and kube-proxy (kubeadm's DaemonSet addon) is started by the lab in its
  Pod's place, from what kubeadm put in the API (tests/real/kube_bench_proxy.py).

kube-bench's node checks read kubelet's command line (`ps -fC kubelet`), /var/lib/kubelet/config.yaml, the
unit files, kubelet.conf and the CA file: all at their real paths in the node; and kube-proxy's command line
(`ps -fC kube-proxy`).
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from render.artifact_units import KUBEADM_DROP_IN, KUBELET_SERVICE, UNIT_DIR
from render.kubeadm import INIT_CONFIG_PATH
from render.node_prep import CONTAINERD_CONFIG, CONTAINERD_CONFIG_FILE
from tests.integration.netns import poll_until
from tests.real import kube_bench_proxy
from tests.real.node_root import DEFAULT_PATH

if TYPE_CHECKING:
    from tests.real.kube_bench import BenchLab

NAMES = ("kubelet", *kube_bench_proxy.NAMES, "containerd", "containerd-shim-runc-v2")
DROP_IN = f"{UNIT_DIR}/kubelet.service.d/10-kubeadm.conf"
DEFAULT_KUBELET = "/etc/default/kubelet"
KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
# This machine's limits (the docstring): appended after the drop-in's flags.
LAB_FLAGS = (
    "--fail-cgroupv1=false",
    "--cgroup-driver=cgroupfs",
    "--cgroups-per-qos=false",
    "--enforce-node-allocatable=",
)
MOUNT_FLAGS = {"rw", "ro", "relatime", "nosuid", "nodev", "noexec"}
# kubelet's setupKernelTunables (pkg/kubelet/cm/container_manager_linux.go): the values it sets when they differ.
KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
KUBELET_BOUND = 120.0
PREPARE_BOUND = 60.0


def say(message: str) -> None:
    print(f"[kube-bench node] {message}", flush=True)


def sysctls() -> dict[str, str]:
    return {name: Path(f"/proc/sys/{name}").read_text().strip() for name in KERNEL_TUNABLES}


def cgroup_mounts() -> list[tuple[str, str]]:
    """(directory, controller options) of every cgroup v1 hierarchy this machine mounts under /sys/fs/cgroup."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, directory, kind, options, *_ = line.split()
        if kind == "cgroup" and directory.startswith("/sys/fs/cgroup/"):
            wanted = [opt for opt in options.split(",") if opt not in MOUNT_FLAGS]
            if wanted and wanted[0].startswith("name="):
                wanted.insert(0, "none")  # a named hierarchy without a controller
            found.append((directory, ",".join(wanted)))
    return found


def expand_drop_in(drop_in: str, files: dict[str, str]) -> list[str]:
    """The argv systemd runs for the drop-in's last ExecStart: Environment= values, then each EnvironmentFile
    (`files`: path -> text, a missing one skipped as its `-` allows), `$VAR` split on whitespace."""
    env: dict[str, str] = {}
    exec_start = ""
    for line in drop_in.splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, text = shlex.split(value)[0].partition("=")
            env[name] = text
        elif key == "EnvironmentFile":
            for env_line in files.get(value.removeprefix("-"), "").splitlines():
                if "=" in env_line and not env_line.lstrip().startswith("#"):
                    name, _, text = env_line.partition("=")
                    env[name.strip()] = " ".join(shlex.split(text))
        elif key == "ExecStart":
            exec_start = value
    return [
        part for word in exec_start.split() for part in re.sub(r"^\$(\w+)$", lambda m: env.get(m[1], ""), word).split()
    ]


def prepare(bench: BenchLab, binaries: dict[str, str]) -> list[str]:
    """kubeadm's kubelet-start, the packages' files, the node's mounts; kubelet's argv."""
    node, work = bench.node, bench.live.work
    tools = work / "kubeadm-bin"  # kubeadm calls `systemctl` to restart kubelet: there is none in the lab
    tools.mkdir(exist_ok=True)
    (tools / "systemctl").write_text("#!/bin/sh\necho 'lab stand-in: no systemd here' >&2\nexit 1\n")
    (tools / "systemctl").chmod(0o755)
    ran = bench.live.kubeadm(
        node, "init", "phase", "kubelet-start", "--config", INIT_CONFIG_PATH, env={"PATH": f"{tools}:{DEFAULT_PATH}"}
    )
    assert ran.returncode == 0, ran.output
    node.root.place({DEFAULT_KUBELET: (0o644, "KUBELET_EXTRA_ARGS=\n")})
    units = work / "units"
    for path, text in ((f"{UNIT_DIR}/kubelet.service", KUBELET_SERVICE), (DROP_IN, KUBEADM_DROP_IN)):
        target = units / "upper" / Path(path).relative_to(UNIT_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)
    (units / "work").mkdir(exist_ok=True)
    values = work / "kernel-tunables"
    values.mkdir(exist_ok=True)
    mounts = [
        f"mount -t overlay overlay -o lowerdir={UNIT_DIR},upperdir={units}/upper,workdir={units}/work {UNIT_DIR}",
        "mount -t tmpfs -o mode=755 tmpfs /run",
        "mkdir -p /var/lib/containerd && mount -t tmpfs -o mode=711 tmpfs /var/lib/containerd",
        "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup",
    ]
    for directory, options in cgroup_mounts():  # the machine's hierarchies, as mounted: no new one is made
        mounts.append(f"mkdir -p {directory} && mount -t cgroup -o {options} cgroup {directory}")
    for name, value in KERNEL_TUNABLES.items():
        (values / name.replace("/", ".")).write_text(value + "\n")
        mounts.append(f"mount --bind {values / name.replace('/', '.')} /proc/sys/{name}")
    ran = node.root.run(["bash", "-euc", " && ".join(mounts)], timeout=PREPARE_BOUND)
    assert ran.returncode == 0, ran.output
    node.root.place(
        {CONTAINERD_CONFIG_FILE: (0o644, CONTAINERD_CONFIG.replace("SystemdCgroup = true", "SystemdCgroup = false"))}
    )
    files = {path: node.root.read(path) for path in ("/var/lib/kubelet/kubeadm-flags.env", DEFAULT_KUBELET)}
    argv = expand_drop_in((units / "upper" / Path(DROP_IN).relative_to(UNIT_DIR)).read_text(), files)
    assert argv[0] == "/usr/bin/kubelet", argv
    return [binaries["kubelet"], *argv[1:], *LAB_FLAGS]


def run(bench: BenchLab, binaries: dict[str, str], config_dir: Path, out: Path) -> tuple[Any, list[str]]:
    """kubelet up, registered with the lab's API server; kube-bench's node target; (its JSON, notes)."""
    from tests.real.kube_bench import check_single, run_bench, run_node_files

    node = bench.node
    before = sysctls()
    notes = []
    try:
        argv = prepare(bench, binaries)
        run_node_files(bench.live, node)  # kubeadm's kubelet-start wrote the kubelet's files 0644 again
        path = f"{Path(binaries['containerd-shim-runc-v2']).parent}:{DEFAULT_PATH}"
        containerd = bench.lab.spawn(node.namespace, node.root.wrap([binaries["containerd"]]), name="containerd",
                                     env={"PATH": path})  # fmt: skip
        socket = ["test", "-S", "/run/containerd/containerd.sock"]  # /run is the node's own tmpfs
        poll_until(lambda: node.root.run(socket, timeout=10).returncode == 0 or not containerd.alive(),
                   timeout=30, interval=0.5, message="containerd's socket")  # fmt: skip
        assert containerd.alive(), containerd.log()[-2000:]
        say("$ " + shlex.join(argv))
        started = time.monotonic()
        kubelet = bench.lab.spawn(node.namespace, node.root.wrap(argv), name="kubelet", env={"PATH": DEFAULT_PATH})

        def registered() -> bool:
            assert kubelet.alive(), f"kubelet exited:\n{kubelet.log()[-3000:]}"
            # As kubelet itself (the Node authorizer lets it read its own Node): the program's admin group is bound
            # to cluster-admin only by `kubeadm init`'s later phases, which this lab does not run.
            get = [binaries["kubectl"], "--kubeconfig", KUBELET_KUBECONFIG, "get", "node", node.name, "-o", "name"]
            return node.root.run(get, netns=node.namespace.name, timeout=30).returncode == 0

        poll_until(registered, timeout=KUBELET_BOUND, interval=1, message=f"kubelet to register {node.name}")
        say(f"kubelet registered {node.name} {time.monotonic() - started:.1f} s after start")
        with kube_bench_proxy.running(bench, binaries) as proxy:
            check_single(("kubelet", "kube-proxy"), "before kube-bench node")
            result = run_bench(bench, binaries["kube-bench"], ("node",), config_dir, out)
            check_single(("kubelet", "kube-proxy"), "after kube-bench node")
            assert kubelet.alive(), f"kubelet exited during kube-bench:\n{kubelet.log()[-3000:]}"
        notes.append(f"node: kubelet ran with the drop-in's command line plus {' '.join(LAB_FLAGS)} (this machine)")
        notes += proxy.notes
        return result, notes
    finally:
        after = sysctls()
        if after != before:
            for name, value in before.items():
                Path(f"/proc/sys/{name}").write_text(value + "\n")
            notes.append(f"node: the machine's kernel tunables changed {before} -> {after}; restored")
            say(notes[-1])
