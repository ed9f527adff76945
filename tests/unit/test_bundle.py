"""The artifact bundle's manifest, what a stack needs in it, and `python -m tools.bundle` on both sides.

The files are stand-ins (tests/bundles.py): here only the bundle's own checks read them. The node side, with
real binaries, images and containerd, is tests/real/test_bundle_install_live.py.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from model.bundle import (
    BundleError,
    Entry,
    Manifest,
    kubeadm_images,
    parse_manifest,
    pinned_manifest,
    requirement_problems,
)
from model.rules import ConfigError
from model.stack import parse_config
from tests.bundles import content_of, entries_for, write_manifest
from tools import bundle as tool
from tools.stack_yaml import effective_config, expected_config, rewrite_settings

STACK = """\
config:
  kubeadm-ha:network: {cidr: 10.17.3.0/24}
  kubeadm-ha:kubernetes: {version: "1.37.2", cni: none}
"""


def make_bundle(directory: Path, entries: list[Entry] | None = None, kubernetes: str = "1.37.2") -> str:
    entries = entries if entries is not None else entries_for("none")
    for entry in entries:
        (directory / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (directory / entry.path).write_bytes(content_of(entry.path))
    return write_manifest(directory, entries, kubernetes=kubernetes)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "Pulumi.lab.yaml").write_text(STACK)
    return tmp_path / "project"


def run_check(bundle: Path, project: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = tool.main(["check", str(bundle), "--stack", "lab", "--project-dir", str(project)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_kubeadm_images_are_what_kubeadm_config_images_list_prints_for_1_37_2() -> None:
    # `kubeadm config images list --kubernetes-version v1.37.2` (../shared/lab-binaries.md, the real binary).
    assert kubeadm_images("1.37.2") == (
        "registry.k8s.io/kube-apiserver:v1.37.2",
        "registry.k8s.io/kube-controller-manager:v1.37.2",
        "registry.k8s.io/kube-scheduler:v1.37.2",
        "registry.k8s.io/kube-proxy:v1.37.2",
        "registry.k8s.io/coredns/coredns:v1.14.6",
        "registry.k8s.io/pause:3.10.2",
        "registry.k8s.io/etcd:3.7.0-0",
    )


def test_a_complete_bundle_checks_clean_and_prints_the_digest_to_pin(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sha256 = make_bundle(tmp_path / "b")
    code, output = run_check(tmp_path / "b", project, capsys)
    assert code == 0, output
    assert f"manifest sha256 {sha256}" in output and "sha256: " + sha256 in output


def test_a_wrong_digest_and_a_missing_file_are_each_named_with_what_to_do(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_bundle(tmp_path / "b")
    (tmp_path / "b" / "bin" / "kubelet").write_bytes(b"tampered\n")
    (tmp_path / "b" / "cni" / "portmap").unlink()
    code, output = run_check(tmp_path / "b", project, capsys)
    assert code == 1
    assert "bin/kubelet: wrong digest (the manifest pins sha256" in output and "copy the bundle again" in output
    assert "cni/portmap: missing (the manifest lists it): copy the whole bundle again" in output
    assert "2 problem(s)" in output


def test_a_bundle_for_another_kubernetes_version_is_refused(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_bundle(tmp_path / "b", entries_for("none", kubernetes="1.36.3"), kubernetes="1.36.3")
    code, output = run_check(tmp_path / "b", project, capsys)
    assert code == 1
    assert "the bundle is for Kubernetes 1.36.3 and the stack runs 1.37.2" in output
    assert "bin/kubeadm is kubeadm 1.36.3; the stack runs 1.37.2" in output
    assert "image registry.k8s.io/kube-apiserver:v1.37.2 is not in the bundle" in output


def test_a_tar_archive_of_a_bundle_checks_like_its_directory(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_bundle(tmp_path / "b")
    with tarfile.open(tmp_path / "bundle.tar", "w") as archive:
        for path in sorted((tmp_path / "b").rglob("*")):
            archive.add(path, arcname=path.relative_to(tmp_path / "b").as_posix(), recursive=False)
    assert run_check(tmp_path / "bundle.tar", project, capsys)[0] == 0
    (tmp_path / "b" / "bin" / "ctr").write_bytes(b"other\n")
    with tarfile.open(tmp_path / "bad.tar", "w") as archive:
        archive.add(tmp_path / "b", arcname=".")
    code, output = run_check(tmp_path / "bad.tar", project, capsys)
    assert code == 1 and "bin/ctr: wrong digest" in output


def test_a_stack_pinning_another_bundle_is_told_so(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sha256 = make_bundle(tmp_path / "b")
    pinned = (
        STACK + f"  kubeadm-ha:artifacts: {{source: bundle, bundle: {{path: {tmp_path}/b, sha256: '{'1' * 64}'}}}}\n"
    )
    (project / "Pulumi.lab.yaml").write_text(pinned)
    code, output = run_check(tmp_path / "b", project, capsys)
    assert code == 1
    assert f"manifest.json has sha256 {sha256}; the stack pins {'1' * 64} (artifacts.bundle.sha256)" in output
    with pytest.raises(BundleError, match="this is another bundle"):
        pinned_manifest(tmp_path / "b", "1" * 64)


def test_assemble_from_a_directory_writes_a_bundle_that_checks_clean_and_is_deterministic(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    make_bundle(source)
    (source / "manifest.json").unlink()  # a --from directory is files by name; the images need OCI archives
    for entry in entries_for("none"):
        if entry.kind == "image":
            (source / entry.path).unlink()
    digests = []
    for out in (tmp_path / "one", tmp_path / "two"):
        code = tool.main(
            ["assemble", "--stack", "lab", "--project-dir", str(project), "--out", str(out), "--from", str(source)]
        )
        output = capsys.readouterr()
        assert code == 1, "a bundle without images cannot be used"
        assert "image registry.k8s.io/pause:3.10.2 is not in the bundle" in output.err
        digests.append((out / "manifest.json").read_bytes())
    assert digests[0] == digests[1]


def test_assemble_refuses_a_directory_that_is_not_empty(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    code = tool.main(
        [
            "assemble",
            "--stack",
            "lab",
            "--project-dir",
            str(project),
            "--out",
            str(tmp_path / "out"),
            "--from",
            str(tmp_path),
        ]
    )
    assert code == 1 and "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../etc/passwd", "not a plain relative path"),
        ("/usr/bin/x", "not a plain relative path"),
        ("a/../b", "not a plain"),
    ],
)
def test_a_manifest_path_outside_the_bundle_is_refused(path: str, why: str) -> None:
    entry = f'{{"path": "{path}", "sha256": "{"a" * 64}", "size": 1, "kind": "binary", "name": "x", "version": "1"}}'
    with pytest.raises(BundleError, match=why):
        parse_manifest(f'{{"format": "kubeadm-ha/bundle/v1", "files": [{entry}]}}')


def test_the_cni_manifest_must_be_the_pinned_one() -> None:
    entries = [
        entry if entry.kind != "cni-manifest" else Entry(entry.path, "b" * 64, 1, entry.kind, entry.name, entry.version)
        for entry in entries_for("calico")
    ]
    manifest = parse_manifest(Manifest("1.37.2", "amd64", tuple(entries)).to_json())
    problems = requirement_problems(manifest, "1.37.2", "calico", images=True)
    pinned = "a1df919d9721cf667accdc3e72848911b0cb25cfab7d2478ad0c996302c95744"
    found = f"manifests/calico.yaml is calico v3.32.1, sha256 {'b' * 64}"
    assert problems == [f"{found}; the program pins v3.32.1, sha256 {pinned} (model/versions.py)"]


def test_external_etcd_needs_etcdctl_in_the_bundle() -> None:
    manifest = parse_manifest(Manifest("1.37.2", "amd64", tuple(entries_for())).to_json())
    assert requirement_problems(manifest, "1.37.2", "calico", images=True) == []
    assert requirement_problems(manifest, "1.37.2", "calico", images=True, external_etcd=True) == [
        "binary etcdctl is not in the bundle"
    ]


@pytest.mark.parametrize(
    ("artifacts", "message"),
    [
        ({"source": "bundle"}, "artifacts: source is bundle: give bundle.path and bundle.sha256"),
        ({"bundle": {"path": "/b", "sha256": "a" * 64}}, "bundle is set but source is internet"),
        (
            {"source": "bundle", "bundleImages": False, "bundle": {"path": "/b", "sha256": "a" * 64}},
            "bundleImages is false: give registryMirror",
        ),
        ({"registryMirror": {"registries": {"registry.k8s.io": "http://m"}, "caCertificate": "x"}}, "must be an https"),
        (
            {"registryMirror": {"registries": {"registry.k8s.io": "https://m"}, "caCertificate": "not a pem"}},
            "must be one PEM certificate",
        ),
    ],
)
def test_artifacts_settings_that_cannot_work_are_refused_naming_the_key(
    artifacts: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"network": {"cidr": "10.0.0.0/24"}, "artifacts": artifacts}, stack="dev")
    assert message in str(refused.value)
    assert "artifacts" in str(refused.value)


def test_promotion_rewrites_only_the_bundle_digest_and_keeps_the_environments_path() -> None:
    before = (
        "config:\n  kubeadm-ha:network: {cidr: 10.0.0.0/24}\n  kubeadm-ha:artifacts:\n    source: bundle\n"
        f'    bundle: {{path: /srv/prod/b, sha256: "{"a" * 64}"}}\n'
    )
    setting = {("kubeadm-ha:artifacts", "bundle", "sha256"): "b" * 64}
    after = rewrite_settings(before, setting)
    assert after == before.replace("a" * 64, "b" * 64)
    assert expected_config(yaml.safe_load(before), setting) == effective_config(yaml.safe_load(after))


@pytest.mark.parametrize("existing", [False, True], ids=["new-directory", "empty-directory"])
def test_an_assemble_whose_download_fails_leaves_out_as_it_found_it_so_the_rerun_is_not_refused(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """A download that fails halfway left the files fetched so far in --out, and the re-run was refused as
    "not empty" (found typing the README's command on this offline machine). The network is a stand-in:
    this machine has none; kubeadm and its checksum are served, kubelet's checksum fails as a dropped
    connection would."""
    import hashlib

    from tools import bundle_fetch

    kubeadm = b"\x7fELF kubeadm"
    served = {"/kubeadm": kubeadm, "/kubeadm.sha256": hashlib.sha256(kubeadm).hexdigest().encode()}

    def get(url: str) -> bytes:
        for suffix, data in served.items():
            if url.endswith(suffix):
                return data
        raise bundle_fetch.BundleError(f"{url}: [Errno 104] Connection reset by peer")

    monkeypatch.setattr(bundle_fetch, "_get", get)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    argv = ["assemble", "--stack", "lab", "--project-dir", str(project), "--out", str(out)]
    for _ in range(2):
        code = tool.main(argv)
        err = capsys.readouterr().err
        assert code == 1
        assert "not empty" not in err
        assert "kubelet.sha256: [Errno 104] Connection reset by peer" in err, err
        assert out.exists() is existing
        assert not existing or not any(out.iterdir()), list(out.iterdir())
        assert f"{out}: removed what this run had written" in err
