"""The script renderer, exercised by running its output with the real bash."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from render.scripts import (
    INSTALL_BUNDLE_FUNCTION,
    BundleFile,
    Script,
    command,
    encode_bundle,
    files_match,
    logged,
    remote_command,
    write_file,
)


def run(script: Script, tmp_path: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    text = (
        script.render()
        .replace("/var/log/kubeadm-ha", str(tmp_path / "log"))
        .replace("/var/lib/kubeadm-ha", str(tmp_path / "state"))
    )
    return subprocess.run(["bash", "-c", text], input=stdin, capture_output=True, text=True, timeout=30, check=False)


def test_prologue_is_strict_and_guard_comes_before_any_change() -> None:
    text = Script("demo", "node-1", "[ -f /done ]", ("touch /x",)).render()
    lines = text.splitlines()
    assert "set -euo pipefail" in lines
    guard = lines.index("if [ -f /done ]; then")
    assert guard < lines.index("touch /x")
    assert all("touch" not in line for line in lines[:guard])


def test_guard_true_skips_body(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("")
    out = tmp_path / "out"
    result = run(Script("demo", "node-1", command("test", "-f", marker), (command("touch", out),)), tmp_path)
    assert result.returncode == 0
    assert "already done" in result.stdout
    assert not out.exists()


def test_second_run_is_a_no_op(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = Script("demo", "node-1", command("test", "-f", counter), (f"echo x >> {command(counter)}",))
    run(script, tmp_path)
    run(script, tmp_path)
    assert counter.read_text() == "x\n"


def test_failure_names_host_and_step(tmp_path: Path) -> None:
    result = run(Script("kubeadm-join", "prod-cp-2", "false", ("false",)), tmp_path)
    assert result.returncode != 0
    assert "step kubeadm-join failed on host prod-cp-2" in result.stderr


def test_logged_failure_shows_scrubbed_log_tail(tmp_path: Path) -> None:
    noisy = "echo 'kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef'; exit 3"
    result = run(Script("kubeadm-init", "dev-cp-1", "false", (logged("kubeadm-init", "bash", "-c", noisy),)), tmp_path)
    assert result.returncode == 3
    assert "abcdef.0123456789abcdef" not in result.stderr + result.stdout
    assert "<redacted-token>" in result.stderr
    assert "abcdef.0123456789abcdef" in (tmp_path / "log" / "kubeadm-init.log").read_text()


@pytest.mark.parametrize("value", ["$(touch pwned)", "a b; touch pwned", "`touch pwned`", "x'y\"z", "\n touch pwned"])
def test_values_cannot_break_out_of_quoting(tmp_path: Path, value: str) -> None:
    out = tmp_path / "value"
    result = run(Script("demo", "node-1", "false", (f"printf '%s' {command(value)} > {command(out)}",)), tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == value
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_bundle_installs_files_with_declared_modes(tmp_path: Path) -> None:
    key = tmp_path / "pki" / "ca.key"
    cert = tmp_path / "pki" / "ca.crt"
    payload = encode_bundle([BundleFile(str(key), "SECRET\n", 0o600), BundleFile(str(cert), "PUBLIC\n", 0o644)])
    script = Script("place", "node-1", "false", ("install_bundle",), functions=INSTALL_BUNDLE_FUNCTION)
    result = run(script, tmp_path, stdin=payload)
    assert result.returncode == 0, result.stderr
    assert key.read_text() == "SECRET\n" and cert.read_text() == "PUBLIC\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert "SECRET" not in script.render() + result.stdout + result.stderr


@pytest.mark.parametrize("path", ["relative/x", "/etc/../shadow", "/etc/a b"])
def test_bundle_refuses_unsafe_paths(path: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        encode_bundle([BundleFile(path, "x")])


def test_files_match_and_write_file(tmp_path: Path) -> None:
    import hashlib

    target = tmp_path / "etc" / "app.cfg"
    content = "line 1\nit's $HOME\n"
    digest = hashlib.sha256(content.encode()).hexdigest()
    condition = files_match({str(target): digest})
    script = Script("write", "node-1", condition, write_file(str(target), content, 0o640))
    assert run(script, tmp_path).returncode == 0
    assert target.read_text() == content
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert "already done" in run(script, tmp_path).stdout
    os.chmod(target, 0o600)
    target.write_text("changed")
    assert "already done" not in run(script, tmp_path).stdout
    assert target.read_text() == content


def test_remote_command_runs_script_as_root_with_bash() -> None:
    script = Script("demo", "node-1", "false", ("true",))
    assert remote_command(script).startswith("sudo --non-interactive bash -c '#!/usr/bin/env bash")


@pytest.mark.parametrize("name", ["node-1\ntouch /pwned", "a b", "$(x)", "", "-rf"])
def test_step_and_host_names_must_be_plain_words(name: str) -> None:
    with pytest.raises(ValueError, match="must be letters"):
        Script("demo", name, "false", ("true",))
    with pytest.raises(ValueError, match="must be letters"):
        Script(name, "node-1", "false", ("true",))
