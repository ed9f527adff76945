"""A node reached over SSH for integration tests: the real OpenSSH server and the real sudo, host /etc untouched.

`start_node` runs `/usr/sbin/sshd -D -e -f CONFIG` inside a lab network namespace *and* a private mount
namespace (`unshare --mount --propagation private`). Only inside that mount namespace are copies of
/etc/passwd, /etc/group, /etc/shadow and /etc/sudoers bind-mounted over the originals, adding one
unprivileged user with passwordless sudo; /home is a directory holding that user's home with the
operator's key in ~/.ssh/authorized_keys, and /run is a fresh tmpfs (sshd's privilege separation
directory and pid file, sudo's timestamps). sshd, every login and every sudo it starts see those files;
the host and all other processes see their own. Keys are generated per run with ssh-keygen.

Everything lives in the lab (`Lab.close()` kills sshd, every session and the namespaces; the mount
namespace ends with its last process) and in a `scratch_dir` the caller removes.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from render.scripts import command
from tests.integration.netns import Lab, LabError, Namespace, Process, poll_until

SSH_PORT = 22
START_BOUND = 15.0
# The user's shadow entry. sudo runs pam_unix's account check even with NOPASSWD, and it refuses a user
# shadow does not list ("account validation failure"); "*" (no password) rather than "!" (locked), because
# sshd without PAM refuses a locked account itself ("not allowed because account is locked").
SHADOW_ENTRY = "*:19000:0:99999:7:::"


@dataclass(frozen=True)
class KeyPair:
    private: str  # OpenSSH private key file text
    public: str  # "<type> <base64> <comment>", as in authorized_keys and `hostKeys`


def generate_key(directory: Path, name: str, kind: str = "ed25519") -> KeyPair:
    """A new unencrypted key pair written to `directory/name` (0600) and `name.pub`."""
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return KeyPair(path.read_text(), (directory / f"{name}.pub").read_text().strip())


@dataclass
class SshNode:
    """A running sshd: where it listens, who may log in, and which host keys it presents."""

    namespace: Namespace
    address: ipaddress.IPv4Address
    user: str
    uid: int
    operator_key: KeyPair
    host_keys: dict[str, KeyPair]  # by type: "ed25519", "ecdsa", ...
    process: Process

    def log(self) -> str:
        return self.process.log()


def free_id(*tables: str, start: int = 42420) -> int:
    """The first id from `start` that no line of the given passwd/group texts uses."""
    taken = {int(fields[2]) for table in tables for line in table.splitlines() if len(fields := line.split(":")) > 2}
    ident = start
    while ident in taken:
        ident += 1
    return ident


def copy_with(original: Path, target: Path, extra_line: str) -> None:
    """`original` plus one line, with its owner and mode (sudo ignores a sudoers file others could write)."""
    text = original.read_text()
    target.write_text(text + ("" if text.endswith("\n") or not text else "\n") + extra_line + "\n")
    info = original.stat()
    os.chown(target, info.st_uid, info.st_gid)
    target.chmod(info.st_mode & 0o7777)


def home_with_key(work: Path, user: str, key: KeyPair, uid: int, gid: int) -> Path:
    """`work/home` holding `user`'s home, where `key` may log in; bound over /home in sshd's mount namespace."""
    # sshd's StrictModes: the home, ~/.ssh and authorized_keys belong to the user and are not group/world writable.
    home_root = work / "home"
    home = home_root / user
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True)
    (ssh_dir / "authorized_keys").write_text(key.public + "\n")
    home_root.chmod(0o755)
    for path, mode in ((home, 0o700), (ssh_dir, 0o700), (ssh_dir / "authorized_keys", 0o600)):
        os.chown(path, uid, gid)
        path.chmod(mode)
    return home_root


def sshd_config(
    address: ipaddress.IPv4Address,
    user: str,
    host_key_files: Sequence[Path],
    *,
    quiet_logins: bool = True,
    forwarding: Sequence[str] = ("AllowTcpForwarding no",),
) -> str:
    """Key-only logins for `user` alone, no PAM; `forwarding` the lines that say which forwards sshd grants.

    `quiet_logins`: no motd or last-login line, so a login shell prints only what its command prints.
    """
    lines = [
        f"ListenAddress {address}:{SSH_PORT}",
        *(f"HostKey {path}" for path in host_key_files),
        "PidFile /run/sshd.pid",
        "UsePAM no",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        f"AllowUsers {user}",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "StrictModes yes",
        "UseDNS no",
        *(("PrintMotd no", "PrintLastLog no") if quiet_logins else ()),
        "X11Forwarding no",
        *forwarding,
        "AllowAgentForwarding no",
        "LogLevel VERBOSE",
    ]
    return "\n".join(lines) + "\n"


def start_node(
    lab: Lab,
    namespace: Namespace,
    address: ipaddress.IPv4Address,
    work: Path,
    *,
    sshd: str,
    host_key_types: tuple[str, ...] = ("ed25519",),
    user: str = "kha-operator",
) -> SshNode:
    """Start sshd for `user` in `namespace` at `address`; `work` (root-only) holds its files."""
    etc = work / "etc"
    etc.mkdir(mode=0o755)
    overlaid = ("passwd", "group", "shadow", "sudoers")
    passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
    uid = free_id(passwd, group)
    copy_with(Path("/etc/passwd"), etc / "passwd", f"{user}:x:{uid}:{uid}:kubeadm-ha ssh test:/home/{user}:/bin/bash")
    copy_with(Path("/etc/group"), etc / "group", f"{user}:x:{uid}:")
    copy_with(Path("/etc/shadow"), etc / "shadow", f"{user}:{SHADOW_ENTRY}")
    copy_with(Path("/etc/sudoers"), etc / "sudoers", f"{user} ALL=(ALL:ALL) NOPASSWD: ALL")

    operator_key = generate_key(work, "operator")
    home_root = home_with_key(work, user, operator_key, uid, uid)

    host_keys = {kind: generate_key(work, f"ssh_host_{kind}_key", kind) for kind in host_key_types}
    config = work / "sshd_config"
    config.write_text(sshd_config(address, user, [work / f"ssh_host_{kind}_key" for kind in host_key_types]))

    setup = "\n".join(
        [
            "set -eu",
            *(command("mount", "--bind", etc / name, f"/etc/{name}") for name in overlaid),
            command("mount", "--bind", home_root, "/home"),
            # sshd insists on its privilege separation directory, which a host that runs no sshd lacks.
            "mount -t tmpfs -o mode=0755,nosuid,nodev kubeadm-ha-run /run",
            "mkdir -m 0755 /run/sshd",
            f"exec {command(sshd, '-D', '-e', '-f', config)}",
        ]
    )
    process = lab.spawn(
        namespace,
        ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", setup],
        name="sshd",
    )
    node = SshNode(namespace, address, user, uid, operator_key, host_keys, process)

    def started() -> str | None:
        if not process.alive():
            return "exited"
        return "listening" if f"Server listening on {address} port {SSH_PORT}" in process.log() else None

    if poll_until(started, timeout=START_BOUND, message="sshd to listen") == "exited":
        raise LabError(f"sshd exited {process.popen.returncode} before listening:\n{process.log()}")
    return node


__all__ = ["KeyPair", "SshNode", "copy_with", "generate_key", "home_with_key", "sshd_config", "start_node"]
