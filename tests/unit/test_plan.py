"""The offline plan command: what an operator reads before promoting a change."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tools.plan import MARKER, main

ROOT = Path(__file__).resolve().parents[2]
TOKEN = re.compile(r"\b[a-z0-9]{6}\.[a-z0-9]{16}\b")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plan")
    for stack in ("staging", "prod"):
        assert main([stack, "--out", str(base / stack)]) == 0
    return {"staging": base / "staging", "prod": base / "prod"}


ENCRYPTION_KEY = re.compile(r"^\s*secret: [A-Za-z0-9+/]{43}=$", re.M)


def all_text(directory: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(directory.rglob("*")) if path.is_file())


def test_nodes_are_laid_out_by_role_in_execution_order(plans: dict[str, Path]) -> None:
    nodes = plans["staging"] / "nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["cp-1", "cp-2", "cp-3", "lb-1", "lb-2", "worker-1", "worker-2"]
    first = sorted(p.name for p in (nodes / "cp-1").iterdir())
    assert first[:5] == ["00-cloud-init", "01-ready", "02-place-pki", "03-kubeadm-init", "04-cni-calico"]
    # The first control plane also runs, for the others, the steps that need admin.conf.
    assert any(name.endswith("-staging-worker-1-join-token") for name in first)
    assert any(name.endswith("-staging-cp-3-membership") for name in first)
    assert sorted(p.name for p in (nodes / "worker-1").iterdir()) == [
        *("00-cloud-init", "01-ready", "02-kubeadm-join"),
        *("03-kubelet-serving", "04-node-files"),  # issue 20: its serving certificate from the CA, its file modes
    ]
    lb = nodes / "lb-1" / "02-configure-lb"
    haproxy = (lb / "files" / "etc" / "haproxy" / "haproxy.cfg").read_text()
    assert haproxy.count("server staging-cp-") == 3 * 2  # the checked and the fail-open backend
    assert (lb / "files" / "etc" / "keepalived" / "keepalived.conf").is_file()
    assert "0600 /etc/kubernetes/pki/ca.key" in (nodes / "cp-2" / "02-place-pki" / "files.txt").read_text()
    assert (nodes / "cp-1" / "00-cloud-init" / "user-data").read_text().startswith("#cloud-config")


def test_secrets_are_masked_unless_asked_for(plans: dict[str, Path], tmp_path: Path) -> None:
    text = all_text(plans["staging"])
    assert "PRIVATE KEY-----\n" not in text.replace(MARKER, "")
    assert not TOKEN.search(text)
    assert MARKER in (plans["staging"] / "nodes/cp-1/02-place-pki/files/etc/kubernetes/pki/ca.key").read_text()
    # The Secrets' encryption key (render/encryption.py): base64 in an EncryptionConfiguration, in every
    # kubeadm and encryption step's bundle.
    assert not ENCRYPTION_KEY.search(text)
    main(["staging", "--out", str(tmp_path / "clear"), "--show-secrets"])
    clear = (tmp_path / "clear/nodes/cp-1/02-place-pki/files/etc/kubernetes/pki/ca.key").read_text()
    assert clear.startswith("-----BEGIN EC PRIVATE KEY-----")
    assert TOKEN.search(
        (tmp_path / "clear/nodes/cp-1/03-kubeadm-init/files/etc/kubernetes/kubeadm-ha/init.yaml").read_text()
    )
    assert ENCRYPTION_KEY.search(all_text(tmp_path / "clear"))


def test_summary_lists_phases_and_the_longest_chain(plans: dict[str, Path]) -> None:
    summary = (plans["staging"] / "summary.md").read_text()
    phases = re.findall(r"^(\d+)\. (.*)$", summary, flags=re.MULTILINE)
    index = {step: int(level) for level, steps in phases for step in re.findall(r"`([^`]+)`", steps)}
    assert index["staging-cp-1-kubeadm-init"] > index["staging-lb-1-configure-lb"]
    assert index["staging-cp-2-kubeadm-join"] > index["staging-cp-1-cni-calico"] > index["staging-cp-1-kubeadm-init"]
    assert index["staging-cp-3-kubeadm-join"] > index["staging-cp-2-kubeadm-join"]
    assert index["staging-worker-1-kubeadm-join"] == index["staging-cp-2-kubeadm-join"]
    assert index["staging-cp-3-kubeadm-join"] > index["staging-cp-2-membership"] > index["staging-cp-2-kubeadm-join"]
    # Joins (10), the kubelet serving approval (1), then the encryption phases and settings, one control plane at
    # a time (16): test_benchmark.py.
    assert "## Longest chain of remote steps (27)" in summary
    assert "| **total** |" in summary


def test_graph_is_written_and_rendered(plans: dict[str, Path]) -> None:
    dot = (plans["staging"] / "graph.dot").read_text()
    assert '"staging-cp-1-kubeadm-init" -> "staging-cp-1-cni-calico";' in dot
    assert '"staging-cp-2-membership" -> "staging-cp-3-join-token";' in dot
    assert '"staging-cp-3-join-token" -> "staging-cp-3-reset";' in dot
    assert '"staging-cp-3-reset" -> "staging-cp-3-kubeadm-join";' in dot
    if shutil.which("dot") is None:
        pytest.skip("graphviz is not installed: no SVG")
    assert (plans["staging"] / "graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_plan_is_reproducible_and_diffable_between_stacks(plans: dict[str, Path], tmp_path: Path) -> None:
    main(["staging", "--out", str(tmp_path / "again")])
    again, first = tmp_path / "again", plans["staging"]
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    # Same node, same step, both stacks: a promotion diff lines up.
    staging_steps = {p.relative_to(plans["staging"]) for p in (plans["staging"] / "nodes").glob("cp-*/*")}
    prod_steps = {p.relative_to(plans["prod"]) for p in (plans["prod"] / "nodes").glob("cp-*/*")}
    assert staging_steps & prod_steps
