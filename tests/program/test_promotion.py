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


# --------------------------------------------------------------------------- routine runs while the source is ahead
#
# issue 18, defect 3: the gate refuses a *change* of release or program, not a stack re-applying what it runs.
# `previous_outputs` is what the engine's readStackOutputs returns for staging itself: the outputs its last
# successful `pulumi up` left (here: an offline `up` of the same program, so every output is realistic).

NEWER_PROGRAM = "sha256:" + "a" * 64
OLDER_PROGRAM = "sha256:" + "b" * 64


def staging_outputs(**keys: Any) -> dict[str, Any]:
    """staging's own outputs after a successful `pulumi up` of KEYS (with `keys` changed), dev then running it."""
    raw = {**KEYS, **keys}
    release = release_of(parse_config(raw, stack="dev"))
    dev = {RELEASE_OUTPUT: release, PROGRAM_DIGEST_OUTPUT: program_digest(ROOT)}
    config = {f"kubeadm-ha:{key}": value for key, value in {**raw, "promotion": {"from": "dev"}}.items()}
    ev = evaluate("staging", project_dir=ROOT, config=config, stack_outputs={"dev": dev})
    return {name: output.value for name, output in ev.outputs.items()}


def dev_ahead() -> dict[str, Any]:
    """dev, after staging deployed: a newer checkout and another CNI manifest, not yet promoted."""
    return dev_running(cniVersion="v3.99.0", programDigest=NEWER_PROGRAM)


@MODES
@pytest.mark.parametrize("workers", [0, 1], ids=["same-config", "scaled"])
def test_a_routine_run_re_applying_what_staging_runs_passes_while_dev_is_ahead(preview: bool, workers: int) -> None:
    """The periodic run (certificate renewal, a dead node replaced, scaling) is not a promotion."""
    config = {**staging_config(), "kubeadm-ha:workers": {"replicas": workers}}
    ev = evaluate(
        "staging",
        project_dir=ROOT,
        config=config,
        preview=preview,
        previous_outputs=staging_outputs(),
        stack_outputs={"dev": dev_ahead()},
    )
    assert len(ev.by_type("command:remote:Command")) > 0
    assert ev.outputs["promotion"].value == {"from": "dev", "gate": "on"}
    # The source is still read (its StackReference stays in the state) and the operator is told it moved on.
    assert [read.name for read in ev.reads] == [SOURCE_REFERENCE]
    (note,) = [log.message for log in ev.logs if "promotion gate" in log.message]
    assert "re-applies the release and program it runs" in note and "dev runs another" in note
    assert "v3.99.0" in note and NEWER_PROGRAM in note
    if workers:
        assert [r for r in ev.by_type("libvirt:index/domain:Domain") if r.name == "staging-worker-1-domain"]


@MODES
@pytest.mark.parametrize("dev", ["missing", "unknown"])
def test_a_routine_run_does_not_depend_on_the_source_being_readable(preview: bool, dev: str) -> None:
    ev = evaluate(
        "staging",
        project_dir=ROOT,
        config=staging_config(),
        preview=preview,
        previous_outputs=staging_outputs(),
        stack_outputs={"dev": None if dev == "missing" else UNKNOWN},
    )
    assert len(ev.by_type("command:remote:Command")) > 0
    (note,) = [log.message for log in ev.logs if "promotion gate" in log.message]
    assert "re-applies the release and program it runs" in note


@MODES
def test_a_change_of_release_is_still_refused_while_dev_is_elsewhere(preview: bool) -> None:
    """staging runs OLDER_PATCH; its file now says VERSION; dev runs VERSION but by a newer program."""
    with pytest.raises(PromotionRefused) as caught:
        evaluate(
            "staging",
            project_dir=ROOT,
            config=staging_config(),
            preview=preview,
            previous_outputs=staging_outputs(kubernetes={"version": OLDER_PATCH, "cni": "calico"}),
            stack_outputs={"dev": dev_running(programDigest=NEWER_PROGRAM)},
        )
    message = str(caught.value)
    # What the stack would change, then why the source does not vouch for it.
    assert f"staging runs {OLDER_PATCH}" in message and "kubernetes.version" in message
    assert f"dev runs {NEWER_PROGRAM}" in message and message.count("\n  - ") == 1
    partial = evaluation_of_failure(caught.value)
    assert partial is not None and [resource.type for resource in partial.resources] == [STACK_TYPE]


@MODES
def test_a_change_of_program_alone_is_still_refused(preview: bool) -> None:
    """staging ran an older checkout: this checkout is a change, and dev does not run this release by it."""
    previous = {**staging_outputs(), PROGRAM_DIGEST_OUTPUT: OLDER_PROGRAM}
    with pytest.raises(PromotionRefused) as caught:
        evaluate(
            "staging",
            project_dir=ROOT,
            config=staging_config(),
            preview=preview,
            previous_outputs=previous,
            stack_outputs={"dev": dev_ahead()},
        )
    message = str(caught.value)
    assert f"staging runs {OLDER_PROGRAM}" in message and "v3.99.0" in message
    # The way back to a routine run is named: the program revision staging runs.
    assert "python -m tools.promote staging --find-revision" in message
    # The same change, once dev runs exactly it, is the promotion the gate exists for.
    ev = evaluate(
        "staging",
        project_dir=ROOT,
        config=staging_config(),
        preview=preview,
        previous_outputs=previous,
        stack_outputs={"dev": dev_running()},
    )
    assert len(ev.by_type("command:remote:Command")) > 0


def test_a_previous_run_without_a_release_is_judged_as_a_change() -> None:
    """A first run that failed (or a program from before the release output) leaves no release: not a re-apply."""
    previous = {key: value for key, value in staging_outputs().items() if key != RELEASE_OUTPUT}
    with pytest.raises(PromotionRefused):
        evaluate(
            "staging",
            project_dir=ROOT,
            config=staging_config(),
            previous_outputs=previous,
            stack_outputs={"dev": dev_ahead()},
        )
