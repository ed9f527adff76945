"""The engine behaviours the VM placement records rely on (issue 18, defect 7), with the real Pulumi CLI.

components/vm.py records each VM's host in a `pulumi.Stash` before its disks exist, and model/previous.py
reads those records back from the stack's own state with the engine's `readStackResourceOutputs`. That rests
on four behaviours of the engine, checked here with the real CLI and Python language host (nothing else: Stash
and the read are engine builtins, so no provider plugin runs) on the file backend Pulumi.yaml uses:

1. a stack just made by `pulumi stack init` answers the read with no resources (it does not fail);
2. a run that fails after creating a Stash leaves it in the state, where the next run reads it;
3. a Stash keeps its first value when its input changes (an update does not move a record);
4. `read_previous_deployment` (the product's own function) turns that into `recorded_nodes`.

The toolchain is the paired CLI and language host `tests/real/build-binaries` builds (plugins.cli_directory).
Every command is bounded, nothing is downloaded (PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION), and the
temporary project, state and PULUMI_HOME are removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.real.engine import plugins
from tests.real.engine.toolchain import ROOT

TIMEOUT_SECONDS = 180
PASSPHRASE = "engine-lab-passphrase"

PROGRAM = """\
import json
import os
import sys

sys.path.insert(0, {root!r})
import pulumi

from model.previous import NODE_RECORD, read_previous_deployment

previous = read_previous_deployment()
with open(os.environ["REPORT"], "w") as report:
    json.dump({{"recorded": {{name: dict(record) for name, record in previous.recorded_nodes.items()}}}}, report)

hypervisor = os.environ["HYPERVISOR"]
stashes = [
    pulumi.Stash(f"{{name}}-placement", input={{"kind": NODE_RECORD, "hostname": name, "hypervisor": hypervisor}})
    for name in os.environ["NAMES"].split(",")
]
if os.environ.get("FAIL") and not pulumi.runtime.is_dry_run():
    # Fails once every Stash exists, as a later step of a real run would (a node's readiness, say).
    def fail(_: object) -> None:
        raise RuntimeError("a later step failed")

    pulumi.Output.all(*(stash.output for stash in stashes)).apply(fail)
"""


def test_vm_records_survive_a_failed_run_and_keep_their_first_host(tmp_path: Path) -> None:
    tools = plugins.cli_directory()
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "state").mkdir()
    (project / "Pulumi.yaml").write_text(
        "name: records\n"
        f"runtime:\n  name: python\n  options:\n    virtualenv: {sys.prefix}\n"
        f"backend:\n  url: file://{tmp_path / 'state'}\n"
    )
    (project / "__main__.py").write_text(PROGRAM.format(root=str(ROOT)))
    env = {
        "PATH": f"{tools}:{os.environ['PATH']}",
        "PULUMI_HOME": str(tmp_path / "home"),
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
    }

    def pulumi(*args: str, names: str, hypervisor: str, fail: bool = False) -> tuple[int, dict[str, object]]:
        report = tmp_path / "report.json"
        report.unlink(missing_ok=True)
        extra = {"NAMES": names, "HYPERVISOR": hypervisor, "REPORT": str(report), **({"FAIL": "1"} if fail else {})}
        done = subprocess.run(
            ["pulumi", *args, "--stack", "lab", "--non-interactive"],
            cwd=project,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
        assert report.is_file(), f"pulumi {' '.join(args)} never ran the program:\n{done.stdout}\n{done.stderr}"
        return done.returncode, json.loads(report.read_text())

    subprocess.run(
        ["pulumi", "stack", "init", "lab", "--non-interactive"],
        cwd=project,
        env=env,
        capture_output=True,
        timeout=TIMEOUT_SECONDS,
        check=True,
    )
    # 1. A new stack: the read answers, with nothing.
    code, seen = pulumi("preview", names="node-a", hypervisor="hv-a")
    assert (code, seen["recorded"]) == (0, {})
    code, seen = pulumi("up", "--yes", names="node-a", hypervisor="hv-a")
    assert (code, seen["recorded"]) == (0, {})
    # 2. A run that creates node-b's record, then fails.
    code, seen = pulumi("up", "--yes", names="node-a,node-b", hypervisor="hv-b", fail=True)
    assert code != 0
    assert {name: record["hypervisor"] for name, record in seen["recorded"].items()} == {"node-a": "hv-a"}
    # 3 and 4. The next run reads both, each with the host it was created on, though the config says hv-c.
    code, seen = pulumi("preview", names="node-a,node-b", hypervisor="hv-c")
    assert code == 0
    assert {name: record["hypervisor"] for name, record in seen["recorded"].items()} == {
        "node-a": "hv-a",
        "node-b": "hv-b",
    }
