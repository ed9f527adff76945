"""The README's commands, run for real with the Pulumi CLI from a fresh HOME (section 2 of issue 10).

`mkdir`, the passphrase file and `pulumi stack init STACK`, exactly as the README's "Create a cluster" block
writes them, in a copy of the project, with nothing in HOME: no backend directory, no plugins, no credentials.
The dev preview that follows them runs in CI: test_engine_preview.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.real.engine.cli import UserSession, readme_setup_commands, require_tool, stack_files


@pytest.fixture
def user(tmp_path: Path) -> UserSession:
    return UserSession(tmp_path, require_tool("pulumi")).setup()


@pytest.mark.parametrize("stack", stack_files())
def test_readme_login_and_stack_init_on_a_fresh_machine(user: UserSession, stack: str) -> None:
    # Failed before the fix with `stat ~/.pulumi-kubeadm-ha: no such file or directory` (pulumi/pulumi#15841).
    setup = user.shell(readme_setup_commands(stack))
    assert setup.returncode == 0, setup.describe()
    # The state lands in the backend the README names for the project (Pulumi.yaml's backend.url).
    assert (user.home / ".pulumi-kubeadm-ha" / ".pulumi" / "stacks" / "kubeadm-ha" / f"{stack}.json").is_file()
    stack_file = yaml.safe_load((user.project / f"Pulumi.{stack}.yaml").read_text())
    assert "encryptionsalt" in stack_file  # what the README tells a team to commit once
