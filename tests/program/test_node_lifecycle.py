"""How nodes leave, judged on the resource graph of two evaluations (before and after), as `pulumi up` sees them.

Pulumi runs a step's `delete` when the step leaves the program (or is replaced with its VM), in reverse
dependency order; so what a removal does, and to whom, is fixed by which steps exist and what they depend on.
"""

from __future__ import annotations

import re

import pytest

from tests.program.test_day2 import COMMAND, names, run, stack_config
from tools.offline import Evaluation, Registration
from tools.plan import script_of

LOCAL_COMMAND = "command:local:Command"
_HEADER = re.compile(r"^# kubeadm-ha step (\S+) on (\S+)\. Generated; do not edit\.$", re.MULTILINE)


def steps(ev: Evaluation) -> list[Registration]:
    return [*ev.by_type(COMMAND), *ev.by_type(LOCAL_COMMAND)]


def delete_of(step: Registration) -> tuple[str, str] | None:
    """(step name, host) of the step's delete script, None when it has none."""
    if not step.inputs.get("delete"):
        return None
    found = _HEADER.search(script_of(step, "delete"))
    assert found is not None, step.name
    return found.group(1), found.group(2)


def deleting(ev: Evaluation, step_name: str, host: str | None = None) -> Registration:
    """The one resource whose delete is the script `step_name` (on `host`, when given)."""
    (found,) = [
        step
        for step in steps(ev)
        if (script := delete_of(step)) is not None and script[0] == step_name and host in (None, script[1])
    ]
    return found


def kubernetes_nodes(ev: Evaluation) -> list[str]:
    return [name for name, node in ev.outputs["nodes"].value.items() if node["role"] in ("cp", "worker")]


@pytest.fixture(scope="module")
def dev() -> Evaluation:
    return run("dev", previous=run("dev"))


def test_every_node_is_drained_then_reset_then_removed_before_its_vm_goes(dev: Evaluation) -> None:
    """Deletes run in reverse dependency order: each later teardown step is a dependency of the earlier."""
    for node in kubernetes_nodes(dev):
        drain = deleting(dev, f"drain-{node}")
        reset = deleting(dev, "kubeadm-reset-over-ssh", node)
        removal = deleting(dev, f"delete-node-{node}")
        assert dev.depends_on(drain, reset), node
        # A rebuilt first control plane too: its Node goes only once `kubeadm reset` stopped its kubelet.
        assert dev.depends_on(reset, removal), node
        assert dev.depends_on(removal, f"{node}-domain"), node
        for step in (drain, reset, removal):
            assert step.inputs.get("triggers"), step.name  # replaced, so run again, with the node's VM
            assert step.delete_before_replace, step.name


def test_a_stacked_control_plane_leaves_etcd_through_the_survivors(dev: Evaluation) -> None:
    for node in kubernetes_nodes(dev):
        removal = script_of(deleting(dev, f"delete-node-{node}"), "delete")
        assert ("member remove" in removal) == node.startswith("dev-cp-"), node


def test_the_reset_runs_where_a_dead_node_can_be_told_apart(dev: Evaluation) -> None:
    """A remote step's delete fails when its node does not answer; the reset runs from the machine running
    Pulumi instead, probes the node, and skips a node that does not answer."""
    for node in kubernetes_nodes(dev):
        reset = deleting(dev, "kubeadm-reset-over-ssh", node)
        assert reset.type == LOCAL_COMMAND
        assert reset.inputs.get("create") is None  # nothing to do while the node is in the cluster
        assert reset.inputs["interpreter"] == ["/bin/bash", "-c"]
        script = script_of(reset, "delete")
        address = dev.outputs["nodes"].value[node]["address"]
        assert f"</dev/tcp/{address}/22" in script and "kubeadm reset --force" in script
        # The operator's key reaches ssh on stdin only, secret; the node's host key is pinned.
        assert "stdin" in reset.secret_inputs and "PRIVATE KEY" in reset.inputs["stdin"]
        assert "PRIVATE KEY" not in script
        assert "StrictHostKeyChecking=yes" in script
        # The nodes' own steps no longer reset them (their delete would fail on a dead node).
        assert delete_of(dev.named(f"{node}-kubeadm-{'init' if node == 'dev-cp-1' else 'join'}")) is None


def test_scaling_control_planes_down_to_one_touches_no_survivor(dev: Evaluation) -> None:
    one = run("dev", previous=dev, controlPlane={"replicas": 1})
    removed = names(dev) - names(one)
    assert removed
    leaving = ("dev-cp-2", "dev-cp-3")
    # Whatever leaves the program is deleted, running its delete: only the leaving nodes' resources may go.
    assert {
        name for name in removed if name not in leaving and not name.startswith(tuple(f"{n}-" for n in leaving))
    } == set()
    for step in steps(dev):
        script = delete_of(step)
        if step.name in removed and script is not None:
            assert script[0].endswith(("dev-cp-2", "dev-cp-3")) or script[1] in ("dev-cp-2", "dev-cp-3"), step.name
    # The survivor's steps on the leaving nodes move to the survivor itself: an update (pulumi-command 1.x
    # replaces a step only when its triggers change), which runs the step's guarded create, never its delete.
    survivor = {step.name: step for step in steps(dev) if step.name.startswith("dev-cp-1-")}
    for step in steps(one):
        if step.name in survivor:
            assert step.inputs.get("triggers") == survivor[step.name].inputs.get("triggers"), step.name
        if step.name.startswith("dev-cp-1-") and step.inputs.get("connection"):
            assert step.inputs["connection"]["host"] == "10.17.3.31", step.name
    # A node never drains or deletes itself: with no other control plane those steps have no delete.
    for name in ("dev-cp-1-membership", "dev-cp-1-join-token", "dev-cp-1-node-removal"):
        assert delete_of(one.named(name)) is None, name
    # And back to three: the same steps move to the second control plane and regain their deletes.
    three = run("dev", previous=one)
    assert {name for name in names(one) - names(three)} == set()
    assert deleting(three, "drain-dev-cp-1").name == "dev-cp-1-membership"


def upgrade(stack: str = "dev") -> Evaluation:
    target = stack_config(stack)["kubeadm-ha:kubernetes"]["version"]
    major, minor, _patch = target.split(".")
    older = {"version": f"{major}.{int(minor) - 1}.0"}
    before = run(stack, previous=run(stack, kubernetes=older), kubernetes=older)
    return run(stack, previous=before)


def test_control_planes_are_drained_before_their_kubelet_is_upgraded() -> None:
    """kubeadm's upgrade guide drains every node, control planes included, before its kubelet is upgraded."""
    upgraded = upgrade()
    version = stack_config("dev")["kubeadm-ha:kubernetes"]["version"]
    previous: str | None = None
    for index in (1, 2, 3):
        node = f"dev-cp-{index}"
        drain = upgraded.named(f"{node}-upgrade-drain-{version}")
        step = upgraded.named(f"{node}-upgrade-{version}")
        uncordon = upgraded.named(f"{node}-upgrade-uncordon-{version}")
        assert " drain " in script_of(drain) and " uncordon " in script_of(uncordon)
        # Drained from another control plane (it holds admin.conf and stays up).
        assert drain.inputs["connection"]["host"] != step.inputs["connection"]["host"]
        assert upgraded.depends_on(step, drain) and upgraded.depends_on(uncordon, step)
        if previous is not None:
            assert upgraded.depends_on(drain, previous)  # one control plane at a time
        previous = uncordon.name
    assert upgraded.depends_on("dev-worker-1-upgrade-drain-" + version, previous)


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_no_step_streams_a_secret_or_sends_environment_variables(stack: str) -> None:
    ev = run(stack)
    secret_steps = 0
    for step in steps(ev):
        # sshd refuses environment variables it was not told to accept (AcceptEnv), so none are sent.
        assert step.inputs.get("addPreviousOutputInEnv") is False, step.name
        if "stdin" in step.secret_inputs:
            secret_steps += 1
            assert step.inputs.get("logging") == "none", step.name
        else:
            assert step.inputs.get("logging") is None, step.name  # public steps stay visible as they run
    assert secret_steps > 0
