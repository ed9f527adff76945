"""A `kubeadm init` that stops halfway, and the program's next run of the step, with real kubeadm.

Found by the real-cluster lab (tests/real/cluster-lab, 2 TCG cores): `kubeadm init` missed its
wait-control-plane deadline on a loaded VM, after its kubeconfig phase had written kubelet.conf, and the step's
guard (`[ -f kubelet.conf ]`) took the half-built cluster as done on the next `pulumi up`.

What is real: kubeadm (the default Kubernetes version, built by tests/real/build-binaries) running the program's
own `kubeadm-init` step script for dev's first control plane, with its stdin bundle, as pulumi-command runs it:
as root, in a private mount namespace over /etc and /var (tests/real/node_root.py) and in a network namespace
with only loopback, so its probes of the endpoint and the peers find nothing and it runs `kubeadm init`.

What this machine lacks: a kubelet and a container runtime. So the test's copy of the program's init.yaml sets
`nodeRegistration.ignorePreflightErrors: [all]` (preflight would stop at the missing runtime, before kubeadm
writes anything) and `timeouts` of 5 s for the kubelet and the API, and a `systemctl` stand-in that fails
keeps kubeadm's kubelet-start off the host. kubeadm then stops in wait-control-plane, as it did on the VM, with its
certificates, kubeconfigs and static pod manifests written.

Proven:
* the step fails there and leaves kubelet.conf; the next run of the same step does not call it done: it runs
  `kubeadm init --skip-phases=preflight`, and real kubeadm takes up what it finds (the kubeconfigs "Using
  existing", every certificate and key byte for byte) and stops at the same phase, wait-control-plane, not before;
* the control: the same init with its preflight checks refuses the begun node (FileAvailable: its
  static pod manifests exist),
  which is why the program skips them when it resumes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml

from render.kubeadm import INIT_CONFIG_PATH
from render.scripts import BundleFile, encode_bundle
from tests.integration.netns import Lab, Namespace
from tests.real.binaries import binary
from tests.real.documents import evaluated_at, init_step, step_files
from tests.real.node_root import DEFAULT_PATH, NodeRoot, Ran
from tests.stacks import stack_config
from tools.plan import script_of

pytestmark = pytest.mark.real

STACK = "dev"
STEP_TIMEOUT = 300
STARTED = "/var/lib/kubeadm-ha/kubeadm-bootstrap.started"
DONE = "/var/lib/kubeadm-ha/kubeadm-bootstrap.done"
LOG = "/var/log/kubeadm-ha/kubeadm-init.log"
OUTPUT = "/var/log/kubeadm-ha/kubeadm-init.output.log"
KEPT = ("/etc/kubernetes/admin.conf", "/etc/kubernetes/kubelet.conf", "/etc/kubernetes/pki/apiserver.crt")


def _without_kubelet(documents: str) -> str:
    """The program's init.yaml with what a node without kubelet or container runtime needs (module docstring)."""
    found = list(yaml.safe_load_all(documents))
    for document in found:
        if document.get("kind") == "InitConfiguration":
            document.setdefault("nodeRegistration", {})["ignorePreflightErrors"] = ["all"]
            document.setdefault("timeouts", {}).update(kubeletHealthCheck="5s", kubernetesAPICall="5s")
    return yaml.safe_dump_all(found, sort_keys=False)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    # Its log directory under pytest's, not a /tmp directory of its own that would stay behind.
    with Lab("resume", log_dir=tmp_path_factory.mktemp("resume-logs")) as lab:
        yield lab.namespace("cp-1")


def test_a_half_done_init_is_taken_up_again_by_the_next_run(
    namespace: Namespace, tmp_path_factory: pytest.TempPathFactory
) -> None:
    version = stack_config(STACK).kubernetes.version
    evaluation = evaluated_at(STACK, None)
    kubeadm = binary("kubeadm", version)
    step = evaluation.named(init_step(evaluation))
    host = step.name.removesuffix("-kubeadm-init")
    script = script_of(step)
    files = step_files(evaluation, step.name)
    bundle = encode_bundle(
        [
            BundleFile(path, _without_kubelet(content) if path == INIT_CONFIG_PATH else content, mode)
            for path, (mode, content) in sorted(files.items())
        ]
    )
    root = NodeRoot(tmp_path_factory.mktemp("resume"))
    root.place(step_files(evaluation, f"{host}-place-pki"))
    tools = tmp_path_factory.mktemp("resume-bin")
    (tools / "kubeadm").symlink_to(kubeadm)
    (tools / "systemctl").write_text('#!/bin/sh\necho "systemctl stand-in: no systemd in this lab: $*" >&2\nexit 1\n')
    (tools / "systemctl").chmod(0o755)

    def run_step() -> Ran:
        return root.run(
            ["bash", "-c", script, "kubeadm-ha-kubeadm-init"],
            netns=namespace.name,
            timeout=STEP_TIMEOUT,
            env={"PATH": f"{tools}:{DEFAULT_PATH}"},
            stdin=bundle,
        )

    # 1. kubeadm init stops in wait-control-plane, after writing kubelet.conf.
    started = time.monotonic()
    first = run_step()
    took = time.monotonic() - started
    assert first.returncode != 0, first.output
    assert "error execution phase wait-control-plane" in first.stderr, first.output
    # Where the VM lab's init stopped too: the admin ClusterRoleBinding, asked for as long as the InitConfiguration's
    # `timeouts.kubernetesAPICall` says (5 s here; kubeadm's default is 1m, the program's 4m: render/kubeadm.py).
    assert "could not bootstrap the admin user in file admin.conf" in first.stderr, first.output
    assert took < 45, f"kubeadm init took {took:.0f} s: timeouts.kubernetesAPICall of init.yaml was not its bound"
    assert root.exists("/etc/kubernetes/kubelet.conf")
    before = {path: root.read(path) for path in (*KEPT, *_pki_files(root))}
    first_log = root.read(LOG)
    assert "[preflight] Running pre-flight checks" in first_log

    # 2. The next run is not "already done": kubeadm init again, without preflight, taking up what it wrote.
    second = run_step()
    # A step given secrets keeps its output on the node and shows only its last lines (render/scripts.py).
    said = root.read(OUTPUT)
    assert "already done" not in second.stdout + second.stderr + said, second.output
    assert root.read(STARTED).strip() == "init" and not root.exists(DONE)
    assert f"the kubeadm init on {host} started and did not finish" in said, said
    assert second.returncode != 0, second.output  # no kubelet here: the same phase stops it again
    assert "error execution phase wait-control-plane" in second.stderr, second.output
    resumed = root.read(LOG)[len(first_log) :]
    assert "[preflight]" not in resumed, resumed
    for name in ("admin.conf", "super-admin.conf", "kubelet.conf", "controller-manager.conf", "scheduler.conf"):
        assert f'[kubeconfig] Using existing kubeconfig file: "/etc/kubernetes/{name}"' in resumed, resumed
    assert "[kubelet-start] Writing kubelet configuration" in resumed, resumed
    assert "error execution phase wait-control-plane" in resumed, resumed
    after = {path: root.read(path) for path in before}
    assert after == before, sorted(path for path in before if after[path] != before[path])
    assert root.read(STARTED).strip() == "init" and not root.exists(DONE)

    # 3. The control: with its preflight checks, kubeadm refuses the node it has begun.
    control_path = "/etc/kubernetes/kubeadm-ha/control.yaml"
    root.place({control_path: files[INIT_CONFIG_PATH]})  # the program's init.yaml as it is
    control = root.run(
        [kubeadm, "init", "--config", control_path, "--skip-token-print"],
        netns=namespace.name,
        timeout=STEP_TIMEOUT,
        env={"PATH": f"{tools}:{DEFAULT_PATH}"},
    )
    assert control.returncode != 0, control.output
    assert "[ERROR FileAvailable--etc-kubernetes-manifests-kube-apiserver.yaml]" in control.stderr, control.output
    assert "[ERROR FileAvailable--etc-kubernetes-manifests-etcd.yaml]" in control.stderr, control.output


def _pki_files(root: NodeRoot) -> list[str]:
    pki = root.path("/etc/kubernetes/pki")
    return sorted(f"/etc/kubernetes/pki/{path.relative_to(pki)}" for path in pki.rglob("*") if path.is_file())
