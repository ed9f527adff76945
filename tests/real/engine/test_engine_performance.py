"""Performance side by side in one run (issue 19, part 7): the product's real preview against the engine's floor.

Two previews, each with the real CLI, Python language host and plugins (installed from their files into a
PULUMI_HOME of their own, downloads disabled), on the same machine in the same run, alternating:

- the product with a stack derived from Pulumi.dev.yaml with 3 control planes and 100 workers
  (perf_programs.perf_stack_config);
- a trivial program registering the same resources (types, names, parent tree, providers) with trivial inputs
  (perf_programs.TRIVIAL_PROGRAM). The test checks that the two previews plan the same count per type.

The libvirt provider connects to its `uri` when it is configured, even in a preview, so a libvirtd of the test's
own answers (libvirtd.running_libvirtd); each command runs in a private mount namespace where its socket
directory is bound over /run/libvirt, so the dev stack's `qemu:///system` reaches it unchanged.

Figures per command (scratch.run_measured): wall time from start to exit; the peak of the summed RSS of every
process of the command's session (the CLI, the language host, the Python program, the plugins; sampled every
50 ms from /proc); and the largest single process's peak RSS (getrusage RUSAGE_CHILDREN through GNU time's %M).
One warm-up each (caches, page cache), then RUNS measured runs each, alternating, so that each product run has
a trivial neighbour under the same load: the median of the paired wall-time ratios must be at most MAX_RATIO
(the ratio of the medians and of CPU time are printed beside it, with every figure; pytest -rP).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_programs, require_root
from tests.real.engine import plugins
from tests.real.engine.libvirtd import Libvirtd, scratch_libvirtd
from tests.real.engine.perf_programs import STACK, write_perf_stack, write_trivial_program
from tests.real.engine.scratch import Measured, ScratchProject
from tests.real.engine.test_engine_preview import counts_by_type

pytestmark = pytest.mark.real

RUNS = 7
MAX_RATIO = 1.1
PREVIEW_TIMEOUT_SECONDS = 600  # 8-10 s measured; the bound is for a machine under load


@pytest.fixture
def libvirt() -> Iterator[Libvirtd]:
    require_root()
    require_programs("libvirtd", "virsh", "unshare", "mount")
    plugins.cli_directory(), plugins.plugin_files()  # the toolchain first: skip before starting anything
    with scratch_libvirtd("kha-perf-") as daemon:
        yield daemon


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[ScratchProject]]:
    """The test's projects, removed (state, PULUMI_HOME and its plugin copies) whatever happens."""
    projects: list[ScratchProject] = []
    try:
        yield projects
    finally:
        for scratch in projects:
            scratch.remove()


def project(base: Path, libvirt: Libvirtd, trivial: bool, made: list[ScratchProject]) -> ScratchProject:
    scratch = ScratchProject(base, binds={Path("/run/libvirt"): libvirt.directory / "run"})
    made.append(scratch)
    scratch.setup()
    if trivial:
        write_trivial_program(scratch.project)  # over the product's __main__.py; same Pulumi.yaml and venv
    else:
        write_perf_stack(scratch.project)
    scratch.must("stack", "init", STACK)
    return scratch


def preview(scratch: ScratchProject) -> tuple[Measured, dict[str, int]]:
    run = scratch.must("preview", "--stack", STACK, "--json", timeout=PREVIEW_TIMEOUT_SECONDS)
    planned = json.loads(run.stdout)
    errors = [d for d in planned.get("diagnostics") or [] if d.get("severity") == "error"]
    assert errors == [], errors
    return run, dict(counts_by_type([step["urn"] for step in planned["steps"]]))


def test_the_product_previews_within_ten_percent_of_a_trivial_program_of_the_same_resources(
    tmp_path: Path, libvirt: Libvirtd, made: list[ScratchProject]
) -> None:
    product = project(tmp_path / "product", libvirt, trivial=False, made=made)
    trivial = project(tmp_path / "trivial", libvirt, trivial=True, made=made)

    _, product_counts = preview(product)  # warm-up, and the plan both must make
    _, trivial_counts = preview(trivial)
    assert product_counts == trivial_counts, {
        "product only": {k: v for k, v in product_counts.items() if trivial_counts.get(k) != v},
        "trivial only": {k: v for k, v in trivial_counts.items() if product_counts.get(k) != v},
    }
    resources = sum(product_counts.values())
    assert resources > 1000, product_counts

    measured: dict[str, list[Measured]] = {"product": [], "trivial": []}
    for _ in range(RUNS):
        measured["product"].append(preview(product)[0])
        measured["trivial"].append(preview(trivial)[0])

    def median(name: str, figure: str) -> float:
        return statistics.median(getattr(run, figure) for run in measured[name])

    # Runs alternate, so each product run has a trivial neighbour under the same load (other jobs on the
    # machine drift): the median of the paired ratios is the figure judged, the ratio of medians is shown too.
    paired = statistics.median(
        p.seconds / t.seconds for p, t in zip(measured["product"], measured["trivial"], strict=True)
    )
    of_medians = median("product", "seconds") / median("trivial", "seconds")
    cpu = median("product", "cpu_seconds") / median("trivial", "cpu_seconds")
    lines = [f"{resources} resources planned by each; {RUNS} runs each, alternating, after a warm-up; medians:"]
    for name, runs in measured.items():
        lines.append(
            f"  {name}: wall {median(name, 'seconds'):.2f} s (runs {', '.join(f'{r.seconds:.2f}' for r in runs)}), "
            f"CPU {median(name, 'cpu_seconds'):.2f} s, peak RSS of the process tree "
            f"{median(name, 'peak_tree_rss_mib'):.0f} MiB, of its largest process "
            f"{median(name, 'peak_process_rss_mib'):.0f} MiB"
        )
    lines.append(
        f"  product / trivial: wall {paired:.3f} (median of paired runs; {of_medians:.3f} of the medians), "
        f"CPU {cpu:.3f}"
    )
    print("\n".join(lines))  # shown with pytest -rP
    assert paired <= MAX_RATIO, "\n".join(lines)
