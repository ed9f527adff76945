"""The promotion gate in the real program (`__main__.py`) under Pulumi's mocks.

A stack `staging` promotes from `dev`; dev's outputs are what a `pulumi.StackReference` reads (the offline
runtime's `stack_outputs`). Every case runs as `pulumi up` and as `pulumi preview`: the engine reads stack
references in preview too, so the gate must decide the same way in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from components.promotion import SOURCE_REFERENCE, PromotionRefused
from model.release import PROGRAM_DIGEST_OUTPUT, RELEASE_OUTPUT, program_digest, release_of
from model.stack import config_from_stack_file, parse_config
from model.versions import RELEASES
from tools.offline import STACK_TYPE, UNKNOWN, Evaluation, evaluate, evaluation_of_failure

ROOT = Path(__file__).resolve().parents[2]
VERSION = RELEASES["1.37"].latest_patch
OLDER_PATCH = VERSION.rsplit(".", 1)[0] + "." + str(int(VERSION.rsplit(".", 1)[1]) - 1)
STACK_REFERENCE = "pulumi:pulumi:StackReference"
MODES = pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])

# The smallest cluster keeps each evaluation short; the gate does not care about the shape.
KEYS: dict[str, Any] = {
    "network": {"cidr": "10.17.9.0/24"},
    "kubernetes": {"version": VERSION, "cni": "calico"},
    "loadBalancer": {"replicas": 1},
    "controlPlane": {"replicas": 1},
    "workers": {"replicas": 0},
}


def staging_config(**promotion: Any) -> dict[str, Any]:
    keys = {**KEYS, "promotion": {"from": "dev", **promotion}}
    return {f"kubeadm-ha:{key}": value for key, value in keys.items()}


def dev_running(**release_changes: str) -> dict[str, Any]:
    """dev's outputs after a successful `pulumi up` of the same settings (and this program), changed as asked."""
    release = release_of(parse_config(KEYS, stack="dev"))
    digest = release_changes.pop(PROGRAM_DIGEST_OUTPUT, program_digest(ROOT))
    return {
        "apiEndpoint": "https://10.17.3.10:6443",
        "kubeconfig": "[secret]",
        RELEASE_OUTPUT: {**release, **release_changes},
        PROGRAM_DIGEST_OUTPUT: digest,
    }


def run_staging(dev: Any, *, preview: bool, **promotion: Any) -> Evaluation:
    return evaluate(
        "staging", project_dir=ROOT, config=staging_config(**promotion), preview=preview, stack_outputs={"dev": dev}
    )


def refused(dev: Any, *, preview: bool) -> tuple[str, Evaluation]:
    with pytest.raises(PromotionRefused) as caught:
        run_staging(dev, preview=preview)
    partial = evaluation_of_failure(caught.value)
    assert partial is not None
    # Refused before any resource is registered: only the root stack exists.
    assert [resource.type for resource in partial.resources] == [STACK_TYPE]
    return str(caught.value), partial


@MODES
def test_staging_deploys_what_dev_runs(preview: bool) -> None:
    ev = run_staging(dev_running(), preview=preview)
    (read,) = ev.reads
    assert (read.type, read.name) == (STACK_REFERENCE, SOURCE_REFERENCE)
    assert read.inputs["name"] == "organization/kubeadm-ha/dev"
    # The StackReference is read right after the root stack registered, before any cluster resource.
    assert read.registered_before == 1 and ev.resources[0].type == STACK_TYPE
    assert len(ev.by_type("command:remote:Command")) > 0
    assert ev.outputs["promotion"].value == {"from": "dev", "gate": "on"}
    assert not [log for log in ev.logs if log.severity == "warning" and "promotion" in log.message]


def test_release_and_digest_are_exported_only_once_every_step_has_run() -> None:
    deployed = run_staging(dev_running(), preview=False).outputs
    assert deployed[RELEASE_OUTPUT].value == release_of(parse_config(KEYS, stack="staging"))
    assert deployed[PROGRAM_DIGEST_OUTPUT].value == program_digest(ROOT)
    assert not deployed[RELEASE_OUTPUT].secret
    # In preview no step has run (their ids are unknown), so neither is published, while outputs that do not
    # wait for steps are.
    previewed = run_staging(dev_running(), preview=True).outputs
    assert not previewed[RELEASE_OUTPUT].known and not previewed[PROGRAM_DIGEST_OUTPUT].known
    assert previewed["apiEndpoint"].known and previewed["promotion"].known


@MODES
@pytest.mark.parametrize(
    ("change", "setting", "running"),
    [
        ({"kubernetesVersion": OLDER_PATCH}, "kubernetes.version: staging would deploy", f"dev runs {OLDER_PATCH}"),
        ({"cniVersion": "v3.28.0"}, "CNI manifest version pinned in model/versions.py", "dev runs v3.28.0"),
        ({PROGRAM_DIGEST_OUTPUT: "sha256:" + "0" * 64}, "programDigest (the program's source", "0" * 64),
    ],
    ids=["older-patch", "other-cni-version", "other-program"],
)
def test_a_release_dev_does_not_run_is_refused_naming_the_setting(
    preview: bool, change: dict[str, str], setting: str, running: str
) -> None:
    message, partial = refused(dev_running(**change), preview=preview)
    assert setting in message and running in message
    assert "pulumi up --stack dev" in message and "tools.promote staging --from dev" in message
    # Only the differing setting is listed.
    assert message.count("\n  - ") == 1
    assert [read.name for read in partial.reads] == [SOURCE_REFERENCE]


@MODES
def test_a_missing_source_is_refused(preview: bool) -> None:
    message, partial = refused(None, preview=preview)
    assert "stack dev does not exist" in message and "pulumi stack init dev" in message
    assert partial.reads == []  # no StackReference to a stack that is not there


@MODES
def test_a_source_that_never_deployed_is_refused(preview: bool) -> None:
    message, _ = refused({}, preview=preview)
    assert "never finished a deployment" in message and "pulumi up --stack dev" in message


@MODES
def test_unknown_source_outputs_are_refused_not_guessed(preview: bool) -> None:
    message, _ = refused(UNKNOWN, preview=preview)
    # Only a preview can see an unknown; an update resolves it as absent, which is refused as well.
    assert ("not known" if preview else "never finished a deployment") in message


@MODES
@pytest.mark.parametrize("dev", [None, "older"], ids=["missing-source", "other-release"])
def test_the_override_passes_with_a_warning_and_is_exported(preview: bool, dev: str | None) -> None:
    source = None if dev is None else dev_running(kubernetesVersion=OLDER_PATCH)
    ev = run_staging(source, preview=preview, gate="off", reason="CVE-2026-0001 hotfix, approved by ops")
    warnings = [log.message for log in ev.logs if log.severity == "warning" and "promotion gate OFF" in log.message]
    assert len(warnings) == 1 and "CVE-2026-0001 hotfix, approved by ops" in warnings[0]
    assert ev.outputs["promotion"].value == {
        "from": "dev",
        "gate": "off",
        "reason": "CVE-2026-0001 hotfix, approved by ops",
    }
    assert ev.reads == []
    assert len(ev.by_type("command:remote:Command")) > 0


def test_an_override_without_a_reason_is_a_config_error() -> None:
    from model.rules import ConfigError

    with pytest.raises(ConfigError) as caught:
        run_staging(dev_running(), preview=False, gate="off")
    assert "promotion.reason" in str(caught.value)


def test_a_stack_without_promotion_reads_no_other_stack() -> None:
    config = {f"kubeadm-ha:{key}": value for key, value in KEYS.items()}
    ev = evaluate("dev", project_dir=ROOT, config=config, stack_outputs={})
    assert ev.reads == [] and "promotion" not in ev.outputs
    assert ev.outputs[RELEASE_OUTPUT].value == release_of(parse_config(KEYS, stack="dev"))


def test_the_stack_files_declare_the_chain() -> None:
    chain = {}
    for stack in ("dev", "staging", "prod"):
        promotion = config_from_stack_file(str(ROOT / f"Pulumi.{stack}.yaml"), stack).promotion
        chain[stack] = None if promotion is None else (promotion.source, promotion.gate)
    assert chain == {"dev": None, "staging": ("dev", "on"), "prod": ("staging", "on")}
    # Only the promotion key was added for it: the files still load with a plain YAML reader.
    for stack in ("staging", "prod"):
        document = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())
        assert set(document["config"]["kubeadm-ha:promotion"]) == {"from"}


def test_prod_is_gated_on_staging_not_dev() -> None:
    """prod's StackReference names staging; what dev runs does not matter to prod."""
    prod = {f"kubeadm-ha:{key}": value for key, value in KEYS.items()} | {"kubeadm-ha:promotion": {"from": "staging"}}
    ev = evaluate("prod", project_dir=ROOT, config=prod, stack_outputs={"staging": dev_running(), "dev": None})
    assert [read.inputs["name"] for read in ev.reads] == ["organization/kubeadm-ha/staging"]
    with pytest.raises(PromotionRefused) as caught:
        evaluate("prod", project_dir=ROOT, config=prod, stack_outputs={"staging": None, "dev": dev_running()})
    assert "stack staging does not exist" in str(caught.value)
