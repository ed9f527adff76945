"""Issue 19, part 1 (engine lab): real previews of staging, prod and prod-multihost.

The real CLI, Python language host and provider plugins (tests/real/build-binaries), installed from their files
into a fresh home, downloads disabled (tests/real/engine/plugins.py). Nothing real is deployed: a promotion
source's last deployment is built offline and imported into the real backend (stack_state.py).

1. staging (from dev) and prod (from staging): with the source's outputs exactly as its `pulumi up` of its stack
   file and this checkout leaves them, the real gate passes and the preview plans what the offline evaluation
   registers. With the source running another Kubernetes version, `pulumi preview` and `pulumi up` exit non-zero
   with the gate's message naming `kubernetes.version`, and nothing of the program's is created.
2. the routine re-apply: staging's own imported outputs equal what it deploys while dev runs another CNI manifest
   and program; the preview passes and says so. The same stack recorded as run by another program revision is
   refused: the gate decides on the imported state.
3. prod-multihost: its `qemu+ssh` URIs, unchanged, reach a libvirtd through one sshd per hypervisor name, each in
   a network namespace (ssh_hypervisors.py); the CLI runs in an operator namespace. With the stack file's hostKeys
   set to those sshds' keys the real preview succeeds and every sshd logs the operator's login; with two keys
   swapped the real provider refuses with a host key mismatch, non-zero, and no sshd lets anyone in.

Every preview's wall time is printed (pytest -rP). Root; gated like the engine lab (KUBEADM_HA_ENGINE_LAB=1).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.release import PROGRAM_DIGEST_OUTPUT, RELEASE_OUTPUT, program_digest
from tests.integration.conftest import require_programs, require_root
from tests.real.engine import plugins
from tests.real.engine.cli import Run, UserSession
from tests.real.engine.libvirtd import Libvirtd, scratch_libvirtd
from tests.real.engine.ssh_hypervisors import HypervisorLab, OperatorSession, give_operator_key, ssh_hypervisors
from tests.real.engine.stack_state import changed, deployed_outputs, import_outputs
from tests.real.engine.test_engine_preview import counts_by_type
from tools.offline import evaluate

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[3]
PREVIEW_TIMEOUT_SECONDS = 600  # a few seconds measured; the bound is for a loaded machine
CHAIN = {"staging": "dev", "prod": "staging"}
MULTIHOST = "prod-multihost"
ENGINE_OWN = {"pulumi:pulumi:Stack", "pulumi:providers:pulumi"}
STACK_REFERENCE = "pulumi:pulumi:StackReference"
OTHER_PROGRAM = "sha256:" + "a" * 64
OLDER_PROGRAM = "sha256:" + "b" * 64
TIMINGS: dict[str, float] = {}


def prepared(session: UserSession, libvirt: Libvirtd) -> UserSession:
    session.setup()
    session.binds[Path("/run/libvirt")] = libvirt.directory / "run"
    session.use_virtualenv(Path(sys.prefix))
    plugins.install_for(session)
    (session.home / ".pulumi-kubeadm-ha").mkdir()  # the README's mkdir: Pulumi.yaml's backend directory
    assert program_digest(session.project) == program_digest(ROOT)  # the user's copy is this checkout
    return session


@pytest.fixture
def libvirt() -> Iterator[Libvirtd]:
    require_root()
    require_programs("libvirtd", "virsh", "unshare", "mount", "ip")
    plugins.cli_directory(), plugins.plugin_files()  # the toolchain first: skip before starting anything
    with scratch_libvirtd("kha-stacks-") as daemon:
        yield daemon


@pytest.fixture
def user(tmp_path: Path, libvirt: Libvirtd) -> UserSession:
    return prepared(UserSession(tmp_path, plugins.built("pulumi")), libvirt)


def timed(name: str, run: Run) -> Run:
    TIMINGS[name] = run.seconds
    print(f"timing: {name}: {run.seconds:.1f} s (exit {run.returncode})")  # shown with pytest -rP
    return run


def preview_json(user: UserSession, stack: str, label: str) -> dict[str, Any]:
    run = timed(label, user.pulumi("preview", "--stack", stack, "--json", timeout=PREVIEW_TIMEOUT_SECONDS))
    assert run.returncode == 0, run.describe()
    preview: dict[str, Any] = json.loads(run.stdout)
    errors = [d for d in preview.get("diagnostics") or [] if d.get("severity") == "error"]
    assert errors == [], errors
    assert "PRIVATE KEY" not in run.output
    return preview


def planned(preview: dict[str, Any]) -> tuple[Counter[str], list[str]]:
    """(creates by type, the URNs of read steps): only creates, plus the gate's one read (and, for a stack whose
    last deployment was imported, its root stack resource unchanged)."""
    steps = preview["steps"]
    ops = Counter(step["op"] for step in steps)
    assert set(ops) <= {"create", "read", "same"}, ops
    same = [step["urn"].split("::")[2] for step in steps if step["op"] == "same"]
    assert same in ([], ["pulumi:pulumi:Stack"]), same
    reads = [step["urn"] for step in steps if step["op"] == "read"]
    return counts_by_type([step["urn"] for step in steps if step["op"] == "create"]), reads


def info_messages(preview: dict[str, Any]) -> list[str]:
    return [d.get("message", "") for d in preview.get("diagnostics") or [] if d.get("severity") == "info"]


def program_resources(user: UserSession, stack: str) -> list[str]:
    """Types in `stack`'s state beyond the engine's own and the gate's read of its source."""
    exported = user.pulumi("stack", "export", "--stack", stack)
    assert exported.returncode == 0, exported.describe()
    resources = json.loads(exported.stdout)["deployment"].get("resources") or []
    return [r["type"] for r in resources if r["type"] not in {*ENGINE_OWN, STACK_REFERENCE}]


def assert_refused(run: Run, *needles: str, program_cancelled: bool = False) -> None:
    """Non-zero (not the bound running out), each needle in the output, and no traceback of the program's.

    `program_cancelled`: a provider error ends the preview while the program may still be registering; the engine
    then cancels it and the SDK's pulumi-language-python-exec prints a KeyboardInterrupt traceback of its own
    (seen with v3.259.0 in about half of the runs), which is not the program failing.
    """
    assert run.returncode not in (0, -1), run.describe()  # -1: the command's bound ran out
    for needle in needles:
        assert needle in run.output, f"{needle!r} not in:\n{run.describe()}"
    if program_cancelled:
        assert "Traceback" not in run.output or "KeyboardInterrupt" in run.output, run.describe()
        assert "/components/" not in run.output and "__main__.py" not in run.output, run.describe()
    else:
        assert "Traceback" not in run.output, run.describe()


@pytest.mark.parametrize("stack", sorted(CHAIN))
def test_the_real_gate_passes_the_sources_release_and_refuses_any_other(
    user: UserSession, libvirt: Libvirtd, stack: str
) -> None:
    source = CHAIN[stack]
    running = deployed_outputs(source, ROOT)
    import_outputs(user, source, running)
    created = user.pulumi("stack", "init", stack)
    assert created.returncode == 0, created.describe()

    preview = preview_json(user, stack, f"{stack} preview, {source} runs its release")
    creates, reads = planned(preview)
    assert [urn.rsplit("::", 1)[1] for urn in reads] == ["promotion-source"], reads
    assert reads[0].split("::")[2] == STACK_REFERENCE
    offline = Counter(r.type for r in evaluate(stack, project_dir=ROOT, preview=True).resources)
    assert creates == offline, {"only in the preview": creates - offline, "only offline": offline - creates}
    assert not [m for m in info_messages(preview) if "promotion gate" in m]  # a promotion: nothing to note

    version = running[RELEASE_OUTPUT].value["kubernetesVersion"]
    older = version.rsplit(".", 1)[0] + "." + str(int(version.rsplit(".", 1)[1]) - 1)
    import_outputs(user, source, changed(running, release={"kubernetesVersion": older}))
    gate = f"promotion gate (promotion.from: {source}): stack {stack} refuses to deploy a release"
    difference = f"kubernetes.version: {stack} would deploy {version}; {source} runs {older}"
    refused = timed(
        f"{stack} preview, {source} runs {older}",
        user.pulumi("preview", "--stack", stack, timeout=PREVIEW_TIMEOUT_SECONDS),
    )
    assert_refused(refused, gate, difference, f"pulumi up --stack {source}")
    up = user.pulumi("up", "--stack", stack, "--yes", "--skip-preview", timeout=PREVIEW_TIMEOUT_SECONDS)
    assert_refused(up, gate, difference)
    print(refused.describe())
    assert program_resources(user, stack) == []
    assert (libvirt.names("domain"), libvirt.names("network"), libvirt.names("pool")) == ([], [], [])


def test_a_routine_re_apply_passes_while_the_source_runs_another(user: UserSession, libvirt: Libvirtd) -> None:
    staging_runs = deployed_outputs("staging", ROOT)
    dev_ahead = changed(deployed_outputs("dev", ROOT), release={"cniVersion": "v3.99.0"}, digest=OTHER_PROGRAM)
    import_outputs(user, "dev", dev_ahead)
    import_outputs(user, "staging", staging_runs)
    assert staging_runs[PROGRAM_DIGEST_OUTPUT].value == program_digest(ROOT)

    preview = preview_json(user, "staging", "staging preview, re-apply while dev runs another")
    (note,) = [m for m in info_messages(preview) if "promotion gate" in m]
    assert "re-applies the release and program it runs" in note and "dev runs another" in note, note
    assert "v3.99.0" in note and OTHER_PROGRAM in note, note
    creates, _ = planned(preview)
    assert creates["command:remote:Command"] > 0, creates

    # The contrast: staging recorded as run by another program revision; this checkout is then a change,
    # which dev (running yet another program) does not vouch for.
    import_outputs(user, "staging", changed(staging_runs, digest=OLDER_PROGRAM))
    refused = timed(
        "staging preview, staging ran another program",
        user.pulumi("preview", "--stack", "staging", timeout=PREVIEW_TIMEOUT_SECONDS),
    )
    assert_refused(refused, "promotion gate (promotion.from: dev)", f"staging runs {OLDER_PROGRAM}")
    assert "tools.promote staging --find-revision" in refused.output, refused.describe()
    assert (libvirt.names("domain"), libvirt.names("network")) == ([], [])


def multihost_config(project: Path, keys: dict[str, str]) -> str:
    """Pulumi.prod-multihost.yaml as shipped, each hypervisor's hostKey replaced by `keys[name]`."""
    document = yaml.safe_load((project / f"Pulumi.{MULTIHOST}.yaml").read_text())
    for hypervisor in document["config"]["kubeadm-ha:hypervisors"]:
        hypervisor["hostKey"] = keys[hypervisor["name"]]
    return yaml.safe_dump(document, sort_keys=False)


def accepted(hv_lab: HypervisorLab) -> dict[str, int]:
    return {name: hv.sshd.log().count("Accepted publickey for kubeadm") for name, hv in hv_lab.hypervisors.items()}


def test_prod_multihost_preview_reaches_each_hypervisor_over_ssh_and_pins_its_key(tmp_path: Path) -> None:
    require_root()
    require_programs("libvirtd", "virsh", "unshare", "mount", "ip", "ssh-keygen", "/usr/sbin/sshd")
    plugins.cli_directory(), plugins.plugin_files()
    shipped = yaml.safe_load((ROOT / f"Pulumi.{MULTIHOST}.yaml").read_text())["config"]
    uris = {hv["name"]: hv["uri"] for hv in shipped["kubeadm-ha:hypervisors"]}
    work = Path(tempfile.mkdtemp(prefix="kha-multihost-", dir="/var/tmp"))
    try:
        work.chmod(0o700)
        with (
            scratch_libvirtd("kha-stacks-") as libvirt,
            ssh_hypervisors(uris, work / "hv", libvirt.directory / "run") as hv_lab,
        ):
            user = OperatorSession(tmp_path, plugins.built("pulumi"), netns=hv_lab.operator.name)
            hosts = work / "hosts"
            hosts.write_text(hv_lab.hosts_file())
            user.binds[Path("/etc/hosts")] = hosts
            prepared(user, libvirt)
            give_operator_key(user, hv_lab.operator_key)
            keys = {name: hv.host_key.public for name, hv in hv_lab.hypervisors.items()}
            (user.project / f"Pulumi.{MULTIHOST}.yaml").write_text(multihost_config(user.project, keys))
            import_outputs(user, "staging", deployed_outputs("staging", ROOT))  # its promotion source
            created = user.pulumi("stack", "init", MULTIHOST)
            assert created.returncode == 0, created.describe()

            try:
                preview = preview_json(user, MULTIHOST, f"{MULTIHOST} preview over ssh, pinned keys")
            except AssertionError:
                print(hv_lab.logs())
                raise
            creates, _ = planned(preview)
            tiers = ("loadBalancer", "etcd", "controlPlane", "workers")
            nodes = sum(shipped[f"kubeadm-ha:{tier}"]["replicas"] for tier in tiers)
            assert creates["libvirt:index/domain:Domain"] == nodes, creates
            providers = [
                s for s in preview["steps"] if s["urn"].split("::")[2].split("$")[-1] == "pulumi:providers:libvirt"
            ]
            assert sorted(s["urn"].rsplit("::", 1)[1] for s in providers) == [f"{n}-libvirt" for n in sorted(uris)]
            for step in providers:  # the pinned file, with $HOME for the provider to expand
                name = step["urn"].rsplit("::", 1)[1].removesuffix("-libvirt")
                wanted = f"{uris[name]}?knownhosts=$HOME/.cache/kubeadm-ha/known_hosts/kubeadm-ha/{MULTIHOST}/{name}"
                assert step["newState"]["inputs"]["uri"] == wanted, step["newState"]["inputs"]
            # Each provider connected through its own sshd, as kubeadm, by the operator's key.
            logins = accepted(hv_lab)
            assert all(count >= 1 for count in logins.values()), (logins, hv_lab.logs())
            for name, hv in hv_lab.hypervisors.items():
                pinned = user.home / ".cache/kubeadm-ha/known_hosts/kubeadm-ha" / MULTIHOST / name
                assert pinned.read_text() == hv.known_hosts_line() + "\n"

            swapped = {**keys, "hv-a": keys["hv-b"], "hv-b": keys["hv-a"]}
            (user.project / f"Pulumi.{MULTIHOST}.yaml").write_text(multihost_config(user.project, swapped))
            refused = timed(
                f"{MULTIHOST} preview over ssh, hv-a and hv-b keys swapped",
                user.pulumi("preview", "--stack", MULTIHOST, timeout=PREVIEW_TIMEOUT_SECONDS),
            )
            assert_refused(refused, "ssh: handshake failed: knownhosts: key mismatch", program_cancelled=True)
            assert "failed to connect to remote host 'hv-a.lan.example'" in refused.output or (
                "failed to connect to remote host 'hv-b.lan.example'" in refused.output
            ), refused.describe()
            print(refused.describe())
            after = accepted(hv_lab)
            assert after["hv-a"] == logins["hv-a"] and after["hv-b"] == logins["hv-b"], (logins, after)
            assert program_resources(user, MULTIHOST) == []
            assert libvirt.names("domain") == [], libvirt.names("domain")
    finally:
        shutil.rmtree(work, ignore_errors=True)
