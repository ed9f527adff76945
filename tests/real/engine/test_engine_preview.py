"""The real Pulumi engine in the suite (CI): a preview of the dev stack and a bad config refused (issue 19, part 1).

The real CLI, Python language host and provider plugins built by `tests/real/build-binaries` (the suite's set,
built by tests/run-all.sh), installed from their files into a fresh home; downloads disabled. A libvirtd of the
test's own answers: the libvirt provider connects when configured, even in a preview. Inside the commands' mount
namespace its socket directory is bound over /run/libvirt, so the dev stack's default `qemu:///system` reaches it
and the stack file is used unchanged. Root; skips without the toolchain or libvirtd, fails under CI=true.

1. dev from an empty HOME, set up with the README's own commands: `pulumi preview` succeeds with no error, plans
   only creates, and plans per resource type exactly what the offline evaluation (tools.offline, what tools.plan
   prints) registers.
2. a stack file with invalid values: `pulumi preview` and `pulumi up` exit non-zero naming each key path, with no
   traceback; the state holds no resource and the libvirtd no domain, network, pool or volume.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import require_programs, require_root
from tests.real.engine import plugins, toolchain
from tests.real.engine.cli import UserSession, readme_setup_commands
from tests.real.engine.libvirtd import Libvirtd, scratch_libvirtd
from tools.offline import evaluate

pytestmark = pytest.mark.real

PREVIEW_TIMEOUT_SECONDS = 600  # about 2-20 s measured; the bound is for a machine under load
BAD_KEYS = ("controlPlane.replicas", "kubernetes.version")
PASSPHRASE_FILE = "export PULUMI_CONFIG_PASSPHRASE_FILE=~/.kubeadm-ha-passphrase\n"  # the README's, made at setup


@pytest.fixture
def libvirt() -> Iterator[Libvirtd]:
    require_root()
    require_programs("libvirtd", "virsh", "unshare", "mount", "openssl")
    plugins.cli_directory(), plugins.plugin_files()  # the toolchain first: skip before starting anything
    with scratch_libvirtd("kha-preview-") as daemon:
        yield daemon


@pytest.fixture
def user(tmp_path: Path, libvirt: Libvirtd) -> UserSession:
    session = UserSession(tmp_path, plugins.built("pulumi")).setup()
    session.binds[Path("/run/libvirt")] = libvirt.directory / "run"
    session.use_virtualenv(Path(sys.prefix))  # made from requirements-dev.txt, which includes requirements.txt
    plugins.install_for(session)
    return session


def counts_by_type(urns: list[str]) -> Counter[str]:
    """Resource types of `urns`, leaving out the engine's default providers (`default_1_2_1` and the like)."""
    counted: Counter[str] = Counter()
    for urn in urns:
        _, _, type_path, name = urn.split("::", 3)
        kind = type_path.split("$")[-1]
        if not (kind.startswith("pulumi:providers:") and name.startswith("default")):
            counted[kind] += 1
    return counted


def test_dev_preview_from_an_empty_home_plans_what_the_offline_plan_registers(
    user: UserSession, libvirt: Libvirtd
) -> None:
    run = user.shell(
        readme_setup_commands("dev") + "pulumi preview --stack dev --json --non-interactive >preview.json\n",
        timeout=PREVIEW_TIMEOUT_SECONDS,
    )
    assert run.returncode == 0, run.describe() + (user.project / "preview.json").read_text()[-4000:]
    print(f"stack init + preview: {run.seconds:.1f} s")  # shown with pytest -rP
    preview = json.loads((user.project / "preview.json").read_text())
    diagnostics = preview.get("diagnostics") or []
    assert [d for d in diagnostics if d.get("severity") == "error"] == [], diagnostics
    # Every plugin came from its file, at the version its SDK asks for: no engine warning about plugins.
    assert [d for d in diagnostics if "plugin" in d.get("message", "").lower()] == [], diagnostics
    steps = preview["steps"]
    assert {step["op"] for step in steps} == {"create"}, sorted({step["op"] for step in steps})

    planned = counts_by_type([step["urn"] for step in steps])
    offline = Counter(resource.type for resource in evaluate("dev", preview=True).resources)
    assert planned == offline, {"only in the preview": planned - offline, "only offline": offline - planned}
    assert sum(planned.values()) > 50, planned  # the whole dev cluster, not an early stop
    assert "PRIVATE KEY" not in (user.project / "preview.json").read_text() + run.output
    # The engine's own account of what ran: the CLI and the Python language host of one release (the pair
    # toolchain.py builds side by side), each provider plugin at the version its SDK asks for.
    about = user.shell(f"{PASSPHRASE_FILE}pulumi about --json --stack dev --non-interactive\n")
    assert about.returncode == 0, about.describe()
    engine = json.loads(about.stdout)
    assert engine["cliAbout"]["version"] == toolchain.PULUMI_CLI_VERSION, engine["cliAbout"]
    ran = {(p["kind"], p["name"], p["version"]) for p in engine["plugins"]}
    wanted = {("resource", name, version) for name, (version, _) in plugins.plugin_files().items()}
    assert ran == {("language", "python", toolchain.LANGUAGE_HOST_VERSION), *wanted}, ran
    # A preview changes nothing on the hypervisor.
    assert libvirt.names("domain") == [] and libvirt.names("network") == [], libvirt.remove_everything()


def test_bad_config_is_refused_by_the_real_cli_with_each_key_path_and_creates_nothing(
    user: UserSession, libvirt: Libvirtd
) -> None:
    config = yaml.safe_load((user.project / "Pulumi.dev.yaml").read_text())
    config["config"]["kubeadm-ha:controlPlane"] = {"replicas": 2}
    config["config"]["kubeadm-ha:kubernetes"] = {"version": "1.30.1"}
    (user.project / "Pulumi.bad.yaml").write_text(yaml.safe_dump(config))
    (user.home / ".pulumi-kubeadm-ha").mkdir()  # the README's mkdir: Pulumi.yaml's backend directory
    run = user.pulumi("stack", "init", "bad")
    assert run.returncode == 0, run.describe()
    for argv in (("preview", "--stack", "bad", "--diff"), ("up", "--stack", "bad", "--yes", "--skip-preview")):
        refused = user.pulumi(*argv, timeout=PREVIEW_TIMEOUT_SECONDS)
        assert refused.returncode != 0, refused.describe()
        for key in BAD_KEYS:
            assert key in refused.output, refused.describe()
        assert "Traceback" not in refused.output, refused.describe()
        print(refused.describe())  # shown with pytest -rP

    exported = user.pulumi("stack", "export", "--stack", "bad")
    assert exported.returncode == 0, exported.describe()
    resources = json.loads(exported.stdout)["deployment"].get("resources") or []
    # Left: the root stack and the engine's own default provider of its builtins (the program reads its previous
    # deployment with `pulumi:pulumi:readStackResourceOutputs` before it validates the config): nothing of the
    # program's, nothing on a hypervisor.
    engine_own = {"pulumi:pulumi:Stack", "pulumi:providers:pulumi"}
    assert [r["type"] for r in resources if r["type"] not in engine_own] == [], exported.stdout[-4000:]
    pools = libvirt.virsh("pool-list", "--all", "--name").stdout.split()
    assert (libvirt.names("domain"), libvirt.names("network"), pools) == ([], [], [])
