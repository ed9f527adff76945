"""The key disk's two ends under the real shells and tools: the local step that writes the file libvirt
copies (bash, truncate), and the `bootcmd` that installs the key at first boot (sh, sed on the raw disk,
ssh-keygen). The paths the boot uses (/dev/vdb, /etc/ssh, /run) are moved under a temporary directory;
the real boot is the engine lab's (tests/real/engine/test_engine_up.py: SSH pinned to this key works).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from render.hostkey_disk import (
    HOST_KEY_DEVICE,
    HOST_KEY_DISK_BYTES,
    host_key_disk_cleanup_script,
    host_key_disk_write_script,
    install_host_key_command,
)


def keypair(directory: Path, name: str) -> tuple[str, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True)
    return path.read_text(), path.with_suffix(".pub").read_text().strip()


def write(path: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    script = host_key_disk_write_script("dev-cp-1", str(path)).render()
    return subprocess.run(["bash", "-c", script], input=stdin, capture_output=True, text=True, timeout=30)


def boot(tmp_path: Path, disk: Path, public: str) -> subprocess.CompletedProcess[str]:
    command = install_host_key_command(public)
    moved = command.replace(HOST_KEY_DEVICE, str(disk)).replace("/etc/ssh/", f"{tmp_path}/etc/ssh/")
    moved = moved.replace("/run/", f"{tmp_path}/run/")
    assert "/etc/ssh/" not in moved.replace(f"{tmp_path}/etc/ssh/", "") and HOST_KEY_DEVICE not in moved
    return subprocess.run(["sh", "-c", moved], capture_output=True, text=True, timeout=30)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """/etc/ssh as an image ships it, with keys of its own."""
    etc = tmp_path / "etc" / "ssh"
    etc.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    for name in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_ecdsa_key", "ssh_host_ed25519_key"):
        (etc / name).write_text("image key\n")
    (etc / "sshd_config").write_text("# kept\n")
    return etc


def test_the_boot_installs_exactly_the_key_the_step_wrote(tmp_path: Path, image: Path) -> None:
    private, public = keypair(tmp_path, "host")
    disk = tmp_path / "home" / "host-keys" / "dev-cp-1-host-key.raw"
    done = write(disk, private)
    assert done.returncode == 0, done.stderr
    assert private.splitlines()[1] not in done.stdout + done.stderr
    assert disk.stat().st_size == HOST_KEY_DISK_BYTES and disk.read_bytes().startswith(private.encode())
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600 and stat.S_IMODE(disk.parent.stat().st_mode) == 0o700
    assert not disk.with_name(disk.name + ".part").exists()

    booted = boot(tmp_path, disk, public)
    assert booted.returncode == 0, booted.stderr
    assert sorted(os.listdir(image)) == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config"]
    installed = image / "ssh_host_ed25519_key"
    assert installed.read_text() == private and stat.S_IMODE(installed.stat().st_mode) == 0o600
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(installed)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == public.split()[:2]
    assert (image / "ssh_host_ed25519_key.pub").read_text() == public + "\n"
    # Every boot runs it again: the same key, nothing else changes.
    assert boot(tmp_path, disk, public).returncode == 0 and installed.read_text() == private
    assert not list((tmp_path / "run").iterdir())


def test_a_disk_without_the_pinned_key_installs_nothing(tmp_path: Path, image: Path) -> None:
    private, _ = keypair(tmp_path, "other")
    _, pinned = keypair(tmp_path, "pinned")
    disk = tmp_path / "disk.raw"
    assert write(disk, private).returncode == 0
    booted = boot(tmp_path, disk, pinned)
    assert booted.returncode == 1 and "does not hold the pinned SSH host key" in booted.stderr
    assert (image / "ssh_host_ed25519_key").read_text() == "image key\n"  # sshd keeps keys no one pinned
    assert not list((tmp_path / "run").iterdir())


def test_the_step_refuses_what_is_not_a_private_key_and_leaves_nothing(tmp_path: Path) -> None:
    _, public = keypair(tmp_path, "host")
    disk = tmp_path / "keys" / "disk.raw"
    refused = write(disk, public + "\n")
    assert refused.returncode == 1 and "not an OpenSSH private key" in refused.stderr
    assert public.split()[1] not in refused.stdout + refused.stderr
    assert list(disk.parent.iterdir()) == []


def test_the_cleanup_removes_the_file_and_is_a_no_op_after(tmp_path: Path) -> None:
    private, _ = keypair(tmp_path, "host")
    disk = tmp_path / "disk.raw"
    assert write(disk, private).returncode == 0
    script = host_key_disk_cleanup_script("dev-cp-1", str(disk)).render()
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert first.returncode == 0 and not disk.exists()
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "already done" in again.stdout
