"""A 1-vCPU control plane, judged by real kubeadm's preflight: the program's init document makes the vCPU check
a warning, and only for a stack that sized its control planes below kubeadm's 2.

kubeadm runs its real checks (`kubeadm init phase preflight --dry-run`) with one CPU (`taskset -c 0`; Go's
runtime.NumCPU counts the CPUs of the affinity mask), alone in a network namespace. Every other check fails
here (no container runtime, no kubelet), so the verdict read is the NumCPU line kubeadm prints.

Binary: `tests/real/build-binaries kubeadm` (run-all.sh builds it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from model.versions import DEFAULT_KUBERNETES
from tests.real.binaries import binary
from tests.real.documents import evaluated_at, init_documents
from tests.stacks import stack_config
from tools.plan import mask

pytestmark = pytest.mark.real

PREFLIGHT_TIMEOUT = 120
ONE_CPU = "the number of available CPUs 1 is less than the required 2"


def preflight_with_one_cpu(stack: str, tmp_path: Path) -> str:
    config = tmp_path / "init.yaml"
    config.write_text(init_documents(evaluated_at(stack, None)))
    config.chmod(0o600)
    argv = ["unshare", "--net", "taskset", "-c", "0", binary("kubeadm", DEFAULT_KUBERNETES)]
    argv += ["init", "phase", "preflight", "--dry-run", "--config", str(config)]
    # kubeadm's dry run writes under /etc/kubernetes/tmp unless told where.
    env = {**os.environ, "KUBEADM_INIT_DRYRUN_DIR": str(tmp_path / "dry-run")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT, check=False, env=env)
    output = mask(result.stdout + result.stderr)
    # Not a verdict on the document unless kubeadm got as far as its checks.
    assert "[preflight] Running pre-flight checks" in output, output
    return output


def test_a_one_vcpu_control_plane_passes_kubeadms_vcpu_check_as_a_warning(tmp_path: Path) -> None:
    assert stack_config("smallest").control_plane.cpus == 1
    output = preflight_with_one_cpu("smallest", tmp_path)
    assert f"[WARNING NumCPU]: {ONE_CPU}" in output, output
    assert "[ERROR NumCPU]" not in output, output


def test_a_stack_sized_for_kubeadm_keeps_its_vcpu_check_an_error(tmp_path: Path) -> None:
    # The control: staging's control planes have kubeadm's 2 vCPUs, so its documents ask kubeadm to skip
    # nothing, and on a 1-CPU node kubeadm refuses.
    assert stack_config("staging").control_plane.cpus >= 2
    output = preflight_with_one_cpu("staging", tmp_path)
    assert f"[ERROR NumCPU]: {ONE_CPU}" in output, output
