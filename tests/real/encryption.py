"""Secrets encrypted at rest in the real control-plane lab (issue 20): what tests/real/test_encryption_live.py and
tests/real/test_stacked_control_plane_live.py share.

* `program_runs`: the stack evaluated as `pulumi up` would run it after a cluster set up by a program from before
  encryption at rest (its outputs lack `secretsEncryption`: the enabling run), and again with
  `encryption.rotation: 1` after that (the rotation run);
* `before_issue_20`: the lab's bundle filter for such a cluster (no EncryptionConfiguration, no flag naming it);
* `phase_steps` and `run_program_step`: the enabling or rotation run's own steps, in the program's order, their
  scripts and stdin bundles taken unmodified from the evaluation;
* what etcd holds (`stored_secrets`, the real etcdctl) and what a node's file says (`file_entries`, its header
  line only). Nothing here prints a key: the files are read for their first line, and a key is only ever
  compared, never shown.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from model.previous import SECRETS_ENCRYPTION_KEYS_OUTPUT, SECRETS_ENCRYPTION_OUTPUT
from render.encryption import CONFIG_DIR_ON_NODE, CONFIG_PATH, FLAG, HEADER
from render.kubeadm import INIT_CONFIG_PATH
from tests.real.control_plane_lab import MANIFESTS, ControlPlaneLab, Node
from tests.real.node_root import Ran
from tests.real.node_steps import run_node_step
from tests.real.restore import Kubectl
from tests.stacks import REPO_ROOT
from tools.offline import Evaluation, evaluate, load_stack_config
from tools.plan import script_of

SECRETS_PREFIX = "/registry/secrets/"
ENCRYPTED = "k8s:enc:secretbox:v1:"
# How the API server stores an object it does not encrypt: its protobuf envelope.
IN_CLEAR = b"k8s\x00"


@dataclass(frozen=True)
class ProgramRuns:
    enabling: Evaluation  # after a cluster from before encryption at rest
    rotation: Evaluation  # encryption.rotation: 1, after the enabling run


def outputs_of(evaluation: Evaluation) -> dict[str, Any]:
    """What the engine hands the next run as this run's outputs."""
    return {name: output.value for name, output in evaluation.outputs.items()}


def _config(stack: str, rotation: int | None = None) -> dict[str, Any]:
    config = dict(load_stack_config(REPO_ROOT, stack))
    config.pop("kubeadm-ha:promotion", None)  # a lab run, not a release to promote
    if rotation is not None:
        config["kubeadm-ha:encryption"] = {"rotation": rotation}
    return config


def program_runs(stack: str) -> ProgramRuns:
    deployed = outputs_of(evaluate(stack, project_dir=REPO_ROOT, config=_config(stack)))
    # A deployment by a program from before issue 20 recorded neither output.
    older = {k: v for k, v in deployed.items() if k not in (SECRETS_ENCRYPTION_OUTPUT, SECRETS_ENCRYPTION_KEYS_OUTPUT)}
    enabling = evaluate(stack, project_dir=REPO_ROOT, config=_config(stack), previous_outputs=older)
    rotation = evaluate(stack, project_dir=REPO_ROOT, config=_config(stack, 1), previous_outputs=outputs_of(enabling))
    return ProgramRuns(enabling, rotation)


def before_issue_20(files: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """A kubeadm init/join bundle as a program from before encryption at rest sent it: no EncryptionConfiguration,
    and a ClusterConfiguration without the API server flag that names it or the volume that mounts it."""
    kept = {path: file for path, file in files.items() if path != CONFIG_PATH}
    if INIT_CONFIG_PATH in kept:
        mode, text = kept[INIT_CONFIG_PATH]
        documents = list(yaml.safe_load_all(text))
        (cluster,) = [doc for doc in documents if doc.get("kind") == "ClusterConfiguration"]
        api = cluster["apiServer"]
        args = [arg for arg in api["extraArgs"] if arg["name"] != FLAG]
        volumes = [volume for volume in api["extraVolumes"] if volume["hostPath"] != CONFIG_DIR_ON_NODE]
        assert len(args) == len(api["extraArgs"]) - 1 and len(volumes) == len(api["extraVolumes"]) - 1
        api["extraArgs"], api["extraVolumes"] = args, volumes
        kept[INIT_CONFIG_PATH] = (mode, yaml.safe_dump_all(documents, sort_keys=False))
    return kept


def phase_steps(evaluation: Evaluation, control_planes: list[str]) -> list[str]:
    """The steps of encryption's phases and the settings chain, in the order the program runs them (checked
    against the evaluation's dependencies)."""
    names = [
        *(f"{host}-encryption-add" for host in control_planes),
        *(f"{host}-control-plane-config" for host in control_planes),
        *(f"{host}-encryption-promote" for host in control_planes),
        f"{control_planes[0]}-encryption-rewrite",
        *(f"{host}-encryption-drop" for host in control_planes),
    ]
    for earlier, later in itertools.pairwise(names):
        assert evaluation.depends_on(evaluation.named(later), earlier), f"{later} does not wait for {earlier}"
    return names


def run_program_step(lab: ControlPlaneLab, evaluation: Evaluation, step: str) -> tuple[Ran, float]:
    """The step's own script and stdin bundle from `evaluation`, on its node (tests/real/node_steps.py)."""
    registration = evaluation.named(step)
    host = next(name for name in lab.nodes if step.startswith(f"{name}-"))
    return run_node_step(
        lab, lab.nodes[host], script_of(registration), name=step.removeprefix(f"{host}-"),
        stdin=registration.inputs.get("stdin"),
    )  # fmt: skip


def stored_secrets(lab: ControlPlaneLab) -> dict[str, bytes]:
    """Every Secret as etcd holds it (key -> raw value), read with the real etcdctl on a member's node."""
    ran = lab.etcdctl("get", SECRETS_PREFIX, "--prefix", "-w", "json")
    assert ran.returncode == 0, ran.stderr
    kvs = json.loads(ran.stdout).get("kvs") or []
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]) for kv in kvs}


def written_with(raw: bytes) -> str:
    """The key a stored value was written with (`key-N`), or `identity` for one in clear."""
    if raw.startswith(ENCRYPTED.encode()):
        return raw[len(ENCRYPTED) :].split(b":", 1)[0].decode()
    assert raw.startswith(IN_CLEAR), f"neither encrypted nor protobuf: {raw[:12]!r}"
    return "identity"


def keys_in_etcd(lab: ControlPlaneLab) -> dict[str, str]:
    """Secret's etcd key -> the key it is written with."""
    return {key: written_with(raw) for key, raw in stored_secrets(lab).items()}


def file_entries(node: Node) -> list[str] | None:
    """The entries of the node's EncryptionConfiguration, from its header line (None: no file)."""
    if not node.root.exists(CONFIG_PATH):
        return None
    first = node.root.read(CONFIG_PATH).split("\n", 1)[0]
    assert first.startswith(HEADER), f"{node.name}: {CONFIG_PATH} has no `{HEADER}` line"
    return first.removeprefix(HEADER).split()


class Concealed(str):
    """A key the test compares but never shows: pytest's failure report prints each argument's and operand's repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<concealed>"


def holds_key(node: Node, name: str, secret_b64: Concealed) -> bool:
    """Whether the node's file names key `name` or holds its secret anywhere (never shown)."""
    text = node.root.read(CONFIG_PATH)
    return f"name: {name}" in text or secret_b64 in text


def apiserver_has_flag(node: Node) -> bool:
    return f"--{FLAG}={CONFIG_PATH}" in node.root.read(f"{MANIFESTS}/kube-apiserver.yaml")


def create_secret(kubectl: Kubectl, name: str) -> str:
    """A Secret in `default` with one key, `value`, created through the VIP; returns the value."""
    value = f"kubeadm-ha-plain-{name}"
    ran = kubectl("create", "secret", "generic", name, "-n", "default", f"--from-literal=value={value}")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return value


def read_secret(kubectl: Kubectl, name: str) -> str | None:
    """The Secret's `value` through the VIP; None when the API says it does not exist."""
    ran = kubectl("get", "secret", name, "-n", "default", "-o", "jsonpath={.data.value}")
    if ran.returncode != 0 and "NotFound" in ran.stderr:
        return None
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return base64.b64decode(ran.stdout).decode()


def secret_reads(values: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What a VipClient reads: each Secret, and the base64 value its answer must carry."""
    return tuple(
        (f"/api/v1/namespaces/default/secrets/{name}", f'"value":"{base64.b64encode(value.encode()).decode()}"')
        for name, value in values.items()
    )
