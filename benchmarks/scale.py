"""How program evaluation scales with the worker count.

    python -m benchmarks.scale                 # 3 control planes + 10, 100, 300 workers
    python -m benchmarks.scale --workers 2 5   # any sizes

Each size is evaluated in a fresh child process under the offline runtime, so
wall time and peak memory (max RSS) belong to that size alone. Reports the
resource count and the longest chain of remote steps, which must not grow with
the worker count: workers join in parallel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.graph import DeploymentGraph
from tools.offline import evaluate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (10, 100, 300)
# Targets from the product's requirements, checked by `--check`.
TARGET_SECONDS_AT_100 = 3.0
TARGET_MEBIBYTES_AT_100 = 300


@dataclass(frozen=True)
class Measurement:
    workers: int
    seconds: float
    peak_mib: float
    resources: int
    longest_chain: int


def scaled_config(workers: int) -> dict[str, object]:
    # /22 leaves room for 1000 workers from the worker block's offset.
    return {
        "kubeadm-ha:network": {"cidr": "10.40.0.0/22"},
        "kubeadm-ha:loadBalancer": {"replicas": 2},
        "kubeadm-ha:controlPlane": {"replicas": 3},
        "kubeadm-ha:workers": {"replicas": workers},
    }


def measure_here(workers: int) -> Measurement:
    """Evaluate once in this process (run by the child)."""
    started = time.perf_counter()
    evaluation = evaluate("bench", project_dir=ROOT, config=scaled_config(workers))
    seconds = time.perf_counter() - started
    graph = DeploymentGraph(evaluation)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Measurement(workers, seconds, peak_kib / 1024, len(graph.custom_resources), len(graph.longest_chain()))


def measure(workers: int, timeout: float = 600) -> Measurement:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--child", str(workers)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"evaluating {workers} workers failed:\n{result.stderr[-4000:]}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def table(measurements: Sequence[Measurement]) -> str:
    lines = [
        f"machine: {platform.machine()}, {_cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| control planes + workers | evaluation (s) | peak memory (MiB) | resources | longest chain of remote steps |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| 3 + {m.workers} | {m.seconds:.2f} | {m.peak_mib:.0f} | {m.resources} | {m.longest_chain} |"
        for m in measurements
    ]
    return "\n".join(lines)


def problems(measurements: Sequence[Measurement]) -> list[str]:
    """The scaling properties the README promises, as checks."""
    found = []
    for m in measurements:
        if m.workers == 100 and m.seconds > TARGET_SECONDS_AT_100:
            found.append(f"3 + 100 took {m.seconds:.2f} s (target {TARGET_SECONDS_AT_100} s)")
        if m.workers == 100 and m.peak_mib > TARGET_MEBIBYTES_AT_100:
            found.append(f"3 + 100 peaked at {m.peak_mib:.0f} MiB (target {TARGET_MEBIBYTES_AT_100} MiB)")
    chains = {m.longest_chain for m in measurements}
    if len(chains) > 1:
        found.append(f"the longest chain changes with the worker count: {sorted(chains)}")
    ordered = sorted(measurements, key=lambda m: m.workers)
    if len(ordered) >= 3:
        per_worker = [(b.resources - a.resources) / (b.workers - a.workers) for a, b in itertools.pairwise(ordered)]
        if max(per_worker) != min(per_worker):
            found.append(f"resources per worker are not constant: {per_worker}")
    return found


def _cpu_count() -> int:
    return os.cpu_count() or 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--check", action="store_true", help="exit 1 when a scaling target is missed")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(asdict(measure_here(args.child))))
        return 0
    measurements = [measure(workers) for workers in args.workers]
    print(table(measurements))
    missed = problems(measurements)
    for problem in missed:
        print(f"target missed: {problem}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
