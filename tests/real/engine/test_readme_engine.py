"""The README's commands, run for real with the Pulumi CLI from a fresh HOME (section 2 of issue 10).

`pulumi login --local`, `pulumi stack init STACK`, `pulumi preview --stack STACK --diff`, exactly as the
README writes them, in a copy of the project, with nothing in HOME: no backend directory, no plugins, no
credentials. The preview also needs the language host and the three provider plugins installed into that
fresh PULUMI_HOME (`pulumi plugin install resource NAME VERSION --file PATH`) and a libvirtd to answer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.real.engine import toolchain
from tests.real.engine.cli import ROOT, UserSession, require_tool, stack_files
from tools.offline import evaluate

PLUGINS = ("pulumi-resource-command", "pulumi-resource-tls", "pulumi-resource-libvirt")
_URN = re.compile(r"\[urn=(urn:pulumi:[^\]]+)\]")


@pytest.fixture
def user(tmp_path: Path) -> UserSession:
    return UserSession(tmp_path, require_tool("pulumi")).setup()


def readme_setup_commands(stack: str) -> str:
    """The README's "Create a cluster" commands for `stack`, as written, up to (not including) `pulumi up`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Create a cluster", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("pulumi up")]
    assert any(line.startswith("pulumi stack init dev") for line in lines), block
    return "\n".join(re.sub(r"\bdev\b", stack, line) for line in lines) + "\n"


@pytest.mark.parametrize("stack", stack_files())
def test_readme_login_and_stack_init_on_a_fresh_machine(user: UserSession, stack: str) -> None:
    # Failed before the fix with `stat ~/.pulumi-kubeadm-ha: no such file or directory` (pulumi/pulumi#15841).
    setup = user.shell(readme_setup_commands(stack))
    assert setup.returncode == 0, setup.describe()
    # The state lands in the backend the README names for the project (Pulumi.yaml's backend.url).
    assert (user.home / ".pulumi-kubeadm-ha" / ".pulumi" / "stacks" / "kubeadm-ha" / f"{stack}.json").is_file()
    stack_file = yaml.safe_load((user.project / f"Pulumi.{stack}.yaml").read_text())
    assert "encryptionsalt" in stack_file  # what the README tells a team to commit once


def _with_plugins(user: UserSession) -> UserSession:
    user.tool(require_tool("pulumi-language-python"))
    for name in PLUGINS:
        path = user.tool(require_tool(name))
        plugin = name.removeprefix("pulumi-resource-")
        version = toolchain.default_version(name)
        installed = user.pulumi("plugin", "install", "resource", plugin, version, "--file", str(path))
        assert installed.returncode == 0, installed.describe()
    return user


@pytest.mark.parametrize("stack", stack_files())
def test_readme_preview_plans_every_resource_the_program_registers(user: UserSession, stack: str) -> None:
    _with_plugins(user)
    for argv in (("login", "--local"), ("stack", "init", stack)):
        run = user.pulumi(*argv)
        assert run.returncode == 0, run.describe()
    preview = user.pulumi("preview", "--stack", stack, "--diff", timeout=1200)
    assert preview.returncode == 0, preview.describe()

    planned = set(_URN.findall(preview.stdout))
    expected = {r.urn for r in evaluate(stack, preview=True).resources}
    assert expected - planned == set(), "resources the offline evaluation registers but the real preview does not plan"
    engine_own = ("::pulumi:providers:", "::pulumi:pulumi:Stack::")
    extra = {urn for urn in planned - expected if not any(marker in urn for marker in engine_own)}
    assert extra == set(), "resources the real preview plans that the offline evaluation does not register"
    # No secret in the preview: private keys and tokens are shown as [secret].
    assert "PRIVATE KEY" not in preview.output


def test_bad_stack_file_fails_with_every_key_path(user: UserSession) -> None:
    _with_plugins(user)
    config = yaml.safe_load((user.project / "Pulumi.dev.yaml").read_text())
    config["config"]["kubeadm-ha:controlPlane"] = {"replicas": 2}
    config["config"]["kubeadm-ha:kubernetes"] = {"version": "1.30.1"}
    (user.project / "Pulumi.bad.yaml").write_text(yaml.safe_dump(config))
    for argv in (("login", "--local"), ("stack", "init", "bad")):
        run = user.pulumi(*argv)
        assert run.returncode == 0, run.describe()
    preview = user.pulumi("preview", "--stack", "bad", "--diff", timeout=1200)
    assert preview.returncode != 0, preview.describe()
    for path in ("controlPlane.replicas", "kubernetes.version"):
        assert path in preview.output, preview.describe()
    assert "Traceback" not in preview.output, preview.describe()
