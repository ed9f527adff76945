"""KubeletServingApproval as the program registers it (components/csr_approval.py).

Until components/cluster.py wires the component in, these tests evaluate a copy of the program with exactly
the wiring proposed for it (WIRING below, applied to a copy of cluster.py); once cluster.py has it, they
evaluate the repository itself. Proven: every control plane gets the approver timer step once it holds
admin.conf, replaced with its VM, writing the approver rendered from the sorted plan of every control plane and
worker; the first control plane runs the one-shot step after every join; a second evaluation is byte-identical
(a second `pulumi up` is a no-op); adding a worker changes every timer's approver and the one-shot step.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from model.addressing import plan_addresses
from render.csr_approval import approve_step_script, install_approver_script, serving_plan
from tests.stacks import stack_config
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import script_of

REPO = Path(__file__).resolve().parents[2]
COMMAND = "command:remote:Command"
CLUSTER = "components/cluster.py"
# The wiring proposed for components/cluster.py: an import, the phase (before the last-steps list), and its steps
# among the last steps.
IMPORT_ANCHOR = (
    "from components.control_plane_config import ControlPlaneSettings, ControlPlaneSettingsArgs, SettingsTarget\n"
)
IMPORT = "from components.csr_approval import ApproverTarget, KubeletServingApproval, KubeletServingApprovalArgs\n"
PHASE_ANCHOR = "    # The last step of every chain: each other step is upstream of one of them.\n"
PHASE = """\
    # 14. Kubelet serving certificates: an approver timer on every control plane for the planned kubelets'
    #     CSRs, and one step after every join until each planned kubelet serves a certificate from the CA.
    kubelet_serving = KubeletServingApproval(
        "kubelet-serving",
        KubeletServingApprovalArgs(
            context,
            [ApproverTarget(cp.node, cp.vm, cp.kubeadm) for cp in control_planes],
            nodes=[*plan.control_planes, *plan.workers],
            after=[
                *bootstrapped,
                *(step for cp in control_planes for step in (cp.kubeadm, cp.membership) if step is not None),
                *workers.joins.values(),
                *workers.memberships.values(),
            ],
        ),
    )

"""
LAST_STEPS_ANCHOR = "    last_steps += renewal.steps.values()\n"
LAST_STEPS = "    last_steps += kubelet_serving.steps\n"


def wired(source: str) -> str:
    """cluster.py with the proposed wiring (unchanged if it has the component already)."""
    if "KubeletServingApproval" in source:
        return source
    for anchor, text in ((IMPORT_ANCHOR, IMPORT), (PHASE_ANCHOR, None), (LAST_STEPS_ANCHOR, LAST_STEPS)):
        assert source.count(anchor) == 1, f"{CLUSTER} changed: the anchor {anchor.strip()!r} is not found once"
        source = source.replace(anchor, PHASE + anchor if text is None else anchor + text)
    return source


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "KubeletServingApproval" in (REPO / CLUSTER).read_text():
        return REPO
    copy = tmp_path_factory.mktemp("wired") / "project"
    copy.mkdir()
    for name in ("__main__.py", "Pulumi.yaml", "requirements.txt", *(p.name for p in REPO.glob("Pulumi.*.yaml"))):
        shutil.copy2(REPO / name, copy / name)
    for directory in ("components", "model", "render"):
        shutil.copytree(REPO / directory, copy / directory, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / CLUSTER).write_text(wired((REPO / CLUSTER).read_text()))
    return copy


def dev(project: Path, change: Callable[[dict[str, Any]], None] | None = None) -> Evaluation:
    config = load_stack_config(REPO, "dev")
    if change is not None:
        change(config)
    return evaluate("dev", project_dir=project, config=config)


def more_workers(config: dict[str, Any]) -> None:
    config["kubeadm-ha:workers"] = {**config.get("kubeadm-ha:workers", {}), "replicas": 2}


def approval_steps(ev: Evaluation) -> dict[str, dict[str, Any]]:
    return {r.name: r.inputs for r in ev.by_type(COMMAND) if "kubelet-serving-approve" in r.name}


def test_every_control_plane_gets_the_timer_and_the_first_the_step(project: Path) -> None:
    ev = dev(project)
    plan_nodes = plan_addresses(stack_config("dev"))
    plan = serving_plan([*plan_nodes.control_planes, *plan_nodes.workers])
    assert [entry.hostname for entry in plan] == sorted(
        n.hostname for n in (*plan_nodes.control_planes, *plan_nodes.workers)
    )
    domains = {d.inputs["name"]: d for d in ev.by_type("libvirt:index/domain:Domain")}
    for cp in plan_nodes.control_planes:
        step = ev.named(f"{cp.hostname}-kubelet-serving-approver")
        assert script_of(step) == install_approver_script(cp.hostname, plan).render()
        assert step.inputs["connection"]["host"] == str(cp.address)
        kubeadm = next(r for r in ev.by_type(COMMAND) if r.name.startswith(f"{cp.hostname}-kubeadm-"))
        assert ev.depends_on(step, kubeadm)
        assert next(d for name, d in domains.items() if name.endswith(cp.hostname)).urn in step.dependencies
    first = plan_nodes.control_planes[0]
    once = ev.named(f"{first.hostname}-kubelet-serving-approve")
    assert script_of(once) == approve_step_script(first.hostname, plan).render()
    assert once.inputs["connection"]["host"] == str(first.address)
    joins = [r for r in ev.by_type(COMMAND) if r.name.endswith(("-kubeadm-join", "-kubeadm-init", "-membership"))]
    assert joins and all(ev.depends_on(once, join) for join in joins)
    first_domain = next(d for name, d in domains.items() if name.endswith(first.hostname))
    assert first_domain.urn in once.dependencies and len(once.inputs["triggers"]) == 1
    timers = {r.name for r in ev.by_type(COMMAND) if r.name.endswith("-kubelet-serving-approver")}
    assert timers == {f"{cp.hostname}-kubelet-serving-approver" for cp in plan_nodes.control_planes}


def test_a_second_run_is_a_no_op_and_a_new_worker_re_runs_everything(project: Path) -> None:
    first, again, grown = dev(project), dev(project), dev(project, more_workers)
    assert approval_steps(first) == approval_steps(again)
    before, after = approval_steps(first), approval_steps(grown)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name]["create"] != after[name]["create"], f"{name} does not see the new worker"
    assert '"dev-worker-2":{"dns":["dev-worker-2"]' in script_of(grown.named("dev-cp-1-kubelet-serving-approve"))
