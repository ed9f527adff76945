"""Offline plan: everything a stack would send to its nodes, without Pulumi, providers or a hypervisor.

    python -m tools.plan prod --out build/plan/prod [--show-secrets] [--source-outputs FILE]

Writes, for every node in execution order, each script that would run and each
file it would write (secrets masked unless --show-secrets), the dependency graph
(DOT and, with graphviz installed, SVG), and a summary. Node directories are
named by role and index (`cp-1`), not hostname, so `diff -r build/plan/staging
build/plan/prod` lines up the same node of two stacks.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.graph import DeploymentGraph, transitive_reduction
from tools.offline import REPO_ROOT, Evaluation, Registration, evaluate, load_stack_config

MARKER = "<secret: masked by tools.plan; run with --show-secrets to see it>"
_PRIVATE_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)
_TOKEN = re.compile(r"\b[a-z0-9]{6}\.[a-z0-9]{16}\b")
# A key of an EncryptionConfiguration (render/encryption.py): `secret: <base64>` under a provider's keys.
_ENCRYPTION_KEY = re.compile(r"^(\s*secret: )[A-Za-z0-9+/]+={0,2}$", re.M)
_ROLE_COLOURS = {"lb": "#f4a261", "etcd": "#b48ead", "cp": "#5e81ac", "worker": "#8fbc8f", "cluster": "#d8dee9"}
CLOUD_INIT = "libvirt:index/cloudInitDisk:CloudInitDisk"


def mask(text: str) -> str:
    """Replace private keys, bootstrap tokens and encryption keys; everything else stays readable."""
    text = _ENCRYPTION_KEY.sub(lambda found: found[1] + MARKER, _PRIVATE_BLOCK.sub(MARKER, text))
    return _TOKEN.sub("<token: masked>", text)


@dataclass(frozen=True)
class PlannedFile:
    path: str
    mode: int
    content: str


def decode_bundle(text: str) -> list[PlannedFile]:
    files = []
    for line in text.splitlines():
        if line.strip():
            path, mode, content = line.split(" ")
            files.append(PlannedFile(path, int(mode, 8), base64.b64decode(content).decode()))
    return files


def bundle_by_path(text: str) -> dict[str, tuple[int, str]]:
    """A bundle as path -> (mode, content)."""
    return {item.path: (item.mode, item.content) for item in decode_bundle(text)}


def script_of(step: Registration, field: str = "create") -> str:
    """The script inside the step's `sudo --non-interactive bash -c SCRIPT NAME` command."""
    words = shlex.split(step.inputs[field])
    return words[4] if words[:4] == ["sudo", "--non-interactive", "bash", "-c"] else step.inputs[field]


@dataclass(frozen=True)
class NodeInfo:
    hostname: str
    address: str
    role: str

    @property
    def directory(self) -> str:
        return f"{self.role}-{self.hostname.rsplit('-', 1)[1]}"


def nodes_of(evaluation: Evaluation) -> list[NodeInfo]:
    nodes = evaluation.outputs["nodes"].value
    return sorted(
        (NodeInfo(name, node["address"], node["role"]) for name, node in nodes.items()),
        key=lambda node: (node.role, int(node.hostname.rsplit("-", 1)[1])),
    )


def _node_of_step(step: Registration, by_address: dict[str, NodeInfo]) -> NodeInfo:
    return by_address[step.inputs["connection"]["host"]]


def _step_kind(step: Registration, node: NodeInfo) -> str:
    return step.name.removeprefix(node.hostname + "-")


def write_plan(evaluation: Evaluation, out: Path, *, show_secrets: bool = False) -> Path:
    """Write the plan under `out` (replacing what was there) and return the summary's path."""
    graph = DeploymentGraph(evaluation)
    keep = (lambda text: text) if show_secrets else mask
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    nodes = nodes_of(evaluation)
    by_address = {node.address: node for node in nodes}
    by_hostname = {node.hostname: node for node in nodes}

    for disk in evaluation.by_type(CLOUD_INIT):
        node = by_hostname[disk.name.removesuffix("-cloud-init")]
        directory = out / "nodes" / node.directory / "00-cloud-init"
        directory.mkdir(parents=True)
        for name, key in (("user-data", "userData"), ("meta-data", "metaData"), ("network-config", "networkConfig")):
            (directory / name).write_text(keep(disk.inputs[key]))

    depth = graph.step_depth
    per_node: dict[str, list[Registration]] = {}
    # A step that exists only for its delete sends nothing to a node while it is in the cluster.
    for step in (step for step in graph.steps if step.inputs.get("create")):
        per_node.setdefault(_node_of_step(step, by_address).hostname, []).append(step)
    for hostname, steps in per_node.items():
        node = by_hostname[hostname]
        for position, step in enumerate(sorted(steps, key=lambda s: (depth[s.urn], s.name)), start=1):
            directory = out / "nodes" / node.directory / f"{position:02d}-{_step_kind(step, node)}"
            directory.mkdir(parents=True)
            (directory / "script.sh").write_text(keep(script_of(step)))
            listing = []
            for planned in decode_bundle(step.inputs.get("stdin") or ""):
                target = directory / "files" / planned.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(keep(planned.content))
                listing.append(f"{planned.mode:04o} {planned.path}")
            if listing:
                (directory / "files.txt").write_text("\n".join(listing) + "\n")

    dot = render_dot(evaluation, graph, nodes)
    (out / "graph.dot").write_text(dot)
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", str(out / "graph.svg"), str(out / "graph.dot")], check=True, timeout=120)
    summary = out / "summary.md"
    summary.write_text(render_summary(evaluation, graph))
    return summary


def _role_of(resource: Registration, nodes: Sequence[NodeInfo]) -> str:
    for node in sorted(nodes, key=lambda n: len(n.hostname), reverse=True):
        if resource.name == node.hostname or resource.name.startswith(node.hostname + "-"):
            return node.role
    return "cluster"


def render_dot(evaluation: Evaluation, graph: DeploymentGraph, nodes: Sequence[NodeInfo]) -> str:
    resources = graph.custom_resources
    edges = transitive_reduction(graph.edges_between(resources))
    names = {r.urn: r.name for r in resources}
    lines = [
        f'digraph "{evaluation.stack}" {{',
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#4c566a"];',
    ]
    for resource in sorted(resources, key=lambda r: r.name):
        role = _role_of(resource, nodes)
        shape = ', penwidth=2, shape="box"' if resource.type == "command:remote:Command" else ""
        label = f"{resource.name}\\n{resource.type.rsplit(':', 1)[-1]}"
        lines.append(f'  "{resource.name}" [label="{label}", fillcolor="{_ROLE_COLOURS[role]}"{shape}];')
    for urn in sorted(edges, key=lambda u: names[u]):
        for before in sorted(edges[urn], key=lambda u: names[u]):
            lines.append(f'  "{names[before]}" -> "{names[urn]}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_summary(evaluation: Evaluation, graph: DeploymentGraph) -> str:
    counts = graph.component_counts()
    lines = [f"# Offline plan: stack `{evaluation.stack}`", "", "## Resources per component", ""]
    lines += ["| component | custom resources |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in counts.items()]
    lines += [f"| **total** | {len(graph.custom_resources)} |", "", "## Phases of remote steps", ""]
    for level, steps in enumerate(graph.phases(), start=1):
        lines.append(f"{level}. " + ", ".join(f"`{step.name}`" for step in steps))
    chain = graph.longest_chain()
    lines += ["", f"## Longest chain of remote steps ({len(chain)})", ""]
    lines.append(" → ".join(f"`{step.name}`" for step in chain))
    lines += ["", "## Placement", "", "| hypervisor | VMs |", "|---|---|"]
    hosts: dict[str, list[str]] = {}
    for hostname, node in sorted(evaluation.outputs["nodes"].value.items()):
        hosts.setdefault(node.get("hypervisor", "?"), []).append(hostname)
    lines += [f"| {host} | {', '.join(names)} |" for host, names in sorted(hosts.items())]
    lines += ["", "## Outputs", ""]
    for name, output in sorted(evaluation.outputs.items()):
        shown = "[secret]" if output.secret else f"`{json.dumps(output.value, sort_keys=True)}`"
        lines.append(f"- `{name}`: {shown}")
    return "\n".join(lines) + "\n"


def _promotion_source(stack: str) -> str:
    config = load_stack_config(REPO_ROOT, stack)
    promotion = config.get("kubeadm-ha:promotion") or {}
    if not isinstance(promotion, dict) or not promotion.get("from"):
        raise SystemExit(f"--source-outputs: Pulumi.{stack}.yaml has no kubeadm-ha:promotion.from")
    return str(promotion["from"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="stack name: reads Pulumi.<stack>.yaml")
    parser.add_argument("--out", type=Path, help="output directory (default: build/plan/<stack>)")
    parser.add_argument("--show-secrets", action="store_true", help="write keys and tokens in clear")
    parser.add_argument(
        "--source-outputs",
        type=Path,
        help="`pulumi stack output --json` of the stack this one promotes from (default: that stack deployed "
        "as its stack file says)",
    )
    args = parser.parse_args(argv)
    out = args.out or Path("build") / "plan" / args.stack
    stack_outputs = None
    if args.source_outputs is not None:
        stack_outputs = {_promotion_source(args.stack): json.loads(args.source_outputs.read_text())}
    summary = write_plan(evaluate(args.stack, stack_outputs=stack_outputs), out, show_secrets=args.show_secrets)
    print(summary.read_text())
    print(f"plan written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
