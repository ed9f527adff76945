"""Secrets encrypted at rest through `pulumi up` (components/encryption.py, render/encryption.py): what each
step of a new cluster, an enabling run on a running one, and a rotation carries, in which order, and that the
run after each changes nothing. Whether kube-apiserver reads the files, and what etcd then holds, is proven
in the control-plane lab."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
import yaml

from model.rules import ConfigError
from render.encryption import CONFIG_PATH, HEADER
from tests.program.test_day2 import bundle, deployed, inputs, run
from tools.offline import Evaluation

CONTROL_PLANES = ("dev-cp-1", "dev-cp-2", "dev-cp-3")
PHASES = ("add", "promote", "drop")


def entries_of(text: str) -> list[str]:
    first = text.splitlines()[0]
    assert first.startswith(HEADER), first
    return first.removeprefix(HEADER).split()


def file_of(ev: Evaluation, step: str) -> str:
    return bundle(ev.named(step))[CONFIG_PATH]


def providers(text: str) -> list[Any]:
    return yaml.safe_load(text)["resources"][0]["providers"]


def keys_in(text: str) -> dict[str, str]:
    return {key["name"]: key["secret"] for p in providers(text) if "secretbox" in p for key in p["secretbox"]["keys"]}


def without_encryption_record(ev: Evaluation) -> dict[str, Any]:
    """The outputs of a cluster deployed by a program from before encryption at rest."""
    outputs = deployed(ev)
    del outputs["secretsEncryption"]
    return outputs


@pytest.fixture(scope="module")
def new() -> Evaluation:
    return run("dev")


@pytest.fixture(scope="module")
def rotated(new: Evaluation) -> Evaluation:
    return run("dev", previous=new, encryption={"rotation": 1})


def test_a_new_cluster_starts_on_its_first_key_with_identity_behind(new: Evaluation) -> None:
    files = [file_of(new, "dev-cp-1-kubeadm-init"), *(file_of(new, f"{cp}-kubeadm-join") for cp in CONTROL_PLANES[1:])]
    assert all(text == files[0] for text in files)
    assert entries_of(files[0]) == ["key-0", "identity"]
    assert list(providers(files[0])[0]) == ["secretbox"] and providers(files[0])[1] == {"identity": {}}
    (secret,) = keys_in(files[0]).values()
    assert len(base64.b64decode(secret)) == 32
    # The key is in the secret stdin only: nowhere in any public input.
    for resource in new.resources:
        visible = json.dumps({k: v for k, v in resource.inputs.items() if k not in resource.secret_inputs})
        assert secret not in visible, resource.name
    # Every phase is already where the new cluster is: each step's file is the final one.
    for cp in CONTROL_PLANES:
        for phase in PHASES:
            assert entries_of(file_of(new, f"{cp}-encryption-{phase}")) == ["key-0", "identity"]
    assert new.outputs["secretsEncryption"].value == {
        "provider": "secretbox",
        "generation": 0,
        "key": "key-0",
        "from": "key-0",
    }


def test_the_api_server_reads_the_file_from_its_own_volume(new: Evaluation) -> None:
    documents = list(
        yaml.safe_load_all(bundle(new.named("dev-cp-1-kubeadm-init"))["/etc/kubernetes/kubeadm-ha/init.yaml"])
    )
    cluster = next(doc for doc in documents if doc["kind"] == "ClusterConfiguration")
    assert {"name": "encryption-provider-config", "value": CONFIG_PATH} in cluster["apiServer"]["extraArgs"]
    (volume,) = [v for v in cluster["apiServer"]["extraVolumes"] if v["name"] == "encryption-config"]
    assert volume["readOnly"] is True and CONFIG_PATH.startswith(volume["mountPath"] + "/")


def test_the_phases_run_in_order_one_control_plane_at_a_time(new: Evaluation) -> None:
    chain = [
        *(f"{cp}-encryption-add" for cp in CONTROL_PLANES),
        *(f"{cp}-control-plane-config" for cp in CONTROL_PLANES),
        *(f"{cp}-encryption-promote" for cp in CONTROL_PLANES),
        "dev-cp-1-encryption-rewrite",
        *(f"{cp}-encryption-drop" for cp in CONTROL_PLANES),
        *(f"{cp}-certificates" for cp in CONTROL_PLANES),
    ]
    for earlier, later in itertools.pairwise(chain):
        assert new.depends_on(new.named(later), earlier), (later, earlier)


def test_enabling_on_a_running_cluster_moves_from_identity_in_phases(new: Evaluation) -> None:
    enabling = run_with_outputs(without_encryption_record(new))
    expected = {"add": ["identity", "key-0"], "promote": ["key-0", "identity"], "drop": ["key-0", "identity"]}
    for cp in CONTROL_PLANES:
        for phase, order in expected.items():
            assert entries_of(file_of(enabling, f"{cp}-encryption-{phase}")) == order, (cp, phase)
    assert enabling.outputs["secretsEncryption"].value["from"] == "identity"
    # The run after it changes nothing.
    after = run_with_outputs(deployed(enabling))
    assert inputs(after) == inputs(enabling)


def test_a_rotation_adds_promotes_rewrites_and_drops(new: Evaluation, rotated: Evaluation) -> None:
    expected = {
        "add": ["key-0", "key-1", "identity"],
        "promote": ["key-1", "key-0", "identity"],
        "drop": ["key-1", "identity"],
    }
    old_key = keys_in(file_of(new, "dev-cp-1-encryption-drop"))["key-0"]
    for cp in CONTROL_PLANES:
        for phase, order in expected.items():
            text = file_of(rotated, f"{cp}-encryption-{phase}")
            assert entries_of(text) == order, (cp, phase)
            # The old key is the one the cluster runs (kept in the state), the new one is another.
            if "key-0" in order:
                assert keys_in(text)["key-0"] == old_key
            assert keys_in(text)["key-1"] != old_key
    assert "key-1" in rotated.named("dev-cp-1-encryption-rewrite").inputs["create"]
    assert rotated.outputs["secretsEncryption"].value == {
        "provider": "secretbox",
        "generation": 1,
        "key": "key-1",
        "from": "key-0",
    }


def test_the_run_after_a_rotation_changes_nothing(rotated: Evaluation) -> None:
    again = run("dev", previous=rotated, encryption={"rotation": 1})
    assert inputs(again) == inputs(rotated)


def test_control_planes_are_not_added_while_secrets_move(new: Evaluation) -> None:
    with pytest.raises(ConfigError, match=r"encryption\.rotation: moving Secrets from key generation 0 .*dev-cp-4"):
        run_with_outputs(deployed(new), encryption={"rotation": 1}, controlPlane={"replicas": 5})
    with pytest.raises(ConfigError, match=r"encryption\.rotation: moving Secrets from no encryption"):
        run_with_outputs(without_encryption_record(new), controlPlane={"replicas": 5})
    # Workers are not control planes: they may join in the same run.
    run_with_outputs(deployed(new), encryption={"rotation": 1}, workers={"replicas": 3})


def test_rotation_never_goes_back(rotated: Evaluation) -> None:
    with pytest.raises(ConfigError, match=r"encryption\.rotation: .*generation 1"):
        run("dev", previous=rotated, encryption={"rotation": 0})


def run_with_outputs(outputs: dict[str, Any], **overrides: Any) -> Evaluation:
    from tests.program.test_day2 import stack_config
    from tests.stacks import REPO_ROOT
    from tools.offline import evaluate

    return evaluate("dev", project_dir=REPO_ROOT, config=stack_config("dev", **overrides), previous_outputs=outputs)
