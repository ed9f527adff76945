"""The release (model/release.py), the promotion key's rules (model/config.py) and the gate's verdict."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from components.promotion import UNKNOWN_OUTPUTS, SourceMissing, judge, promotion_output, reapply_note
from model.config import DEFAULT_IMAGE
from model.release import (
    PROGRAM_DIGEST_OUTPUT,
    PROGRAM_DIRECTORIES,
    RELEASE_KEYS,
    RELEASE_OUTPUT,
    deployment_differences,
    deployment_outputs,
    digest_of,
    program_digest,
    program_files,
    release_differences,
    release_of,
    stack_settings,
)
from model.rules import ConfigError
from model.stack import parse_config
from model.versions import RELEASES
from render.cni import CALICO_VERSION, FLANNEL_VERSION

ROOT = Path(__file__).resolve().parents[2]
VERSION = RELEASES["1.37"].latest_patch


def config(**keys: Any) -> Any:
    raw = {"network": {"cidr": "10.17.9.0/24"}, "kubernetes": {"version": VERSION}, **keys}
    return parse_config(raw, stack="t")


def problems(raw: dict[str, Any], stack: str = "staging") -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"network": {"cidr": "10.17.9.0/24"}, **raw}, stack=stack)
    return {problem.path: problem.rule for problem in caught.value.problems}


# --------------------------------------------------------------------------- what a release is


def test_release_holds_the_software_and_every_pin_derived_from_it() -> None:
    release = release_of(config(kubernetes={"version": VERSION, "cni": "calico"}))
    assert release == {
        "kubernetesVersion": VERSION,
        "kubernetesPackages": f"{VERSION}-1.1",
        "etcdImageTag": RELEASES["1.37"].etcd_image_tag,
        "cni": "calico",
        "cniVersion": CALICO_VERSION,
        "image": DEFAULT_IMAGE,
    }
    assert list(release) == [key.name for key in RELEASE_KEYS if key.name not in ("imageSha256", "artifactBundle")]
    pinned = release_of(config(image={"url": "/img/a.qcow2", "sha256": "ab" * 32}))
    assert (pinned["image"], pinned["imageSha256"]) == ("/img/a.qcow2", "ab" * 32)
    assert list(pinned) == [key.name for key in RELEASE_KEYS if key.name != "artifactBundle"]
    bundled = release_of(
        config(artifacts={"source": "bundle", "bundle": {"path": "/srv/b", "sha256": "cd" * 32}}, image=pinned["image"])
    )
    assert bundled["artifactBundle"] == "cd" * 32
    assert stack_settings(bundled)[("kubeadm-ha:artifacts", "bundle", "sha256")] == "cd" * 32
    flannel = release_of(config(kubernetes={"version": VERSION, "cni": "flannel"}))
    assert flannel["cniVersion"] == FLANNEL_VERSION
    assert "cniVersion" not in release_of(config(kubernetes={"version": VERSION, "cni": "none"}))


def test_environment_settings_are_not_part_of_a_release() -> None:
    small = config()
    big = config(
        network={"cidr": "10.20.0.0/16", "domain": "prod.example"},
        loadBalancer={"replicas": 3, "vip": "10.20.0.10", "cpus": 4},
        controlPlane={"replicas": 5, "cpus": 8},
        workers={"replicas": 40, "memoryMiB": 16384},
        etcd={"topology": "external", "replicas": 5},
        ssh={"user": "ops"},
        clusterName="another",
        promotion={"from": "staging"},
    )
    assert release_of(small) == release_of(big)
    other_patch = config(kubernetes={"version": RELEASES["1.37"].latest_patch[:-1] + "0"})
    assert release_of(other_patch) != release_of(small)
    assert release_of(config(image="/var/lib/images/noble.img"))["image"] == "/var/lib/images/noble.img"
    assert release_of(config(image={"url": "/img/x", "sha256": "cd" * 32})) != release_of(config(image="/img/x"))


def test_stack_settings_are_the_release_keys_an_operator_writes() -> None:
    release = release_of(config(kubernetes={"version": VERSION, "cni": "flannel"}, image="/img/a.qcow2"))
    assert stack_settings(release) == {
        ("kubeadm-ha:kubernetes", "version"): VERSION,
        ("kubeadm-ha:kubernetes", "cni"): "flannel",
        ("kubeadm-ha:image", "url"): "/img/a.qcow2",
    }
    pinned = release_of(config(image={"url": "/img/a.qcow2", "sha256": "ab" * 32}))
    assert stack_settings(pinned)[("kubeadm-ha:image", "sha256")] == "ab" * 32


# --------------------------------------------------------------------------- program digest


def _copy_program(destination: Path) -> None:
    for name in ("__main__.py", "Pulumi.yaml", "requirements.txt"):
        shutil.copy2(ROOT / name, destination / name)
    for directory in PROGRAM_DIRECTORIES:
        shutil.copytree(ROOT / directory, destination / directory, ignore=shutil.ignore_patterns("__pycache__"))


def test_program_files_are_the_programs_own_source_only() -> None:
    files = program_files(ROOT)
    assert files == sorted(files)
    assert {"__main__.py", "Pulumi.yaml", "requirements.txt", "model/release.py"} <= set(files)
    assert any(name.startswith("render/templates/") for name in files)
    assert not [name for name in files if name.startswith(("Pulumi.dev", "Pulumi.staging", "Pulumi.prod"))]
    assert not [name for name in files if name.startswith(("tests/", "tools/")) or "__pycache__" in name]


def test_digest_is_content_addressed(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
        _copy_program(directory)
    digest = program_digest(first)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    # Another checkout location, other mtimes, bytecode caches and stack files: the same program.
    (second / "components" / "__pycache__").mkdir()
    (second / "components" / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\0cache")
    (second / "Pulumi.dev.yaml").write_text("config: {}\n")
    (second / "model" / "versions.py").touch()
    assert program_digest(second) == digest
    # Any change to the program's source is another program.
    cni = second / "model" / "versions.py"
    cni.write_text(cni.read_text().replace(CALICO_VERSION, "v3.28.0"))
    assert program_digest(second) != digest
    cni.write_text((first / "model" / "versions.py").read_text())
    assert program_digest(second) == digest
    (second / "render" / "templates" / "haproxy.cfg.tmpl").write_text("changed\n")
    assert program_digest(second) != digest


def test_digest_depends_on_paths_and_contents_not_order() -> None:
    files = [("a.py", b"one"), ("b/c.py", b"two")]
    assert digest_of(files) == digest_of(list(reversed(files)))
    assert digest_of(files) != digest_of([("a.py", b"two"), ("b/c.py", b"one")])
    assert digest_of(files) != digest_of([("a2.py", b"one"), ("b/c.py", b"two")])


# --------------------------------------------------------------------------- comparison and the gate's verdict

RUNNING = release_of(config())
DIGEST = "sha256:" + "1" * 64


def test_release_differences_name_the_setting() -> None:
    other = {**RUNNING, "kubernetesVersion": "1.37.0", "cniVersion": "v3.28.0"}
    found = release_differences(RUNNING, other)
    assert [(d.key, d.setting.split(" ")[0], d.wanted, d.running) for d in found] == [
        ("kubernetesVersion", "kubernetes.version", RUNNING["kubernetesVersion"], "1.37.0"),
        ("cniVersion", "the", CALICO_VERSION, "v3.28.0"),
    ]
    assert "model/versions.py" in found[1].setting
    # A key only one side knows (a newer program's release) is a difference too.
    assert [d.key for d in release_differences(RUNNING, {**RUNNING, "kernel": "6.8"})] == ["kernel"]


def test_deployment_differences_include_the_program_digest() -> None:
    deployed = {RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: DIGEST}
    assert deployment_differences(RUNNING, DIGEST, deployed) == []
    found = deployment_differences(RUNNING, "sha256:" + "2" * 64, deployed)
    assert [d.key for d in found] == ["programDigest"]
    assert deployment_outputs(config(), DIGEST) == deployed


def verdict(
    source_outputs: Any,
    release: dict[str, Any] | None = None,
    digest: str = DIGEST,
    deployed: dict[str, Any] | None = None,
) -> str | None:
    refusal = judge(
        stack="staging",
        source="dev",
        wanted_release=release or RUNNING,
        wanted_digest=digest,
        deployed=deployed or {},
        source_outputs=source_outputs,
    )
    return None if refusal is None else refusal.message()


def test_gate_lets_through_exactly_what_the_source_runs() -> None:
    assert verdict({RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: DIGEST, "nodes": {}}) is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"kubernetesVersion": "1.37.1"}, "kubernetes.version: staging would deploy"),
        ({"cniVersion": "v3.28.0"}, "CNI manifest version pinned in model/versions.py"),
        ({"cni": "flannel"}, "kubernetes.cni: staging would deploy calico; dev runs flannel"),
        ({"image": "/img/other.img"}, "image.url: staging would deploy"),
        ({"imageSha256": "ef" * 32}, "image.sha256: staging would deploy nothing; dev runs " + "ef" * 32),
    ],
)
def test_gate_refuses_another_release_naming_the_setting(change: dict[str, str], named: str) -> None:
    message = verdict({RELEASE_OUTPUT: {**RUNNING, **change}, PROGRAM_DIGEST_OUTPUT: DIGEST})
    assert message is not None and named in message
    assert "pulumi up --stack dev" in message and "python -m tools.promote staging --from dev" in message
    for value in change.values():
        assert f"dev runs {value}" in message


def test_gate_refuses_another_program_revision() -> None:
    message = verdict({RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: "sha256:" + "9" * 64})
    assert message is not None and "programDigest" in message and "9" * 64 in message and DIGEST in message


def test_gate_refuses_a_missing_a_never_deployed_or_an_unknown_source() -> None:
    missing = verdict(SourceMissing("unknown stack 'organization/kubeadm-ha/dev'"))
    assert missing is not None and "stack dev does not exist" in missing and "pulumi stack init dev" in missing
    never = verdict({"kubeconfig": "[secret]"})
    assert never is not None and "never finished a deployment" in never
    unknown = verdict(UNKNOWN_OUTPUTS)
    assert unknown is not None and "not known" in unknown
    for message in (missing, never, unknown):
        assert "gate: off" in message  # the way out is named, too


# issue 18, defect 3: what the stack itself runs (its own last outputs) is never refused; a change still is.
STAGING_RUNS = {RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: DIGEST, "kubernetesVersion": VERSION}
DEV_AHEAD = {RELEASE_OUTPUT: {**RUNNING, "cniVersion": "v3.99.0"}, PROGRAM_DIGEST_OUTPUT: "sha256:" + "a" * 64}


@pytest.mark.parametrize(
    "source",
    [DEV_AHEAD, SourceMissing("unknown stack"), UNKNOWN_OUTPUTS, {"kubeconfig": "[secret]"}],
    ids=["ahead", "missing", "unknown", "never-deployed"],
)
def test_gate_lets_a_stack_re_apply_what_it_runs_whatever_the_source_runs(source: Any) -> None:
    assert verdict(source, deployed=STAGING_RUNS) is None
    # Judged by the release and program only: the stack's other outputs (sizes, nodes) play no part.
    assert verdict(source, deployed={**STAGING_RUNS, "nodes": {"staging-worker-1": {}}}) is None


def test_gate_refuses_a_change_the_source_does_not_run_naming_what_changes() -> None:
    older = {**STAGING_RUNS, RELEASE_OUTPUT: {**RUNNING, "kubernetesVersion": "1.37.1"}}
    message = verdict(DEV_AHEAD, deployed=older)
    assert message is not None
    assert "This run changes what staging runs (kubernetes.version: staging would deploy" in message
    assert "staging runs 1.37.1" in message and "dev runs v3.99.0" in message
    assert "put back the release keys it runs in Pulumi.staging.yaml" in message
    assert "--find-revision" not in message  # the program did not change
    # Another checkout of the program is a change as well, and the way back to a routine run is named.
    message = verdict(DEV_AHEAD, deployed={**STAGING_RUNS, PROGRAM_DIGEST_OUTPUT: "sha256:" + "b" * 64})
    assert message is not None and "staging runs sha256:" + "b" * 64 in message
    assert "python -m tools.promote staging --find-revision" in message
    # The change passes once the source runs exactly it.
    assert verdict({RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: DIGEST}, deployed=older) is None


@pytest.mark.parametrize(
    "deployed",
    [{}, {"kubeconfig": "[secret]", "kubernetesVersion": VERSION}, {RELEASE_OUTPUT: RUNNING}],
    ids=["new-stack", "failed-first-run", "no-digest"],
)
def test_without_a_finished_deployment_everything_is_a_change(deployed: dict[str, Any]) -> None:
    message = verdict(DEV_AHEAD, deployed=deployed)
    assert message is not None and "dev runs v3.99.0" in message and "This run changes" not in message


def test_the_re_apply_note_says_what_the_source_runs_instead() -> None:
    note = reapply_note(stack="staging", source="dev", deployed=STAGING_RUNS, source_outputs=DEV_AHEAD)
    assert note is not None and "re-applies the release and program it runs" in note
    assert f"staging runs {RUNNING['cniVersion']}" in note
    assert "dev runs v3.99.0" in note and "python -m tools.promote staging --from dev" in note
    same = {RELEASE_OUTPUT: RUNNING, PROGRAM_DIGEST_OUTPUT: DIGEST}
    assert reapply_note(stack="staging", source="dev", deployed=STAGING_RUNS, source_outputs=same) is None
    assert reapply_note(stack="staging", source="dev", deployed={}, source_outputs=DEV_AHEAD) is None
    missing = reapply_note(stack="staging", source="dev", deployed=STAGING_RUNS, source_outputs=SourceMissing("x"))
    assert missing is not None and "dev could not be read (x)" in missing


# --------------------------------------------------------------------------- the promotion key


def test_promotion_key_parses_with_yaml_booleans_for_gate() -> None:
    parsed = config(promotion={"from": "dev"}).promotion
    assert parsed is not None and (parsed.source, parsed.gate, parsed.reason) == ("dev", "on", None)
    # PyYAML reads a bare `off` as false; Pulumi's YAML 1.2 keeps the word. Both mean off.
    for off in (False, "off"):
        overridden = config(promotion={"from": "dev", "gate": off, "reason": "CVE hotfix"}).promotion
        assert overridden is not None and overridden.gate == "off"
        assert promotion_output(overridden) == {"from": "dev", "gate": "off", "reason": "CVE hotfix"}


def test_promotion_rules_name_their_key() -> None:
    assert "this stack itself" in problems({"promotion": {"from": "staging"}})["promotion.from"]
    assert "non-empty reason" in problems({"promotion": {"from": "dev", "gate": "off"}})["promotion.reason"]
    assert (
        "non-empty reason"
        in problems({"promotion": {"from": "dev", "gate": "off", "reason": "  "}})["promotion.reason"]
    )
    assert "only used with gate: off" in problems({"promotion": {"from": "dev", "reason": "why"}})["promotion.reason"]
    assert "unknown key" in problems({"promotion": {"from": "dev", "gates": "off"}})["promotion.gates"]
    assert "from" in " ".join(problems({"promotion": {"gate": "on"}}))
    assert "promotion.gate" in problems({"promotion": {"from": "dev", "gate": "maybe"}})
    assert "promotion.from" in problems({"promotion": {"from": "dev; rm -rf /"}})
