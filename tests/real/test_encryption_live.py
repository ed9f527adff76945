"""Secrets encrypted at rest on a running cluster, for real (issue 20): enabling, rotation, an interrupted phase and
an etcd restore of a snapshot from before the rotation, in the stacked control-plane lab (tests/real/stacked_lab.py).

The lab is staging as a program from before encryption at rest set it up: its kubeadm bundles without the
EncryptionConfiguration and without the API server flag that names it (tests/real/encryption.py,
`before_issue_20`), so every Secret is stored in clear. Then the program's own steps run, scripts and stdin bundles
unmodified from the evaluated program, in the program's order, on each control plane (tests/real/node_steps.py: as
root, in the node's namespaces, with the real kubeadm and kubectl):

1. the enabling run (the stack's outputs lacking `secretsEncryption`): encryption-add on each, control-plane-config
   on each (the flag, so the API servers restart), encryption-promote on each, encryption-rewrite on the first,
   encryption-drop on each. cp-2's promote is killed (SIGKILL of its process group) right after it held its API
   server's manifest, and run again: it finishes the restart, and a third run is "already done";
2. an etcd snapshot with the backup timer's own script, copied by tools.etcd_backup;
3. the rotation run (`encryption.rotation: 1`): add, control-plane-config (nothing to restart), promote, rewrite,
   drop; a second run of every step is "already done";
4. tools.etcd_restore of the snapshot from step 2 with the rotation run's outputs (`secretsEncryption` key-1, the
   secret `secretsEncryptionKeys` key-0 and key-1).

Throughout 1 and 3, four clients read the Secrets through the VIP (tests/real/vip_client.py: bounded
requests, retried as client-go retries); none may fail. After every step each API server, asked directly, lists
every Secret of the cluster and reads the test's values: none ever meets a Secret it cannot decrypt. etcd is read
with the real etcdctl: before, Secrets are protobuf in clear; after each run every Secret carries
`k8s:enc:secretbox:v1:key-N:`. Stand-ins, where the real thing cannot run in the lab: kubelet
(tests/real/kubelet.py: stops a static pod when its manifest leaves /etc/kubernetes/manifests, starts it from the
manifest when it is back) and crictl (the processes in the node's network namespace). No key is ever printed: the
node's file is read for its header line, keys are only compared, and a failure report (which shows every
argument's repr) shows none (`Concealed`, and StackAccess leaves its secrets out of its repr).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from render.backup import BackupPolicy, backup_script
from render.encryption import CONFIG_PATH, HELD_DIR, PENDING_DIR
from render.scripts import LOG_DIR
from tests.integration.netns import poll_until
from tests.real.control_plane_lab import APISERVER_BOUND, ControlPlaneLab, report
from tests.real.encryption import (
    Concealed,
    ProgramRuns,
    apiserver_has_flag,
    before_issue_20,
    create_secret,
    file_entries,
    holds_key,
    keys_in_etcd,
    phase_steps,
    program_runs,
    read_secret,
    run_program_step,
    secret_reads,
    stored_secrets,
)
from tests.real.kubelet import STOP_GRACE, Kubelet
from tests.real.node_steps import kill_group, start_node_step
from tests.real.restore import Kubectl, RestoreLab
from tests.real.stacked_lab import STACK, stacked_lab
from tests.real.vip_client import VipClient
from tools.etcd_backup import backup
from tools.etcd_restore import restore
from tools.plan import mask, script_of

pytestmark = pytest.mark.real

BEFORE = tuple(f"kubeadm-ha-enc-{index}" for index in range(4))
AFTER_SNAPSHOT = "kubeadm-ha-enc-after-snapshot"
INTERRUPTED = "staging-cp-2-encryption-promote"
INTERRUPT_BOUND = 240.0
HELD = f"{HELD_DIR}/kube-apiserver.yaml"
PENDING = f"{PENDING_DIR}/kube-apiserver"


@dataclass
class EncryptionLab:
    lab: ControlPlaneLab
    runs: ProgramRuns = field(repr=False)
    tools: RestoreLab  # the operator tools' transport, with the enabling run's outputs
    kubelet: Kubelet
    kubectl: Kubectl
    control_planes: list[str]
    values: dict[str, str] = field(default_factory=dict)  # Secret name -> its value
    snapshot: Path | None = None


@pytest.fixture(scope="module")
def enc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EncryptionLab]:
    runs = program_runs(STACK)
    with stacked_lab(request, tmp_path_factory, "enc", evaluation=runs.enabling, bundle_filter=before_issue_20) as lab:
        tools = RestoreLab(lab)
        kubelet = tools.kubelet()
        with kubelet:
            yield EncryptionLab(lab, runs, tools, kubelet, Kubectl(lab), [p.hostname for p in lab.plan.control_planes])
        assert kubelet.error is None, f"the kubelet stand-in failed: {kubelet.error!r}"


def run_steps(enc: EncryptionLab, run: str, steps: list[str], *, interrupt: str = "") -> dict[str, str]:
    """Each step of `run` in turn; what happened per step ("already done" or the kubelet stand-in's events).
    After each, every API server on its own lists every Secret of the cluster: none meets one it cannot read."""
    evaluation = getattr(enc.runs, run)
    happened: dict[str, str] = {}
    for step in steps:
        enc.kubelet.events.clear()
        if step == interrupt:
            interrupt_then_finish(enc, run, step)
            ran, took = run_program_step(enc.lab, evaluation, step)  # the third run
            assert ran.returncode == 0 and "already done" in ran.stdout, ran.output
            happened[step] = "interrupted, re-run finished it, third run already done"
        else:
            ran, took = run_program_step(enc.lab, evaluation, step)
            assert ran.returncode == 0, ran.output
            happened[step] = "already done" if "already done" in ran.stdout else ", ".join(enc.kubelet.events) or "ran"
            report(f"{run}: {step} {took:.1f}s: {happened[step]}")
        each_api_server_reads_every_secret(enc)
    return happened


def each_api_server_reads_every_secret(enc: EncryptionLab) -> None:
    for name in enc.control_planes:
        listed = enc.lab.request("GET", "/api/v1/secrets", host=enc.lab.nodes[name].address, timeout=10)
        assert listed.status == 200, f"{name} could not list the Secrets: HTTP {listed.status} {listed.body[:300]}"
        items = {item["metadata"]["name"]: item.get("data", {}) for item in listed.json()["items"]}
        for secret, value in enc.values.items():
            assert base64.b64decode(items[secret]["value"]).decode() == value, f"{name} read {secret} wrong"


def interrupt_then_finish(enc: EncryptionLab, run: str, step: str) -> None:
    """Kill `step` right after it held its API server's manifest; the re-run must finish the restart."""
    lab, kubelet = enc.lab, enc.kubelet
    evaluation = getattr(enc.runs, run)
    registration = evaluation.named(step)
    node = lab.nodes[step.removesuffix("-encryption-promote")]
    before = node.processes["kube-apiserver"].pid
    log = lab.work / f"{step}-interrupted.out"
    first = start_node_step(lab, node, script_of(registration), log, name="encryption-promote",
                            stdin=registration.inputs["stdin"])  # fmt: skip
    try:
        poll_until(lambda: node.root.exists(HELD) or first.poll() is not None, timeout=INTERRUPT_BOUND,
                   interval=0.05, message=f"{step} to hold kube-apiserver's manifest")  # fmt: skip
    finally:
        kill_group(first)
    assert node.root.exists(HELD), f"{step} ended before holding kube-apiserver:\n{mask(log.read_text())}"
    poll_until(lambda: f"stopped kube-apiserver on {node.name}" in kubelet.events, timeout=STOP_GRACE + 15,
               interval=0.2, message="the kubelet stand-in to stop the held kube-apiserver")  # fmt: skip
    assert not node.processes["kube-apiserver"].alive()
    report(f"{step} killed with kube-apiserver held on {node.name}; its API server stopped")

    output_log = node.root.path(f"{LOG_DIR}/encryption-promote.output.log")  # the step's own output (given secrets)
    offset = output_log.stat().st_size
    again, took = run_program_step(lab, evaluation, step)
    assert again.returncode == 0, again.output
    assert "already done" not in again.stdout, f"the re-run said done with kube-apiserver held:\n{again.output}"
    assert not node.root.exists(HELD) and not node.root.exists(PENDING)
    assert node.processes["kube-apiserver"].alive() and node.processes["kube-apiserver"].pid != before
    assert lab.apiserver_ready(node.name)
    assert {lab.backend_states(lb).get(node.name) for lb in lab.load_balancer_names()} == {"UP"}
    with output_log.open() as said:
        said.seek(offset)
        assert "kube-apiserver restarted with the new encryption configuration" in said.read()
    report(f"{step} re-run: {took:.1f}s, kube-apiserver back (pid {before} -> {node.processes['kube-apiserver'].pid})"
           f", held manifest and marker gone; kubelet stand-in: {', '.join(kubelet.events)}")  # fmt: skip


def every_secret_with(enc: EncryptionLab, key: str) -> None:
    found = keys_in_etcd(enc.lab)
    assert found and set(found.values()) == {key}, {name: used for name, used in found.items() if used != key}
    stored = stored_secrets(enc.lab)
    for name, value in enc.values.items():
        raw = stored.get(f"/registry/secrets/default/{name}")
        if raw is not None:
            assert value.encode() not in raw, f"{name}'s value is in clear in etcd"
    report(f"etcd: all {len(found)} Secrets written with {key}")


def test_enabling_encryption_on_a_running_cluster(enc: EncryptionLab) -> None:
    lab = enc.lab
    for name in enc.control_planes:
        assert file_entries(lab.nodes[name]) is None and not apiserver_has_flag(lab.nodes[name]), name
    for name in BEFORE:
        enc.values[name] = create_secret(enc.kubectl, name)
    stored = stored_secrets(lab)
    assert set(keys_in_etcd(lab).values()) == {"identity"}
    for name, value in enc.values.items():
        raw = stored[f"/registry/secrets/default/{name}"]
        assert value.encode() in raw  # in clear: what this run ends
    report(f"before: {len(stored)} Secrets in clear in etcd; no EncryptionConfiguration, no flag")

    steps = phase_steps(enc.runs.enabling, enc.control_planes)
    started = time.monotonic()
    with VipClient(lab, reads=secret_reads(enc.values)) as client:
        time.sleep(2)
        happened = run_steps(enc, "enabling", steps, interrupt=INTERRUPTED)
    took = time.monotonic() - started
    report(f"enabling run: {took:.1f}s; VIP client: {client.requests} requests, {len(client.failures)} failed, "
           f"{client.retried} retried" + (f"; failures: {client.failures[:5]}" if client.failures else ""))  # fmt: skip
    assert client.requests >= 100 and client.failures == []
    for name in enc.control_planes:
        # The add restarted nothing (no flag yet); the settings step gave the flag, restarting the API server.
        assert happened[f"{name}-encryption-add"] == "ran", happened
        assert f"started kube-apiserver on {name}" in happened[f"{name}-control-plane-config"], happened
        assert file_entries(lab.nodes[name]) == ["key-0", "identity"] and apiserver_has_flag(lab.nodes[name])
    every_secret_with(enc, "key-0")
    for name, value in enc.values.items():
        assert read_secret(enc.kubectl, name) == value


def test_rotation_moves_every_secret_to_the_next_key(
    enc: EncryptionLab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lab, tools = enc.lab, enc.tools
    # A snapshot from before the rotation: the backup timer's own script on the first member, copied by the tool.
    first = tools.access.nodes[enc.control_planes[0]]
    policy = BackupPolicy(lab.config.etcd.backup.interval_minutes, lab.config.etcd.backup.keep)
    taken = tools.transport.run(first, backup_script(first.hostname, policy), timeout=300)
    assert taken.returncode == 0, mask(taken.stderr.decode())
    enc.snapshot = backup(tools.access, tools.transport, tmp_path_factory.mktemp("snapshot"), now=False,
                          etcdutl=tools.etcdutl)  # fmt: skip
    report(f"snapshot before the rotation: {enc.snapshot.name} ({enc.snapshot.stat().st_size} bytes)")
    create_secret(enc.kubectl, AFTER_SNAPSHOT)

    steps = phase_steps(enc.runs.rotation, enc.control_planes)
    started = time.monotonic()
    with VipClient(lab, reads=secret_reads(enc.values)) as client:
        time.sleep(2)
        happened = run_steps(enc, "rotation", steps)
    took = time.monotonic() - started
    report(f"rotation: {took:.1f}s for {len(steps)} steps; VIP client: {client.requests} requests, "
           f"{len(client.failures)} failed, {client.retried} retried"
           + (f"; failures: {client.failures[:5]}" if client.failures else ""))  # fmt: skip
    assert client.requests >= 100 and client.failures == []
    for name in enc.control_planes:
        assert happened[f"{name}-control-plane-config"] == "already done", happened
        for phase in ("add", "promote", "drop"):
            assert f"started kube-apiserver on {name}" in happened[f"{name}-encryption-{phase}"], happened
    every_secret_with(enc, "key-1")
    old = Concealed(enc.runs.rotation.outputs["secretsEncryptionKeys"].value["key-0"])
    for name in enc.control_planes:
        node = lab.nodes[name]
        assert file_entries(node) == ["key-1", "identity"], name
        assert not holds_key(node, "key-0", old), f"{name}: the retired key-0 is still in {CONFIG_PATH}"

    # A second run of every step finds it done and restarts nothing.
    enc.kubelet.events.clear()
    for step in steps:
        ran, _ = run_program_step(lab, enc.runs.rotation, step)
        assert ran.returncode == 0 and "already done" in ran.stdout, ran.output
    assert enc.kubelet.events == []
    report(f"second run: all {len(steps)} steps already done, nothing restarted")


def test_restore_of_a_snapshot_from_before_the_rotation(enc: EncryptionLab, capsys: pytest.CaptureFixture[str]) -> None:
    assert enc.snapshot is not None, "the rotation test took no snapshot"
    lab = enc.lab
    live = RestoreLab(lab, outputs=enc.runs.rotation)
    assert live.access.encryption_key == "key-1" and set(live.access.encryption_keys) == {"key-0", "key-1"}
    enc.kubelet.timeline.clear()
    started = time.monotonic()
    timings = restore(live.access, live.transport, enc.snapshot, force=True, restore_id="20260101T000000Z")
    took = time.monotonic() - started
    said = capsys.readouterr().out
    print(said)
    # The snapshot's Secrets were written with key-0, which the control planes had dropped: each read both keys
    # while the Secrets were re-written, then got the final file back, its API server restarted.
    assert said.count("older keys dropped, API server restarted") == len(enc.control_planes), said
    stops = enc.kubelet.stop_seconds()
    report("kubelet stand-in stops: " + ", ".join(f"{what} {seconds:.1f}s" for what, seconds in stops.items()))
    report("restore: " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in timings.items()) + f"; {took:.1f}s")

    poll_until(lambda: lab.request("GET", "/readyz", admin=False, timeout=3).status == 200, timeout=APISERVER_BOUND,
               interval=1, message="the API through the VIP after the restore")  # fmt: skip
    for name in enc.control_planes:
        lab.wait_apiserver_ready(name, timeout=APISERVER_BOUND)
    for name, value in enc.values.items():
        assert read_secret(enc.kubectl, name) == value, name
    assert read_secret(enc.kubectl, AFTER_SNAPSHOT) is None
    every_secret_with(enc, "key-1")
    old = Concealed(enc.runs.rotation.outputs["secretsEncryptionKeys"].value["key-0"])
    for name in enc.control_planes:
        assert file_entries(lab.nodes[name]) == ["key-1", "identity"], name
        assert not holds_key(lab.nodes[name], "key-0", old), name
