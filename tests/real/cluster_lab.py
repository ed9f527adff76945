"""`tests/real/cluster-lab`: a real cluster from a real `pulumi up` of a lab stack with an artifact bundle (issue 21).

Stages, each timed with the machine's load average (1-minute, sampled every 5 s: its maximum and its mean):
1. inputs: the Pulumi toolchain and node binaries (tests/real/build-binaries), the OCI images, the bundle and the
   guest image (tests/real/cluster_bundle.py; all cached by their inputs);
2. `pulumi up` of the lab stack (artifacts.source: bundle, flannel) with the real CLI, language host and plugins
   (tests/real/engine/lab_stack.py) against a libvirtd the lab starts in a network namespace with nothing but
   loopback (tests/real/engine/libvirtd.py): the program's NAT network has no uplink, so nothing the guests send
   can leave this machine; a capture there lists what they tried to send outside the lab network, and every DNS
   and NTP packet;
3. through the VIP with the kubeconfig output (tests/real/cluster_checks.py): every node Ready; CoreDNS resolves
   kubernetes.default from a pod; a pod on one node fetches a page from a pod on another over flannel; the pods'
   image comes from the bundle (imagePullPolicy Never);
4. day-2 (with --day2): a second `pulumi up --expect-no-changes`; `tools.drill --yes` (3 CPs, 2 LBs; with fewer
   control planes `--only load-balancer`); one more worker (--add-worker); a due certificate renewal through
   `pulumi up` with the API probed through the VIP (tests/real/cluster_day2.py), and an up after it that changes
   nothing;
5. `pulumi destroy`, checked with virsh: nothing left. Then the lab's libvirtd, namespace and directory go, also
   after a failure.

    tests/real/cluster-lab [--lbs N] [--cps N] [--workers N] [--grow-cps N [--grow-parallel N]] [--day2 [--add-worker]]
        [--nice-others N] [--keep-going] [--hold-on-failure]

Exit 0 only when every check passed; the last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.real import cluster_bundle, cluster_checks, cluster_day2, cluster_lb_view, cluster_nice
from tests.real.engine.lab_stack import LabStack, Run
from tests.real.engine.libvirtd import Libvirtd, isolated_libvirtd
from tools.access import StackAccess, access_from_outputs, private_workdir

STACK = "lab"
CIDR = "10.17.9.0/24"
KUBERNETES_VERSION = "1.37.2"
SERVICE_CIDR = "10.96.0.0/12"  # kubernetes.serviceSubnet's default
POD_CIDR = "10.244.0.0/16"  # kubernetes.podSubnet's default
UP_TIMEOUT_SECONDS = 4800
QUICK_TIMEOUT_SECONDS = 900
DESTROY_TIMEOUT_SECONDS = 900
DRILL_TIMEOUT_SECONDS = 2400


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    ok: bool = False
    detail: str = ""
    load_max: float = 0.0
    load_mean: float = 0.0


@dataclass
class Report:
    stages: list[Stage] = field(default_factory=list)

    def run(self, name: str, action: Callable[[], str]) -> bool:
        stage = Stage(name)
        self.stages.append(stage)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(os.getloadavg()[0])
                stop.wait(5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        print(f"cluster-lab: {name} ...", file=sys.stderr, flush=True)
        try:
            stage.detail = action()
            stage.ok = True
        except Exception as error:  # every failure is reported, then the lab tears down
            stage.detail = f"{type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
        finally:
            stop.set()
            sampler.join(timeout=10)
            stage.seconds = time.monotonic() - started
            stage.load_max = max(samples, default=0.0)
            stage.load_mean = sum(samples) / len(samples) if samples else 0.0
        mark = "ok" if stage.ok else "FAILED"
        print(
            f"cluster-lab: {name} {mark} in {stage.seconds:.0f} s (load max {stage.load_max:.1f}, mean"
            f" {stage.load_mean:.1f}): {stage.detail}",
            file=sys.stderr,
            flush=True,
        )
        return stage.ok


def lab_config(args: argparse.Namespace, image: Path, image_sha: str, uri: str, key: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "kubeadm-ha:clusterName": "lab",
        "kubeadm-ha:ssh": {"authorizedKeys": [key]},
        "kubeadm-ha:network": {"mode": "nat", "cidr": CIDR},
        "kubeadm-ha:image": {"url": str(image), "sha256": image_sha},
        "kubeadm-ha:hypervisors": [{"name": "local", "uri": uri, "domainType": "qemu"}],
        "kubeadm-ha:loadBalancer": {"replicas": args.lbs, "cpus": 1, "memoryMiB": 512, "diskGiB": 10},
        "kubeadm-ha:controlPlane": {"replicas": args.cps, "cpus": 2, "memoryMiB": args.cp_memory, "diskGiB": 20},
        "kubeadm-ha:workers": {"replicas": args.workers, "cpus": 1, "memoryMiB": 1536, "diskGiB": 20},
        "kubeadm-ha:kubernetes": {"version": KUBERNETES_VERSION, "cni": "flannel"},
    }
    if args.leader_election:
        lease, renew, retry = args.leader_election
        timing = {"leaseDurationSeconds": lease, "renewDeadlineSeconds": renew, "retryPeriodSeconds": retry}
        config["kubeadm-ha:controlPlane"]["leaderElection"] = timing
    if args.etcd_timing:
        heartbeat, election = args.etcd_timing
        config["kubeadm-ha:etcd"] = {"timing": {"heartbeatIntervalMs": heartbeat, "electionTimeoutMs": election}}
    return config


def _slashed(text: str, count: int, want: str) -> tuple[int, ...]:
    """`count` whole numbers written A/B/..., or the argparse error naming what is wanted."""
    parts = text.split("/")
    if len(parts) != count or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: want {want}")
    return tuple(int(part) for part in parts)


def leader_election(text: str) -> tuple[int, int, int]:
    """`--leader-election 60/40/5`: lease, renew deadline and retry period in seconds."""
    lease, renew, retry = _slashed(text, 3, "LEASE/RENEW/RETRY seconds, e.g. 60/40/5")
    return lease, renew, retry


def etcd_timing(text: str) -> tuple[int, int]:
    """`--etcd-timing 500/5000`: etcd's heartbeat interval and election timeout in milliseconds."""
    heartbeat, election = _slashed(text, 2, "HEARTBEAT/ELECTION milliseconds, e.g. 500/5000")
    return heartbeat, election


def sha256(path: Path) -> str:
    done = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.split()[0]


@dataclass
class Lab:
    args: argparse.Namespace
    report: Report
    inputs: cluster_bundle.Inputs | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    # -- stage 1
    def build_inputs(self) -> str:
        from tests.real.engine import toolchain

        cluster_bundle.build(list(toolchain.TOOLS))
        names = [f"{name}@{KUBERNETES_VERSION}" for name in ("kubeadm", "kubelet", "kubectl")]
        names += ["containerd", "ctr", "containerd-shim-runc-v2", "runc", "crictl", "bridge", "host-local"]
        names += ["loopback", "portmap"]
        binaries = cluster_bundle.build(names)
        images = cluster_bundle.images(KUBERNETES_VERSION)
        guest = cluster_bundle.guest_image()
        work = Path(tempfile.mkdtemp(prefix="cluster-lab-inputs-"))
        source = cluster_bundle.source_dir(binaries, images, work / "source")
        project = work / "project"
        project.mkdir()
        stack_file = {"config": lab_config(self.args, guest, "0" * 64, "qemu:///system", "ssh-ed25519 AAAA lab")}
        (project / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump(stack_file))
        bundle, bundle_sha = cluster_bundle.assemble(source, project, STACK)
        self.inputs = cluster_bundle.Inputs(binaries, bundle, bundle_sha, guest)
        return f"bundle {bundle} (manifest {bundle_sha[:12]}), images {images.name}, guest {guest.parent.name}"

    # -- stages 2..5
    def deploy_and_check(self) -> None:
        assert self.inputs is not None
        netns = f"kha-cl-{os.getpid()}"
        with ExitStack() as stack:
            directory, lv = stack.enter_context(isolated_libvirtd("kubeadm-ha-cluster-lab-", netns))
            favoured = stack.enter_context(cluster_nice.favour(f"{STACK}-", f"{STACK}-cp-", self.args.nice_others))
            stack.callback(lambda: print(f"cluster-lab: CPU priority: {favoured}", file=sys.stderr, flush=True))
            pool = directory / "pool"
            pool.mkdir(mode=0o755)
            lv.virsh("pool-define-as", "default", "dir", "--target", str(pool))
            lv.virsh("pool-start", "default")
            capture = cluster_checks.Capture.start(lv.prefix(), directory / "capture.pcap", CIDR)
            stack.callback(self._capture_report, capture)
            key = directory / "user_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
            image = self.inputs.guest_image
            config = lab_config(self.args, image, sha256(image), lv.uri, key.with_suffix(".pub").read_text().strip())
            config["kubeadm-ha:artifacts"] = {
                "source": "bundle",
                "bundle": {"path": str(self.inputs.bundle), "sha256": self.inputs.bundle_sha256},
            }
            lab = LabStack(directory / "pulumi", STACK, lv.prefix()).setup(config)
            self.notes["directory"] = directory
            stack.callback(self._destroy, lab, lv, directory)
            if self.args.hold_on_failure:
                stack.callback(self._hold, directory)
            up_ok = self.report.run("pulumi up", lambda: self._up(lab))
            if not up_ok and not self.args.keep_going:
                return
            kubectl = self._kubectl(lab, lv, directory)
            expected = [f"lab-cp-{i}" for i in range(1, self.args.cps + 1)]
            expected += [f"lab-worker-{i}" for i in range(1, self.args.workers + 1)]
            self.notes["expected"] = expected
            ready = self.report.run("nodes Ready (via the VIP)", lambda: cluster_checks.nodes_ready(kubectl, expected))
            if ready and up_ok and self.args.grow_cps > self.args.cps:
                grown = self.report.run(
                    f"grow to {self.args.grow_cps} control planes (pulumi up)",
                    lambda: self._grow(lab, kubectl, expected),
                )
                if not grown:
                    return
            if ready:
                self.report.run("DNS and pod-to-pod over flannel", lambda: self._pods(kubectl, expected))
            if self.args.day2 and up_ok:
                self.report.run("second up changes nothing", lambda: self._noop(lab))
                if self.args.lbs >= 2:
                    # One control plane cannot lose one: its load balancers are drilled alone.
                    only = () if self.args.cps >= 3 else ("--only", "load-balancer")
                    self.report.run(
                        " ".join(("tools.drill --yes", *only)), lambda: self._drill(lab, lv, directory, only)
                    )
                if self.args.add_worker:
                    self.report.run("add a worker", lambda: self._add_worker(lab, kubectl, expected))
                renewal = self.report.run(
                    "due certificate renewal (pulumi up)", lambda: self._renewal(lab, lv, kubectl, directory)
                )
                if renewal:
                    self.report.run("an up after the renewal changes nothing", lambda: self._noop(lab))
            if up_ok:
                self.report.run("what the load balancers saw (HAProxy)", lambda: self._lb_view(lab, lv, directory))

    def _hold(self, directory: Path) -> None:
        if all(stage.ok for stage in self.report.stages):
            return
        flag = directory / "release"
        print(f"cluster-lab: holding the lab for inspection until {flag} exists (max 1800 s)", file=sys.stderr)
        deadline = time.monotonic() + 1800
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(5)

    def _up(self, lab: LabStack) -> str:
        run = lab.pulumi("up", "--yes", "--json", timeout=UP_TIMEOUT_SECONDS)
        self.notes["up"] = run
        times = run.step_times()
        slowest = sorted(((end - start, urn.rsplit("::", 1)[1]) for urn, (start, end) in times.items()), reverse=True)
        self.notes["slowest"] = slowest[:15]
        print("cluster-lab: slowest steps: " + ", ".join(f"{n} {s:.0f} s" for s, n in slowest[:15]), file=sys.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"pulumi up exit {run.returncode} in {run.seconds:.0f} s:\n{run.errors()[-6000:]}")
        return f"{run.seconds:.0f} s, {len(run.steps())} steps"

    def _kubectl(self, lab: LabStack, lv: Libvirtd, directory: Path) -> cluster_checks.Kubectl:
        assert self.inputs is not None
        path = directory / "kubeconfig"
        path.touch(mode=0o600)
        path.write_text(lab.secret_output("kubeconfig") + "\n")
        self.notes["server"] = cluster_checks.server_of(path)
        return cluster_checks.Kubectl(self.inputs.binaries["kubectl"], path, tuple(lv.prefix()))

    def _pods(self, kubectl: cluster_checks.Kubectl, nodes: list[str]) -> str:
        server, client = nodes[0], nodes[-1]
        shown = cluster_checks.pods_talk(kubectl, server, client)
        cluster_checks.delete_test_pods(kubectl)
        return f"via {self.notes['server']}: " + "; ".join(f"{k}: {v}" for k, v in shown.items())

    def _noop(self, lab: LabStack) -> str:
        run = lab.pulumi("up", "--yes", "--json", "--expect-no-changes", timeout=QUICK_TIMEOUT_SECONDS)
        changed = {urn: op for urn, op in run.steps().items() if op not in ("same", "read")}
        if run.returncode != 0 or changed:
            raise RuntimeError(f"exit {run.returncode}, changes {changed}: {run.errors()[-3000:]}")
        return f"{run.seconds:.0f} s, {len(run.steps())} steps all same"

    def _grow(self, lab: LabStack, kubectl: cluster_checks.Kubectl, expected: list[str]) -> str:
        """TCG on 2 cores cannot run kubeadm init while five other guests boot and install (run 3: the first
        control plane's API missed kubeadm's deadline), nor keep one API answering while two new guests install
        the bundle at once (run 5: every write through the VIP got EOF for 788 s). The product refuses an even
        count of stacked control planes (etcd's quorum), so 1 -> 3 is one `pulumi up`: run with `--parallel`
        (Pulumi's own bound on concurrent operations; 1 by default here), one guest works at a time."""
        config = lab.config()
        planes = {**config["kubeadm-ha:controlPlane"], "replicas": self.args.grow_cps}
        lab.set_config({**config, "kubeadm-ha:controlPlane": planes})
        parallel = f"--parallel={self.args.grow_parallel}"
        run = lab.pulumi("up", "--yes", "--json", parallel, timeout=UP_TIMEOUT_SECONDS)
        self._slowest(run)
        if run.returncode != 0:
            raise RuntimeError(f"pulumi up exit {run.returncode} in {run.seconds:.0f} s:\n{run.errors()[-6000:]}")
        added = [f"lab-cp-{i}" for i in range(self.args.cps + 1, self.args.grow_cps + 1)]
        expected[len(expected) - self.args.workers : len(expected) - self.args.workers] = added
        self.args.cps = self.args.grow_cps
        ready = cluster_checks.nodes_ready(kubectl, expected)
        return f"up {parallel} {run.seconds:.0f} s; {ready}"

    def _slowest(self, run: Run) -> None:
        times = run.step_times()
        slowest = sorted(((end - start, urn.rsplit("::", 1)[1]) for urn, (start, end) in times.items()), reverse=True)
        print("cluster-lab: slowest steps: " + ", ".join(f"{n} {s:.0f} s" for s, n in slowest[:15]), file=sys.stderr)

    def _outputs(self, lab: LabStack, directory: Path) -> Path:
        """The stack's outputs with secrets, in a 0600 file of the lab's directory (the drill reads it)."""
        outputs = directory / "outputs.json"
        outputs.touch(mode=0o600)
        shown = lab.pulumi("stack", "output", "--json", "--show-secrets", "--stack", STACK, secret_stdout=True)
        if shown.returncode != 0:
            raise RuntimeError(f"pulumi stack output: exit {shown.returncode}")
        outputs.write_text(shown.stdout)
        return outputs

    @contextmanager
    def _guests(
        self, lab: LabStack, lv: Libvirtd, directory: Path
    ) -> Iterator[tuple[StackAccess, cluster_day2.NetnsSsh]]:
        """The stack's node access (from its outputs) and a pinned SSH transport into the lab's network."""
        access = access_from_outputs(STACK, json.loads(self._outputs(lab, directory).read_text()))
        with private_workdir() as workdir:
            yield access, cluster_day2.NetnsSsh(access, workdir, lv.prefix())

    def _renewal(self, lab: LabStack, lv: Libvirtd, kubectl: cluster_checks.Kubectl, directory: Path) -> str:
        with self._guests(lab, lv, directory) as (access, transport):
            planes = access.role("cp")
            return cluster_day2.renewal_stage(lab, kubectl, transport, planes, KUBERNETES_VERSION, UP_TIMEOUT_SECONDS)

    def _lb_view(self, lab: LabStack, lv: Libvirtd, directory: Path) -> str:
        with self._guests(lab, lv, directory) as (access, transport):
            return cluster_lb_view.lb_view(transport, access.role("lb"))

    def _drill(self, lab: LabStack, lv: Libvirtd, directory: Path, only: tuple[str, ...]) -> str:
        outputs = self._outputs(lab, directory)
        argv = [*lv.prefix(), sys.executable, "-m", "tools.drill", "--stack", STACK, "--yes", *only]
        argv += ["--outputs", str(outputs)]
        log = directory / "drill.log"
        try:
            done = subprocess.run(
                argv, cwd=cluster_bundle.ROOT, capture_output=True, text=True, timeout=DRILL_TIMEOUT_SECONDS
            )
        except subprocess.TimeoutExpired as expired:
            raise RuntimeError(f"tools.drill did not end within {DRILL_TIMEOUT_SECONDS} s") from expired
        log.write_text(done.stdout + done.stderr)
        print(done.stdout[-4000:], file=sys.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"tools.drill exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
        return "passed; its table: " + " | ".join(done.stdout.strip().splitlines()[-12:])

    def _add_worker(self, lab: LabStack, kubectl: cluster_checks.Kubectl, expected: list[str]) -> str:
        config = lab.config()
        workers = dict(config["kubeadm-ha:workers"])
        workers["replicas"] = int(workers["replicas"]) + 1
        lab.set_config({**config, "kubeadm-ha:workers": workers})
        run = lab.pulumi("up", "--yes", "--json", timeout=UP_TIMEOUT_SECONDS)
        if run.returncode != 0:
            # The stack asks for the old count again: the renewal's `up` would otherwise retry this join first
            # and fail on it (run 10), and never reach the renewal. That `up` then removes the half-made worker.
            lab.set_config(config)
            raise RuntimeError(f"pulumi up exit {run.returncode} in {run.seconds:.0f} s: {run.errors()[-3000:]}")
        changed = {urn.rsplit("::", 1)[1]: op for urn, op in run.steps().items() if op not in ("same", "read")}
        new = f"lab-worker-{workers['replicas']}"
        others = {name: op for name, op in changed.items() if not name.startswith(new)}
        ready = cluster_checks.nodes_ready(kubectl, [*expected, new])
        return f"up {run.seconds:.0f} s, {len(changed)} changes ({len(others)} outside {new}: {others}); {ready}"

    def _destroy(self, lab: LabStack, lv: Libvirtd, directory: Path) -> None:
        def destroy() -> str:
            run = lab.pulumi("destroy", "--yes", "--json", timeout=DESTROY_TIMEOUT_SECONDS)
            left = {kind: lv.names(kind) for kind in ("domain", "network")}
            left["volumes"] = lv.volumes("default")
            left["pool files"] = [path.name for path in (directory / "pool").iterdir()]
            if run.returncode != 0 or any(left.values()):
                raise RuntimeError(f"destroy exit {run.returncode}, left {left}: {run.errors()[-2000:]}")
            return f"{run.seconds:.0f} s, nothing left (domains, networks, volumes, pool files)"

        self.report.run("pulumi destroy", destroy)

    def _capture_report(self, capture: cluster_checks.Capture) -> None:
        capture.stop()

        def judge() -> str:
            leaving, dns, ntp = capture.leaving(), capture.dns_queries(), capture.ntp()
            # The cluster's own virtual addresses (a Service's ClusterIP before kube-proxy's rules exist on a node,
            # a pod address) reach the lab's gateway too; they are the cluster's, not outside it: counted apart.
            internal = [line for line in leaving if _to_cluster_network(line)]
            outside = [line for line in leaving if line not in internal]
            names = [line for line in dns if not any(d in line for d in (".k8s.internal.", ".cluster.local."))]
            self.notes["dns"] = dns
            for line in [*outside[:20], *internal[:5], *names[:20], *ntp[:10]]:
                print(f"cluster-lab: capture: {line}", file=sys.stderr)
            if outside or ntp:
                raise RuntimeError(f"{len(outside)} packets to outside the lab, {len(ntp)} NTP packets")
            return (
                f"no packet to outside the lab, no NTP; {len(internal)} packets to the cluster's service/pod networks"
                f" reached the gateway; {len(dns)} DNS queries, {len(names)} for names outside the lab's domains"
            )

        self.report.run("nothing sent outside the lab", judge)


def _to_cluster_network(line: str) -> bool:
    """A tcpdump line whose destination is in the cluster's service or pod network (the defaults the lab uses)."""
    words = line.split()
    if ">" not in words:
        return False
    destination = words[words.index(">") + 1].rstrip(":").rsplit(".", 1)[0]
    try:
        address = ipaddress.ip_address(destination)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net) for net in (SERVICE_CIDR, POD_CIDR))


# What the lab runs on this machine, and the Debian package with it: missing ones are named before anything starts
# (run 11 met dnsmasq missing only at the libvirt network, 6 minutes in).
HOST_PROGRAMS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "libvirtd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "dnsmasq": "dnsmasq-base",  # libvirt's network DHCP/DNS
    "mkisofs": "genisoimage",  # pulumi-libvirt's cloud-init disks
    "mmdebstrap": "mmdebstrap",  # the guest image and the images' userland layer
    "busybox": "busybox-static",  # the test pods' image, flannel's static `cp`
    "tcpdump": "tcpdump",  # the capture of anything leaving the lab
    "ssh-keygen": "openssh-client",
}
HOST_FILES = {
    Path("/usr/lib/x86_64-linux-gnu/libseccomp.a"): "libseccomp-dev",  # runc with seccomp, linked static
}


def missing_packages(day2: bool) -> list[str]:
    """The Debian packages the lab needs that this machine lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [package for program, package in HOST_PROGRAMS.items() if shutil.which(program, path=path) is None]
    files = {**HOST_FILES, **({cluster_day2.LIBFAKETIME: "libfaketime"} if day2 else {})}
    missing += [package for file, package in files.items() if not file.exists()]
    return sorted(set(missing))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests/real/cluster-lab")
    parser.add_argument("--lbs", type=int, default=1)
    parser.add_argument("--cps", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cp-memory", type=int, default=3072)
    parser.add_argument("--grow-cps", type=int, default=0, help="after the first up and its checks: this many CPs")
    parser.add_argument("--grow-parallel", type=int, default=1, help="pulumi up --parallel for the growth")
    day2 = "a second up, the drill (2 LBs; its control-plane half with 3 CPs), --add-worker, a due renewal, an up"
    parser.add_argument("--day2", action="store_true", help=day2)
    parser.add_argument("--add-worker", action="store_true", help="with --day2: one more worker through pulumi up")
    parser.add_argument("--keep-going", action="store_true", help="run the checks even when up failed")
    nice = "nice value for the LBs' and workers' QEMU (tests/real/cluster_nice.py); 0 leaves them alone"
    parser.add_argument("--nice-others", type=int, default=10, choices=range(20), metavar="0-19", help=nice)
    parser.add_argument("--hold-on-failure", action="store_true", help="keep the lab up for inspection (30 min)")
    timing = "controlPlane.leaderElection for the lab stack: lease/renew/retry seconds (e.g. 60/40/5); unset: none"
    parser.add_argument("--leader-election", type=leader_election, metavar="L/R/P", help=timing)
    raft = "etcd.timing for the lab stack: heartbeat/election timeout in ms (e.g. 500/5000); unset: etcd's own"
    parser.add_argument("--etcd-timing", type=etcd_timing, metavar="H/E", help=raft)
    args = parser.parse_args(argv)
    missing = missing_packages(args.day2)
    if missing:
        print(f"cluster-lab: FAIL: this machine lacks what the lab runs: apt-get install {' '.join(missing)}")
        return 1
    report = Report()
    lab = Lab(args, report)
    started = time.monotonic()
    if report.run("inputs (binaries, images, bundle, guest image)", lab.build_inputs):
        try:
            lab.deploy_and_check()
        except Exception as error:
            report.stages.append(Stage("lab", detail=f"{type(error).__name__}: {error}"))
            traceback.print_exc(file=sys.stderr)
    ok = bool(report.stages) and all(stage.ok for stage in report.stages)
    # args.cps: after any growth
    shape = f"{args.lbs} LB + {args.cps} CP + {args.workers} worker(s), others at nice {args.nice_others}"
    if args.leader_election:
        shape += ", leader election " + "/".join(map(str, args.leader_election)) + " s"
    if args.etcd_timing:
        shape += ", etcd timing " + "/".join(map(str, args.etcd_timing)) + " ms"
    stages = "; ".join(
        f"{s.name} {'ok' if s.ok else 'FAILED'} {s.seconds:.0f} s (load {s.load_max:.1f})" for s in report.stages
    )
    print(f"cluster-lab: {'PASS' if ok else 'FAIL'}: {shape}: {stages}; total {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
