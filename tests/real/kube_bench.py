"""kube-bench (the CIS Kubernetes Benchmark) against the program's own control plane, in the real lab (issue 20).

    tests/real/kube-bench [--out DIR] [--no-node]

What runs: the `smallest` shape (one load balancer, ONE control plane, stacked etcd) from the real control-plane
lab (tests/real/control_plane_lab.py): the program's placed PKI and `init.yaml`, kubeadm's own `init phase certs /
kubeconfig / control-plane / etcd local`, then etcd, kube-apiserver, kube-controller-manager and kube-scheduler
started with the commands of the static-pod manifests kubeadm wrote. The load balancer (HAProxy from its
`configure-lb` step) is started only for the node part, where kubeadm's kube-proxy addon and kube-proxy reach the
API through the controlPlaneEndpoint; no check reads it. kube-bench (built by tests/real/build-binaries) runs its
`master` and `etcd` targets inside the node's network and mount namespaces, so the manifests, kubeconfigs, PKI and
etcd's data directory are read at their real paths (/etc and /var are the node's overlays,
tests/real/node_root.py); kubectl is on its PATH as on a control plane.

How kube-bench sees the processes: its audits run the real `/bin/ps -ef | grep <component>` and `ps -C`. The lab's
nodes share one PID namespace, and other labs may run on this machine at the same time; so the runner re-executes
itself in a PID namespace of its own (tests/real/pid_namespace.py): ps lists the processes of this lab
only, and with one control plane that is exactly one of each component. The runner refuses to run kube-bench (and
to trust its result) unless ps lists exactly one process per component before and after it ran. No stand-in for
ps is used. When the namespace's first process ends, the kernel kills whatever is left in it.

Benchmark: `--benchmark cis-1.12` (BENCHMARK). kube-bench's cfg/config.yaml `version_mapping` ends at "1.34":
"cis-1.12" in both versions the module proxy serves (v0.15.6, v0.16.0); the program runs Kubernetes 1.37, which
kube-bench would not map, so the newest CIS benchmark it has is named explicitly. kube-bench's cfg/ is used as
built, with no path overridden: every file the master and etcd checks read is where kubeadm puts it.

The node target (section 4) runs against a real kubelet and a real kube-proxy: see tests/real/kube_bench_node.py
and tests/real/kube_bench_proxy.py, which say what they show and what they do not. `--no-node` skips it.

Output: per section the PASS/FAIL/WARN/INFO counts, every FAIL and WARN with its title (and a FAIL's remediation,
first line), the full JSON of each kube-bench run under --out. Exit 0 only with no FAIL; the last line is a
one-line summary. Every process and namespace is torn down on the way out, after a failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.addressing import NodePlan
from model.versions import DEFAULT_KUBERNETES
from tests.integration.netns import Lab
from tests.real import pid_namespace
from tests.real.control_plane_lab import ControlPlaneLab, Node
from tests.real.node_root import DEFAULT_PATH
from tools.plan import mask, script_of

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests" / "real" / "build-binaries"
STACK = "smallest"  # one control plane: `ps -ef` on the node shows one of each component
# kube-bench's cfg/config.yaml maps Kubernetes up to 1.34 (to cis-1.12); 1.35+ is not mapped at all.
BENCHMARK = "cis-1.12"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
PROCESSES = ("etcd", *COMPONENTS)
CONTROL_PLANE_NAMES = ("kubeadm", *COMPONENTS, "kubectl", "etcd", "etcdctl", "kube-bench")
OWN_VERSION = {"kube-bench", "containerd", "ctr", "containerd-shim-runc-v2"}  # not a Kubernetes version
BUILD_BOUND = 3000.0  # the whole suite's build bound (tests/run-all.sh)
BENCH_BOUND = 300.0
RUN_BOUND = BUILD_BOUND + 1800.0
STATUSES = ("PASS", "FAIL", "WARN", "INFO")


def say(message: str) -> None:
    print(f"[kube-bench] {message}", flush=True)


def build(names: tuple[str, ...], version: str) -> dict[str, str]:
    """Every name through tests/real/build-binaries (cached by version), bounded; name -> path."""
    specs = [name if name in OWN_VERSION else f"{name}@{version}" for name in names]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BUILD), *specs],
        stdout=subprocess.PIPE,
        text=True,
        timeout=BUILD_BOUND,
        check=False,
        env={**os.environ, "PATH": f"{os.environ.get('PATH', DEFAULT_PATH)}:/usr/local/go/bin"},
    )
    if result.returncode != 0:
        raise SystemExit(f"tests/real/build-binaries {' '.join(specs)} failed (exit {result.returncode})")
    paths = {}
    for line in result.stdout.splitlines():
        name, built, path = line.split(" ", 2)
        paths[name] = path
        say(f"{name} {built}: {path}")
    say(f"binaries ready in {time.monotonic() - started:.0f} s")
    return paths


def process_table() -> list[str]:
    """Every process's command line, as `ps -e -o args` prints it (this runner's PID namespace: its lab)."""
    out = subprocess.run(["ps", "-e", "-o", "args="], capture_output=True, text=True, timeout=30, check=True).stdout
    return out.splitlines()


def running(name: str, table: list[str]) -> list[str]:
    return [line for line in table if line.split() and os.path.basename(line.split()[0]) == name]


def check_single(names: tuple[str, ...], when: str) -> None:
    """Exactly one process per name in the lab, or the ps-based audits would read the wrong command line."""
    table = process_table()
    counts = {name: len(running(name, table)) for name in names}
    if any(count != 1 for count in counts.values()):
        raise SystemExit(f"{when}: ps lists {counts} (exactly one of each expected)")


# ---- the lab -------------------------------------------------------------------------------------------

# Paths a freshly prepared node does not have, hidden from the node's /etc and /var (an overlay whiteout, the path
# reads as absent) when this machine has them. The test machine's etcd-server package owns /var/lib/etcd
# (etcd:etcd, 0700): without this, kubeadm's `etcd local` would find it and keep it instead of creating its own
# (root:root, 0700), and checks 1.1.11/1.1.12 would read the test machine's directory.
HOST_ONLY = (
    "/var/lib/etcd", "/etc/kubernetes", "/var/lib/kubelet", "/etc/cni", "/etc/etcd", "/etc/default/kubelet",
    "/etc/systemd/system/kubelet.service.d", "/etc/containerd", "/var/lib/containerd",
)  # fmt: skip


class BenchControlPlaneLab(ControlPlaneLab):
    """The control-plane lab, with HOST_ONLY hidden on every node before its overlays are mounted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden: list[str] = []

    def add_node(self, plan: NodePlan) -> Node:
        node = super().add_node(plan)
        for path in HOST_ONLY:
            if os.path.lexists(path):
                whiteout = node.root.path(path)
                whiteout.parent.mkdir(parents=True, exist_ok=True)
                os.mknod(whiteout, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
                if path not in self.hidden:
                    self.hidden.append(path)
        return node


def place_audit_policy(live: ControlPlaneLab, node: Node) -> str | None:
    """If the API server's manifest names an audit policy file the program did not place, write the program's
    own policy (render.hardening.audit_policy) there; returns the path written (the program will place it)."""
    command = live.manifest_command(node, "kube-apiserver")
    flag = next((arg for arg in command if arg.startswith("--audit-policy-file=")), None)
    if flag is None:
        return None
    path = flag.split("=", 1)[1]
    if node.root.exists(path):
        return None
    from render.hardening import audit_policy  # only where the manifest names a policy does the module exist

    node.root.place({path: (0o600, audit_policy())})
    return path


@dataclasses.dataclass
class BenchLab:
    lab: Lab
    live: ControlPlaneLab
    node: Node
    tools: Path
    notes: list[str]


@contextlib.contextmanager
def start(work: Path, version: str, binaries: dict[str, str]) -> Iterator[BenchLab]:
    """The smallest shape's control plane, running; torn down on the way out, after a failure too."""
    lab = Lab(pid_namespace.lab_tag("kb"), log_dir=work / "logs")
    pid_namespace.record(lab)
    live: BenchControlPlaneLab | None = None
    try:
        live = BenchControlPlaneLab(lab, work, STACK, version, binaries, programs={})
        assert live.etcd_spec is None and len(live.plan.control_planes) == 1, f"{STACK}: one stacked control plane"
        started = time.monotonic()
        live.prepare_control_planes(only_first=True)
        node = live.nodes[live.plan.control_planes[0].hostname]
        notes = []
        if live.hidden:
            notes.append(
                f"hidden from the node (this machine has them, a fresh node does not): {', '.join(live.hidden)}"
            )
        written = place_audit_policy(live, node)
        if written:
            notes.append(f"the lab wrote {written} from render.hardening.audit_policy(): the program does not place it")
            say(notes[-1])
        live.start_stacked_etcd(node)
        live.start_control_planes(COMPONENTS, only=[node.name])
        say(f"{node.name}: etcd and the control plane up in {time.monotonic() - started:.0f} s")
        run_node_files(live, node)
        tools = work / "node-bin"  # what a control plane has on its PATH (the kubectl deb)
        tools.mkdir(exist_ok=True)
        (tools / "kubectl").symlink_to(binaries["kubectl"])
        yield BenchLab(lab, live, node, tools, notes)
    except Exception:
        say("lab logs (tail; all of them are copied to --out/logs):\n" + mask(lab.logs(tail=8)))
        raise
    finally:
        if live is not None:
            live.close()
        lab.close()
        say("lab torn down")


def run_node_files(live: ControlPlaneLab, node: Node) -> None:
    """The program's own `<node>-node-files` step (render/node_files.py), as the program runs it after kubeadm
    set the node up: the file modes and owners CIS asks for."""
    script = script_of(live.evaluation.named(f"{node.name}-node-files"))
    ran = live.run_step(node, script, "")
    assert ran.returncode == 0, ran.output
    say(f"{node.name}: the program's node-files step: {ran.output.strip().splitlines()[-1]}")


# ---- kube-bench ---------------------------------------------------------------------------------------


def run_bench(bench: BenchLab, kube_bench: str, targets: tuple[str, ...], config_dir: Path, out: Path) -> Any:
    """kube-bench's `targets` on the node; the JSON it wrote (also kept under `out`)."""
    result = out / f"kube-bench-{'-'.join(targets)}.json"
    argv = [kube_bench, "run", "--targets", ",".join(targets), "--benchmark", BENCHMARK,
            "--config-dir", str(config_dir), "--json", "--outputfile", str(result)]  # fmt: skip
    say("$ " + shlex.join(argv))
    started = time.monotonic()
    ran = bench.node.root.run(
        argv, netns=bench.node.namespace.name, timeout=BENCH_BOUND, env={"PATH": f"{bench.tools}:{DEFAULT_PATH}"}
    )
    (out / f"kube-bench-{'-'.join(targets)}.log").write_text(ran.output)
    if ran.returncode != 0 or not result.is_file():
        raise SystemExit(f"kube-bench failed:\n{ran.output[-3000:]}")
    say(f"kube-bench {','.join(targets)}: {time.monotonic() - started:.1f} s")
    data = json.loads(result.read_text())
    result.write_text(mask(json.dumps(data, indent=1)) + "\n")
    return data


@dataclasses.dataclass(frozen=True)
class Finding:
    status: str
    id: str
    title: str
    remediation: str
    actual: str


def sections(data: Any) -> Iterator[tuple[str, str, dict[str, int], list[Finding]]]:
    """(section id, title, counts by status, findings) for every section of every target in `data`."""
    for control in data.get("Controls", []):
        for group in control.get("tests") or []:
            counts = dict.fromkeys(STATUSES, 0)
            findings = []
            for check in group.get("results") or []:
                counts[check["status"]] = counts.get(check["status"], 0) + 1
                findings.append(
                    Finding(check["status"], check["test_number"], check["test_desc"],
                            (check.get("remediation") or "").strip(), (check.get("actual_value") or "").strip())
                )  # fmt: skip
            yield group["section"], group["desc"], counts, findings


def first_line(text: str, width: int = 150) -> str:
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= width else line[: width - 3] + "..."


def report(results: list[Any]) -> dict[str, int]:
    """Print the tables; the totals by status."""
    totals = dict.fromkeys(STATUSES, 0)
    rows = []
    for data in results:
        for section, title, counts, findings in sections(data):
            rows.append((section, title, counts, findings))
            for status in STATUSES:
                totals[status] += counts[status]
    print(f"{'section':<8} {'PASS':>4} {'FAIL':>4} {'WARN':>4} {'INFO':>4}  title")
    for section, title, counts, _ in rows:
        print(f"{section:<8} {counts['PASS']:>4} {counts['FAIL']:>4} {counts['WARN']:>4} {counts['INFO']:>4}  {title}")
    print(f"{'total':<8} {totals['PASS']:>4} {totals['FAIL']:>4} {totals['WARN']:>4} {totals['INFO']:>4}")
    for status in ("FAIL", "WARN"):
        print(f"\n{status}:")
        for _, _, _, findings in rows:
            for finding in findings:
                if finding.status != status:
                    continue
                print(f"  {finding.id:<8} {finding.title}")
                if status == "FAIL":
                    print(f"           remediation: {first_line(finding.remediation)}")
                    print(f"           seen: {first_line(finding.actual, 120)}")
    return totals


def main(argv: list[str]) -> int:
    if not pid_namespace.inside():
        return pid_namespace.run_inside("tests.real.kube_bench", argv, bound=RUN_BOUND)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/kube-bench-results"), help="where the JSON results go")
    parser.add_argument("--version", default=DEFAULT_KUBERNETES, help="Kubernetes version (default: the program's)")
    parser.add_argument("--targets", default="master,etcd", help="kube-bench targets besides node (%(default)s)")
    parser.add_argument("--no-node", action="store_true", help="skip section 4 (the real kubelet)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.parts[1:2] in (("etc",), ("var",)):
        raise SystemExit("--out must not be under /etc or /var (the node's overlays would hide what kube-bench writes)")
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    from tests.real import kube_bench_node

    names = CONTROL_PLANE_NAMES if args.no_node else (*CONTROL_PLANE_NAMES, *kube_bench_node.NAMES)
    binaries = build(names, args.version)
    config_dir = Path(binaries["kube-bench"]).parent / "cfg"
    work = pid_namespace.scratch() / "lab"
    work.mkdir()
    results: list[Any] = []
    notes: list[str] = []
    try:
        with start(work, args.version, binaries) as bench:
            notes += bench.notes
            check_single(PROCESSES, "before kube-bench")
            targets = tuple(args.targets.split(","))
            results.append(run_bench(bench, binaries["kube-bench"], targets, config_dir, out))
            check_single(PROCESSES, "after kube-bench")
            if not args.no_node:
                node_result, node_notes = kube_bench_node.run(bench, binaries, config_dir, out)
                notes += node_notes
                if node_result is not None:
                    results.append(node_result)
    finally:
        subprocess.run(["rm", "-rf", str(out / "logs")], check=False, timeout=60)
        subprocess.run(["cp", "-r", str(work / "logs"), str(out / "logs")], check=False, timeout=60)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False, timeout=120)
    totals = report(results)
    for note in notes:
        print(f"note: {note}")
    summary = (
        f"kube-bench {BENCHMARK} on {STACK} (Kubernetes {args.version}): {totals['PASS']} PASS, {totals['FAIL']} FAIL,"
        f" {totals['WARN']} WARN, {totals['INFO']} INFO in {time.monotonic() - began:.0f} s; JSON in {out}"
    )
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    return 0 if totals["FAIL"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
