"""Day-2 changes as two evaluations, before and after, judged on the resource graph.

`previous_outputs` plays the stack's last deployment (what the program reads back
with `pulumi:pulumi:readStackOutputs`), so each test sees what `pulumi up` would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.rules import ConfigError
from model.versions import DEFAULT_KUBERNETES, RELEASES
from tools.offline import Evaluation, Registration, evaluate
from tools.plan import bundle_by_path, script_of

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "command:remote:Command"
DOMAIN = "libvirt:index/domain:Domain"


def stack_config(stack: str, **overrides: Any) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    for key, value in overrides.items():
        config[f"kubeadm-ha:{key}"] = {**config.get(f"kubeadm-ha:{key}", {}), **value}
    return config


def deployed(ev: Evaluation) -> dict[str, Any]:
    """What the engine would hand back as the last deployment's outputs."""
    return {name: output.value for name, output in ev.outputs.items()}


# An upgrade from the minor before the default to the default (model/versions.py).
TARGET = DEFAULT_KUBERNETES
OLDER_PATCH = RELEASES[f"1.{int(TARGET.split('.')[1]) - 1}"].latest_patch


def run(stack: str, previous: Evaluation | None = None, **overrides: Any) -> Evaluation:
    return evaluate(
        stack,
        project_dir=ROOT,
        config=stack_config(stack, **overrides),
        previous_outputs=deployed(previous) if previous else None,
    )


def names(ev: Evaluation) -> set[str]:
    return {r.name for r in ev.resources}


def inputs(ev: Evaluation) -> dict[str, str]:
    return {r.urn: json.dumps(r.inputs, sort_keys=True, default=str) for r in ev.resources}


def network(ev: Evaluation) -> Registration:
    (found,) = ev.by_type("libvirt:index/network:Network")
    return found


def bundle(step: Registration) -> dict[str, str]:
    return {path: content for path, (_mode, content) in bundle_by_path(step.inputs["stdin"]).items()}


@pytest.fixture(scope="module")
def dev() -> Evaluation:
    return run("dev")


@pytest.fixture(scope="module")
def dev_again(dev: Evaluation) -> Evaluation:
    return run("dev", previous=dev)


def test_a_run_after_deployment_changes_nothing(dev: Evaluation, dev_again: Evaluation) -> None:
    assert inputs(dev_again) == inputs(dev)


def test_workers_up_adds_only_the_new_workers(dev_again: Evaluation) -> None:
    scaled = run("dev", previous=dev_again, workers={"replicas": 3})
    added = names(scaled) - names(dev_again)
    assert {"dev-worker-2-kubeadm-join", "dev-worker-3-kubeadm-join", "dev-worker-3-domain"} <= added
    assert all(name.startswith(("dev-worker-2", "dev-worker-3")) for name in added)
    before, after = inputs(dev_again), inputs(scaled)
    changed = {urn.rsplit("::", 1)[1] for urn in before if before[urn] != after.get(urn)}
    # Only the kubelet serving approvers, which carry the planned nodes whose certificates they let through, and
    # wait for the new kubelets' (components/csr_approval.py).
    assert changed == {f"dev-cp-{n}-kubelet-serving-approver" for n in (1, 2, 3)} | {"dev-cp-1-kubelet-serving-approve"}


def test_new_workers_refresh_the_bootstrap_token_first(dev_again: Evaluation) -> None:
    scaled = run("dev", previous=dev_again, workers={"replicas": 2})
    token = scaled.named("dev-worker-2-join-token")
    join = scaled.named("dev-worker-2-kubeadm-join")
    assert token.inputs["connection"]["host"] == "10.17.3.31"  # on a control plane, which holds admin.conf
    assert scaled.depends_on(join, token)
    assert "stdin" in token.secret_inputs
    init, cluster = yaml.safe_load_all(bundle(token)["/etc/kubernetes/kubeadm-ha/bootstrap-token.yaml"])
    assert init["kind"] == "InitConfiguration"
    assert init["bootstrapTokens"][0]["ttl"] == "24h0m0s"
    # kubeadm would otherwise resolve `stable-1` online to fill in a version it does not need.
    assert cluster == {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": "v" + stack_config("dev")["kubeadm-ha:kubernetes"]["version"],
    }
    assert "kubeadm token create" in script_of(token).replace("'", "")


def test_workers_down_tears_down_before_the_vm_goes(dev_again: Evaluation) -> None:
    three = run("dev", previous=dev_again, workers={"replicas": 3})
    one = run("dev", previous=three, workers={"replicas": 1})
    removed = names(three) - names(one)
    assert removed and all(name.startswith(("dev-worker-2", "dev-worker-3")) for name in removed)
    for worker in ("dev-worker-2", "dev-worker-3"):
        membership = three.named(f"{worker}-membership")
        join = three.named(f"{worker}-kubeadm-join")
        reset = three.named(f"{worker}-reset")
        token = three.named(f"{worker}-join-token")
        drain = script_of(membership, "delete")
        assert " drain " in drain and "--ignore-daemonsets" in drain and "--delete-emptydir-data" in drain
        assert " delete node " not in drain
        assert "kubeadm reset --force" in script_of(reset, "delete").replace("'", "")
        assert " delete node " in script_of(token, "delete").replace("'", "")
        # Deletes run in reverse dependency order: drain, then reset (kubelet stops), then the Node object
        # (a running kubelet would re-register it), then the VM.
        assert three.depends_on(membership, join)
        assert three.depends_on(join, reset)
        assert three.depends_on(reset, token)
        assert three.depends_on(token, f"{worker}-domain")
        # Removals of several workers do not wait for each other.
        other = "dev-worker-3" if worker == "dev-worker-2" else "dev-worker-2"
        assert not three.depends_on(membership, f"{other}-membership")


def test_control_planes_join_and_leave_one_at_a_time(dev_again: Evaluation) -> None:
    five = run("dev", previous=dev_again, controlPlane={"replicas": 5})
    for index in (2, 3, 4, 5):
        join = five.named(f"dev-cp-{index}-kubeadm-join")
        assert five.depends_on(join, f"dev-cp-{index - 1}-membership") or index == 2
        assert five.depends_on(f"dev-cp-{index}-membership", join)
    # Removing 5 and 4: cp-5 is gone (drain, reset) before anything of cp-4 starts going.
    assert five.depends_on("dev-cp-5-kubeadm-join", "dev-cp-4-membership")
    haproxy = bundle(five.named("dev-lb-1-configure-lb"))["/etc/haproxy/haproxy.cfg"]
    assert haproxy.count("server dev-cp-") == 5 * 2  # the checked and the fail-open backend
    three = run("dev", previous=five, controlPlane={"replicas": 3})
    assert bundle(three.named("dev-lb-1-configure-lb"))["/etc/haproxy/haproxy.cfg"].count("server dev-cp-") == 3 * 2
    assert not any(name.startswith(("dev-cp-4", "dev-cp-5")) for name in names(three))


def test_every_node_step_is_replaced_with_its_vm(dev_again: Evaluation) -> None:
    ev = dev_again
    domains = {domain.inputs["name"]: domain for domain in ev.by_type(DOMAIN)}
    for domain in domains.values():
        assert domain.delete_before_replace  # same name on the hypervisor: the old one must go first
    for volume in [
        *ev.by_type("libvirt:index/volume:Volume"),
        *ev.by_type("libvirt:index/cloudInitDisk:CloudInitDisk"),
    ]:
        if not volume.name.endswith("-base-image"):
            assert volume.delete_before_replace, volume.name  # a rebuild replaces these; pool names are fixed
    for step in ev.by_type(COMMAND):
        node = next(host for host in sorted(domains, key=len, reverse=True) if step.name.startswith(host + "-"))
        assert domains[node].urn in step.dependencies, step.name
        assert step.inputs.get("triggers"), f"{step.name} must be replaced when {node}'s VM is"
        if step.inputs.get("delete"):
            assert step.delete_before_replace, step.name


def test_destroy_never_drains(dev_again: Evaluation) -> None:
    steps = [*dev_again.by_type(COMMAND), *dev_again.by_type("command:local:Command")]
    teardown = [step for step in steps if step.inputs.get("delete")]
    assert {step.name.rsplit("-", 1)[-1] for step in teardown} >= {"membership", "reset", "token", "removal"}
    for step in teardown:
        # Deleted together with the cluster network, these deletes are skipped: nothing drains a dying cluster.
        assert step.deleted_with == network(dev_again).urn, step.name


def test_first_control_plane_joins_when_the_cluster_exists(dev: Evaluation) -> None:
    step = dev.named("dev-cp-1-kubeadm-init")
    documents = {path.rsplit("/", 1)[1]: yaml.safe_load_all(text) for path, text in bundle(step).items()}
    kinds = {name: [doc["kind"] for doc in docs] for name, docs in documents.items()}
    assert kinds == {
        "init.yaml": ["InitConfiguration", "ClusterConfiguration", "KubeletConfiguration"],
        "join.yaml": ["JoinConfiguration"],
        # The audit policy and the Secrets' encryption the API server's flags name, there before kubeadm
        # starts it (render/hardening.py, render/encryption.py).
        "policy.yaml": ["Policy"],
        "config.yaml": ["EncryptionConfiguration"],
    }
    script = script_of(step)
    # A replacement of the first control plane finds the cluster answering and joins it; init only ever
    # runs when no control plane answers, and never while a peer's etcd holds a cluster.
    assert script.index("kubeadm join") < script.index("kubeadm init")
    assert "refusing to run kubeadm init" in script
    # Its token is refreshed from another control plane whenever its VM is new.
    token = dev.named("dev-cp-1-join-token")
    assert token.inputs["connection"]["host"] == "10.17.3.32"
    assert dev.depends_on(token, "dev-cp-2-kubeadm-join")
    assert dev.named("dev-cp-1-domain").urn in token.dependencies


def upgrade_steps(ev: Evaluation) -> list[Registration]:
    return [step for step in ev.by_type(COMMAND) if "-upgrade-" in step.name]


def test_no_upgrade_steps_without_a_version_change(dev_again: Evaluation) -> None:
    assert upgrade_steps(dev_again) == []


def test_upgrade_runs_in_kubeadms_order_with_worker_batches() -> None:
    older = {"version": OLDER_PATCH}
    five = run("dev", previous=run("dev", kubernetes=older), kubernetes=older, workers={"replicas": 5})
    upgraded = run("dev", previous=five, kubernetes={"version": TARGET}, workers={"replicas": 5, "maxUnavailable": 2})
    steps = {step.name: step for step in upgrade_steps(upgraded)}
    assert f"upgrade apply v{TARGET}" in script_of(steps[f"dev-cp-1-upgrade-{TARGET}"]).replace("'", "")
    for index in (2, 3):
        step = steps[f"dev-cp-{index}-upgrade-{TARGET}"]
        assert "upgrade node" in script_of(step).replace("'", "")
        assert upgraded.depends_on(step, f"dev-cp-{index - 1}-upgrade-{TARGET}")
    batches = [[1, 2], [3, 4], [5]]
    previous_batch = [f"dev-cp-3-upgrade-{TARGET}"]
    for batch in batches:
        for index in batch:
            worker = f"dev-worker-{index}"
            drain, upgrade, uncordon = (
                steps[f"{worker}-upgrade-drain-{TARGET}"],
                steps[f"{worker}-upgrade-{TARGET}"],
                steps[f"{worker}-upgrade-uncordon-{TARGET}"],
            )
            assert all(upgraded.depends_on(drain, before) for before in previous_batch)
            assert upgraded.depends_on(upgrade, drain) and upgraded.depends_on(uncordon, upgrade)
            for other in batch:
                if other != index:
                    assert not upgraded.depends_on(drain, f"dev-worker-{other}-upgrade-uncordon-{TARGET}")
        previous_batch = [f"dev-worker-{index}-upgrade-uncordon-{TARGET}" for index in batch]
    # Nothing else is touched by an upgrade. The seed disks carry the new version for nodes built later, but
    # ignore changes to their documents (no VM is rebuilt); the first control plane's bootstrap documents name
    # the version too, and its guard (kubelet.conf exists) makes the re-run a no-op; so do the token documents
    # (kubeadm needs a version), whose steps' guard sees the token fresh.
    before, after = inputs(five), inputs(upgraded)
    changed = {urn.rsplit("::", 1)[1] for urn in before if urn in after and before[urn] != after[urn]}
    disks = {name for name in changed if name.endswith("-cloud-init")}
    tokens = {name for name in changed if name.endswith("-join-token")}
    # The settings steps' documents name the version too; they run after the whole upgrade, when kubeadm has
    # already rendered the manifests they would, so they restart nothing.
    settings = {name for name in changed if name.endswith("-control-plane-config")}
    # Every node's file modes are checked again after the upgrade: the new packages and `kubeadm upgrade node`
    # write the kubelet's files 0644 again.
    files = {name for name in changed if name.endswith("-node-files")}
    nodes = upgraded.outputs["nodes"].value
    assert files == {f"{name}-node-files" for name, node in nodes.items() if node["role"] != "lb"}
    assert changed - disks - tokens - settings - files == {"dev-cp-1-kubeadm-init"}, changed
    for name in settings | files:
        assert upgraded.depends_on(upgraded.named(name), f"dev-worker-1-upgrade-uncordon-{TARGET}"), name
    for disk in upgraded.by_type("libvirt:index/cloudInitDisk:CloudInitDisk"):
        assert {"userData", "metaData", "networkConfig"} <= set(disk.ignore_changes)
    assert "[ -f /etc/kubernetes/kubelet.conf ]" in script_of(upgraded.named("dev-cp-1-kubeadm-init"))


def test_upgrade_and_scaling_in_one_run_is_refused(dev_again: Evaluation) -> None:
    with pytest.raises(ConfigError) as caught:
        older = {"version": OLDER_PATCH}
        run("dev", previous=run("dev", kubernetes=older), kubernetes={"version": TARGET}, workers={"replicas": 3})
    assert "one change at a time" in str(caught.value)
