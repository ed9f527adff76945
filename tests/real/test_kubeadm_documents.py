"""Every kubeadm document the program sends, validated by real kubeadm (section 2 of issue 9).

`kubeadm config validate` (strict: unknown or duplicate fields fail it) reads every document file every
step of every stack and extra shape installs, at the default Kubernetes version and at the oldest
supported minor, each with the kubeadm of that release; a stack file as written is validated too, by the
kubeadm of its minor (or the next, which supports one minor of skew). kubeadm's warnings count as failures.

Binaries: `tests/real/build-binaries kubeadm kubeadm@<oldest>` (run-all.sh builds them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model.versions import DEFAULT_KUBERNETES, minor_of
from render.kubeadm import INIT_CONFIG_PATH
from tests.real.binaries import KUBEADM_VERSIONS, binary, reported_version
from tests.real.documents import ALL_STACKS, DocumentFile, document_files, evaluated_at
from tests.real.kubeadm_cli import validate
from tests.stacks import stack_config

pytestmark = pytest.mark.real


@pytest.mark.parametrize("version", KUBEADM_VERSIONS)
def test_built_kubeadm_reports_its_release(version: str) -> None:
    # kubeadm picks its etcd image and its supported control-plane versions from this string.
    assert reported_version(binary("kubeadm", version)) == f"v{version}"


def _validate_all(kubeadm: str, files: list[DocumentFile], tmp_path: Path) -> None:
    assert files, "the program sends no kubeadm documents"
    problems = []
    for number, document in enumerate(files):
        verdict = validate(kubeadm, document.content, tmp_path / f"{number}.yaml")
        if verdict:
            problems.append(f"--- {document.label}\n{verdict}")
    assert not problems, "kubeadm refused or warned about documents the program sends:\n" + "\n".join(problems)


@pytest.mark.parametrize("version", KUBEADM_VERSIONS)
@pytest.mark.parametrize("stack", ALL_STACKS)
def test_kubeadm_accepts_every_document(stack: str, version: str, tmp_path: Path) -> None:
    kubeadm = binary("kubeadm", version)
    _validate_all(kubeadm, document_files(evaluated_at(stack, version)), tmp_path)


def kubeadm_for(version: str) -> str:
    """The built kubeadm that deploys `version`: its own minor's, or the next minor's (one minor of skew)."""
    major, minor = minor_of(version).split(".")
    for candidate in KUBEADM_VERSIONS:
        if minor_of(candidate) in (f"{major}.{minor}", f"{major}.{int(minor) + 1}"):
            return binary("kubeadm", candidate)
    pytest.fail(f"no kubeadm in the tests deploys Kubernetes {version} (built: {', '.join(KUBEADM_VERSIONS)})")


@pytest.mark.parametrize("stack", ALL_STACKS)
def test_kubeadm_accepts_every_document_of_the_stack_as_written(stack: str, tmp_path: Path) -> None:
    version = stack_config(stack).kubernetes.version
    _validate_all(kubeadm_for(version), document_files(evaluated_at(stack, None)), tmp_path)


@pytest.mark.parametrize(
    "breakage",
    [
        ("kind: ClusterConfiguration\n", "kind: ClusterConfiguration\nnoSuchField: 1\n"),
        ("kind: KubeletConfiguration\n", "kind: KubeletConfiguration\nnoSuchField: 1\n"),
        ("controlPlaneEndpoint: ", "controlPlaneEndpoint: 'a b c:"),
    ],
    ids=["unknown-kubeadm-field", "unknown-kubelet-field", "invalid-value"],
)
def test_validation_can_fail(breakage: tuple[str, str], tmp_path: Path) -> None:
    """Control: the verdict above is not vacuous."""
    kubeadm = binary("kubeadm", DEFAULT_KUBERNETES)
    (init,) = [f for f in document_files(evaluated_at("staging", DEFAULT_KUBERNETES)) if f.path == INIT_CONFIG_PATH]
    old, new = breakage
    assert old in init.content
    broken = init.content.replace(old, new, 1)
    assert validate(kubeadm, broken, tmp_path / "broken.yaml"), "kubeadm accepted a broken document"
