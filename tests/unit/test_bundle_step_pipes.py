"""The bundle step's checks of what a command prints (render/artifacts.py) read the command's whole output.

The step runs under `set -o pipefail`. It checked `kubectl version --client | grep -qwF v1.37.2` and `ctr images ls
--quiet | grep -qxF NAME`: `grep -q` exits at the first match, a command still writing then dies of SIGPIPE, and the
pipeline fails although the text was there. The real kubectl 1.37.2 writes its client version and then kustomize's
in two writes: 63 of 300 runs of that pipeline failed on this machine; `ctr images ls --quiet` writes one line per
image (the CRI adds a sha256:<id> reference for each), so on a node with kubeadm's seven images a check for one that
is listed first could fail the same way: "imported, but containerd has no image".

Here the commands are stand-ins that write the expected line, pause, then write the next (a writer still busy when
grep has seen enough), run through the lines the program renders, with the step's own functions and prologue.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from model.bundle import Entry, Manifest
from render.artifacts import BundleInstall, bundle_install_script
from render.scripts import Script

VERSION = "1.37.2"
PAUSE = "registry.k8s.io/pause:3.10.2"
DIGEST = "0" * 64


def _install() -> BundleInstall:
    entries = (
        Entry("bin/kubectl", DIGEST, 1, "binary", "kubectl", VERSION),
        Entry("bin/ctr", DIGEST, 1, "binary", "ctr", "2.2.9"),
        Entry("images/pause.tar", DIGEST, 1, "image", PAUSE, "3.10.2"),
    )
    return BundleInstall(Manifest(VERSION, "amd64", entries), DIGEST, "bundle", False, "cp")


def _writer(path: Path, first: str, then: str) -> None:
    """A program that writes `first`, and `then` a moment later (in a second write)."""
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{first}'\nsleep 0.3\nprintf '%s\\n' '{then}'\n")
    path.chmod(0o755)


def _run_lines(tmp_path: Path, where: str, kubectl: str) -> subprocess.CompletedProcess[str]:
    """The step's check lines that mention `where`, run with its functions and prologue, stand-ins first on PATH."""
    step = bundle_install_script("cp-1", _install())
    # The checks themselves: the lines that fail the step when the text is not printed.
    lines = tuple(
        line.strip().replace("/usr/bin/kubectl", kubectl)
        for line in step.body
        if where in line and "kha_bundle_fail" in line
    )
    assert lines, f"no line of the step mentions {where!r}"
    script = Script(step="bundle", host="cp-1", done_when="false", body=lines, functions=step.functions, on_node=False)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", script.render(), "bundle"], capture_output=True, text=True, env=env, timeout=30, check=False
    )


def test_the_version_check_reads_all_that_kubectl_writes(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    _writer(kubectl, f"Client Version: v{VERSION}", "Kustomize Version: v5.8.1")
    ran = _run_lines(tmp_path, "version --client", str(kubectl))
    assert ran.returncode == 0, ran.stderr
    assert "kubeadm-ha: bundle done on cp-1" in ran.stdout


def test_the_version_check_still_refuses_another_version(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    _writer(kubectl, "Client Version: v1.36.0", "Kustomize Version: v5.8.1")
    ran = _run_lines(tmp_path, "version --client", str(kubectl))
    assert ran.returncode == 1, ran.stderr
    assert f"kubeadm-ha: bundle on cp-1: bin/kubectl is not kubectl v{VERSION}" in ran.stderr, ran.stderr


def test_the_image_check_reads_all_that_ctr_lists(tmp_path: Path) -> None:
    _writer(tmp_path / "ctr", PAUSE, f"sha256:{'1' * 64}")
    ran = _run_lines(tmp_path, "images ls", "/usr/bin/kubectl")
    assert ran.returncode == 0, ran.stderr
    assert "kubeadm-ha: bundle done on cp-1" in ran.stdout


def test_the_image_check_still_refuses_an_image_containerd_lacks(tmp_path: Path) -> None:
    _writer(tmp_path / "ctr", "registry.k8s.io/pause:3.9", f"sha256:{'1' * 64}")
    ran = _run_lines(tmp_path, "images ls", "/usr/bin/kubectl")
    assert ran.returncode == 1, ran.stderr
    assert f"images/pause.tar: imported, but containerd has no image {PAUSE}" in ran.stderr, ran.stderr
