"""`python -m tools.promote`: rewrites only release keys, refuses what the chain or the target would refuse.

Each test works in a copy of the program with stack files of its own, so it depends on neither the
repository's stack files nor a Pulumi CLI (the stacks' outputs come from files, as `--source-outputs`).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.release import PROGRAM_DIGEST_OUTPUT, PROGRAM_DIRECTORIES, RELEASE_OUTPUT, program_digest, release_of
from model.stack import parse_config
from model.versions import RELEASES
from tools import promote
from tools.promote import Refused, read_outputs
from tools.stack_yaml import rewrite_settings

ROOT = Path(__file__).resolve().parents[2]
NEW = RELEASES["1.37"].latest_patch
OLD = NEW.rsplit(".", 1)[0] + "." + str(int(NEW.rsplit(".", 1)[1]) - 1)
PREVIOUS_MINOR = RELEASES["1.36"].latest_patch
IMAGE = "/var/lib/libvirt/images/noble-20260301.img"

DEV = f"""# dev: where every change lands first.
config:
  kubeadm-ha:clusterName: dev
  kubeadm-ha:network: {{cidr: 10.17.3.0/24}}
  kubeadm-ha:image: {IMAGE}
  kubeadm-ha:kubernetes:
    version: "{NEW}"
    cni: calico
  kubeadm-ha:loadBalancer: {{replicas: 1}}
  kubeadm-ha:controlPlane: {{replicas: 1}}
  kubeadm-ha:workers: {{replicas: 0}}
"""

STAGING = f"""# staging: mirrors prod at smaller sizes.
config:
  kubeadm-ha:clusterName: staging   # prefixes every hostname
  kubeadm-ha:network:
    cidr: 10.17.4.0/24
  kubeadm-ha:kubernetes:
    # The version travels from dev with `python -m tools.promote staging`.
    version: "{OLD}"
    podSubnet: 10.244.0.0/16
    cni: calico
  kubeadm-ha:loadBalancer: {{replicas: 1, vip: 10.17.4.10}}
  kubeadm-ha:controlPlane: {{replicas: 1}}
  kubeadm-ha:workers: {{replicas: 0}}
  kubeadm-ha:promotion: {{from: dev}}
"""

PROD = f"""config:
  kubeadm-ha:clusterName: prod
  kubeadm-ha:network: {{cidr: 10.17.5.0/24}}
  kubeadm-ha:kubernetes: {{version: "{OLD}", cni: calico}}
  kubeadm-ha:loadBalancer: {{replicas: 1}}
  kubeadm-ha:controlPlane: {{replicas: 1}}
  kubeadm-ha:workers: {{replicas: 0}}
  kubeadm-ha:promotion: {{from: staging}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the program (same digest as the checkout: the digest is content-addressed)."""
    copy = tmp_path_factory.mktemp("program")
    for name in ("__main__.py", "Pulumi.yaml", "requirements.txt"):
        shutil.copy2(ROOT / name, copy / name)
    for directory in PROGRAM_DIRECTORIES:
        shutil.copytree(ROOT / directory, copy / directory, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def project(program: Path, tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(program, project)
    for stack, text in (("dev", DEV), ("staging", STAGING), ("prod", PROD)):
        (project / f"Pulumi.{stack}.yaml").write_text(text)
    return project


def deployed(project: Path, text: str, stack: str, **changes: Any) -> dict[str, Any]:
    """The outputs `pulumi up` of `text` by the program in `project` would leave, with `changes` made."""
    raw = {k.removeprefix("kubeadm-ha:"): v for k, v in yaml.safe_load(text)["config"].items()}
    # The copy's digest, not the checkout's: the checkout may be edited while the tests run.
    digest = changes.pop(PROGRAM_DIGEST_OUTPUT, program_digest(project))
    release = {**release_of(parse_config(raw, stack=stack)), **changes}
    return {"kubeconfig": "[secret]", "kubernetesVersion": release["kubernetesVersion"], RELEASE_OUTPUT: release,
            PROGRAM_DIGEST_OUTPUT: digest}  # fmt: skip


def outputs_file(directory: Path, name: str, outputs: dict[str, Any]) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(outputs))
    return path


def run(project: Path, *args: str, source: dict[str, Any], target: dict[str, Any]) -> int:
    files = ["--source-outputs", str(outputs_file(project.parent, "source", source))]
    files += ["--target-outputs", str(outputs_file(project.parent, "target", target))]
    return promote.main([*args, *files, "--project-dir", str(project)])


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


# --------------------------------------------------------------------------- the command


def test_promote_dev_to_staging_writes_only_the_release_keys(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run(project, "staging", source=deployed(project, DEV, "dev"), target=deployed(project, STAGING, "staging"))
    out = capsys.readouterr().out
    assert status == 0, out
    after = (project / "Pulumi.staging.yaml").read_text()
    assert changed_lines(STAGING, after) == [
        f'-    version: "{OLD}"',
        f'+    version: "{NEW}"',
        f"+  kubeadm-ha:image: {IMAGE}",
    ]
    # Nothing else moved: comments, order, the flow mappings, the promotion key.
    assert after.startswith("# staging: mirrors prod at smaller sizes.\n")
    assert "  # The version travels from dev" in after and "# prefixes every hostname" in after
    # The promoted file declares what dev runs, and the plan diff shows what changes on the nodes.
    promoted = yaml.safe_load(after)["config"]
    assert promoted["kubeadm-ha:kubernetes"]["version"] == NEW and promoted["kubeadm-ha:image"] == IMAGE
    assert f"+  kubeadm-ha:image: {IMAGE}" in out
    assert "# Offline plan of staging, before -> after" in out
    assert f"-    # kubelet, kubeadm and kubectl {OLD} from" in out
    assert f"+    # kubelet, kubeadm and kubectl {NEW} from" in out
    # The staging cluster runs OLD, so the promoted plan upgrades it.
    assert "+++ after/nodes/cp-1/" in out and f"-upgrade-{NEW}/script.sh" in out
    # A second run has nothing left to do.
    assert (
        run(project, "staging", source=deployed(project, DEV, "dev"), target=deployed(project, STAGING, "staging")) == 0
    )
    assert "nothing to promote" in capsys.readouterr().out
    assert (project / "Pulumi.staging.yaml").read_text() == after


def test_dry_run_writes_nothing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = project / "Pulumi.staging.yaml"
    os.utime(path, (1_700_000_000, 1_700_000_000))
    status = run(
        project,
        "staging",
        "--dry-run",
        source=deployed(project, DEV, "dev"),
        target=deployed(project, STAGING, "staging"),
    )
    out = capsys.readouterr().out
    assert status == 0
    assert path.read_text() == STAGING and path.stat().st_mtime == 1_700_000_000
    assert f'+    version: "{NEW}"' in out and "--dry-run: Pulumi.staging.yaml not written" in out


def refusal(project: Path, capsys: pytest.CaptureFixture[str], *args: str, **outputs: Any) -> str:
    files = {path.name: path.read_bytes() for path in project.glob("Pulumi.*.yaml")}
    assert run(project, *args, **outputs) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("promote: refused: ")
    assert {path.name: path.read_bytes() for path in project.glob("Pulumi.*.yaml")} == files
    return lines[0]


def test_dev_to_prod_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = refusal(
        project,
        capsys,
        "prod",
        "--from",
        "dev",
        source=deployed(project, DEV, "dev"),
        target=deployed(project, PROD, "prod"),
    )
    assert "prod promotes from staging" in reason and "skip a link" in reason


def test_the_start_of_the_chain_has_nothing_to_promote_from(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = refusal(project, capsys, "dev", source=deployed(project, DEV, "dev"), target=deployed(project, DEV, "dev"))
    assert "dev has no promotion.from" in reason


def test_a_source_with_undeployed_edits_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Pulumi.dev.yaml says NEW, but dev still runs OLD: the edit has not been deployed to dev.
    reason = refusal(
        project,
        capsys,
        "staging",
        source=deployed(project, DEV, "dev", kubernetesVersion=OLD),
        target=deployed(project, STAGING, "staging"),
    )
    assert "dev has undeployed edits" in reason and f"Pulumi.dev.yaml says {NEW}; dev runs {OLD}" in reason
    assert "pulumi up --stack dev" in reason


def test_a_source_running_another_program_revision_is_refused(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = "sha256:" + "e" * 64
    reason = refusal(
        project,
        capsys,
        "staging",
        source=deployed(project, DEV, "dev", programDigest=other),
        target=deployed(project, STAGING, "staging"),
    )
    assert f"dev runs program {other}" in reason and "this checkout is" in reason


def test_a_source_that_never_deployed_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = refusal(project, capsys, "staging", source={}, target=deployed(project, STAGING, "staging"))
    assert "dev has never finished a deployment" in reason


def test_what_the_targets_own_rules_refuse_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # staging still runs the minor before OLD's; going to NEW from there is fine, from two minors back it is not.
    two_back = RELEASES["1.35"].latest_patch
    reason = refusal(
        project,
        capsys,
        "staging",
        source=deployed(project, DEV, "dev"),
        target={**deployed(project, STAGING, "staging"), "kubernetesVersion": two_back},
    )
    assert "staging's own rules refuse the promotion" in reason
    assert "kubernetes.version" in reason and "skips a minor version" in reason
    # One minor back is an ordinary upgrade.
    assert run(project, "staging", "--dry-run", source=deployed(project, DEV, "dev"),
               target={**deployed(project, STAGING, "staging"), "kubernetesVersion": PREVIOUS_MINOR}) == 0  # fmt: skip


def test_outputs_come_from_the_pulumi_cli_bounded_by_a_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pulumi"
    log = tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nif [ "$5" = slow ]; then sleep 5; fi\n'
                    f'if [ "$5" = gone ]; then echo "error: no stack named \'gone\' found" >&2; exit 255; fi\n'
                    "echo '{\"programDigest\": \"sha256:abc\"}'\n")  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert read_outputs("dev", None, tmp_path) == {"programDigest": "sha256:abc"}
    assert log.read_text().splitlines() == ["stack output --json --stack dev"]
    with pytest.raises(Refused, match="no stack named 'gone' found"):
        read_outputs("gone", None, tmp_path)
    monkeypatch.setattr(promote, "PULUMI_TIMEOUT_SECONDS", 1)
    with pytest.raises(Refused, match="did not answer within 1 s"):
        read_outputs("slow", None, tmp_path)


# --------------------------------------------------------------------------- the YAML rewrite


def test_rewrite_replaces_scalars_in_their_own_style_and_nothing_else() -> None:
    text = (
        "config:   # keep this\n"
        "  kubeadm-ha:image: 'https://example.test/a.img'   # single-quoted\n"
        "  kubeadm-ha:kubernetes: {version: 1.37.1, cni: flannel}  # flow\n"
        "  other:key: [1, 2]\r\n"
    )
    after = rewrite_settings(
        text,
        {
            ("kubeadm-ha:image",): "https://example.test/b.img",
            ("kubeadm-ha:kubernetes", "version"): "1.37.2",
            ("kubeadm-ha:kubernetes", "cni"): "calico",
        },
    )
    assert after == (
        "config:   # keep this\n"
        "  kubeadm-ha:image: 'https://example.test/b.img'   # single-quoted\n"
        "  kubeadm-ha:kubernetes: {version: 1.37.2, cni: calico}  # flow\n"
        "  other:key: [1, 2]\r\n"
    )


def test_rewrite_adds_missing_keys_in_the_mappings_style() -> None:
    text = "config:\n  kubeadm-ha:kubernetes:\n    podSubnet: 10.244.0.0/16\n  kubeadm-ha:ssh: {user: kube}\n"
    after = rewrite_settings(text, {("kubeadm-ha:kubernetes", "version"): "1.37.2", ("kubeadm-ha:image",): "/img/on"})
    assert after == (
        "config:\n  kubeadm-ha:kubernetes:\n    podSubnet: 10.244.0.0/16\n    version: 1.37.2\n"
        "  kubeadm-ha:ssh: {user: kube}\n  kubeadm-ha:image: /img/on\n"
    )
    flow = rewrite_settings(
        "config:\n  kubeadm-ha:kubernetes: {cni: calico}\n", {("kubeadm-ha:kubernetes", "version"): "1.37.2"}
    )
    assert flow == "config:\n  kubeadm-ha:kubernetes: {cni: calico, version: 1.37.2}\n"
    created = rewrite_settings("config:\n  a:b: 1", {("kubeadm-ha:kubernetes", "version"): "1.37.2"})
    assert created == "config:\n  a:b: 1\n  kubeadm-ha:kubernetes: {version: 1.37.2}\n"


def test_rewrite_keeps_a_shorthand_scalar_until_a_second_field_is_needed() -> None:
    image = {"kubeadm-ha:image": "url"}
    text = "config:\n  kubeadm-ha:image: /img/a.img  # local\n  x:y: 1\n"
    url_only = rewrite_settings(text, {("kubeadm-ha:image", "url"): "/img/b.img"}, image)
    assert url_only == "config:\n  kubeadm-ha:image: /img/b.img  # local\n  x:y: 1\n"
    digest = "ab" * 32
    both = rewrite_settings(text, {("kubeadm-ha:image", "sha256"): digest}, image)
    assert both == f"config:\n  kubeadm-ha:image: {{url: /img/a.img, sha256: {digest}}}  # local\n  x:y: 1\n"
    added = rewrite_settings("config:\n  x:y: 1\n", {("kubeadm-ha:image", "url"): "/img/c.img"}, image)
    assert added == "config:\n  x:y: 1\n  kubeadm-ha:image: /img/c.img\n"
    mapping = "config:\n  kubeadm-ha:image:\n    url: /img/a.img\n    sha256: " + digest + "\n"
    assert rewrite_settings(mapping, {("kubeadm-ha:image", "url"): "/img/d.img"}, image) == mapping.replace(
        "/img/a.img", "/img/d.img"
    )


def test_rewrite_quotes_what_yaml_would_read_as_something_else() -> None:
    # `on` is a boolean to YAML 1.1 readers and 1.40 would be a number: both must stay strings.
    after = rewrite_settings("config:\n  x:y: a\n  x:z: b\n", {("x:y",): "on", ("x:z",): "1.40"})
    assert yaml.safe_load(after)["config"] == {"x:y": "on", "x:z": "1.40"}


def test_the_plan_command_models_the_source_from_its_outputs(tmp_path: Path) -> None:
    from components.promotion import PromotionRefused
    from model.release import deployment_outputs
    from model.stack import config_from_stack_file
    from tools import plan

    staging = config_from_stack_file(str(ROOT / "Pulumi.staging.yaml"), "staging")
    running = deployment_outputs(staging, program_digest(ROOT))
    same = outputs_file(tmp_path, "dev", running)
    assert plan.main(["staging", "--out", str(tmp_path / "plan"), "--source-outputs", str(same)]) == 0
    assert (tmp_path / "plan" / "summary.md").is_file()
    other = outputs_file(tmp_path, "dev-other", {**running, PROGRAM_DIGEST_OUTPUT: "sha256:" + "0" * 64})
    with pytest.raises(PromotionRefused, match="programDigest"):
        plan.main(["staging", "--out", str(tmp_path / "refused"), "--source-outputs", str(other)])
