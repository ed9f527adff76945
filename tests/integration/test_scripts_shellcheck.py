"""Every script the program can send to a node parses (`bash -n`) and passes `shellcheck -S warning`.

The scripts come from `tests.integration.rendered.all_rendered_scripts`; add new kinds of script there.
shellcheck is the Debian package `shellcheck`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import require_programs
from tests.integration.rendered import all_rendered_scripts

pytestmark = pytest.mark.integration

SCRIPTS = [pytest.param(text, id=name) for name, text in all_rendered_scripts()]


def _write(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "script.sh"
    script.write_text(text)
    return script


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 3


@pytest.mark.parametrize("text", SCRIPTS)
def test_bash_parses(tmp_path: Path, text: str):
    bash = require_programs("bash")["bash"]
    result = subprocess.run([bash, "-n", str(_write(tmp_path, text))], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text", SCRIPTS)
def test_shellcheck(tmp_path: Path, text: str):
    shellcheck = require_programs("shellcheck")["shellcheck"]
    assert text.startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(
        [shellcheck, "--severity=warning", "--shell=bash", "--format=gcc", str(_write(tmp_path, text))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
