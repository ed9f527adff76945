"""Remote hypervisors for the real libvirt provider: one sshd per hypervisor name, each in a network namespace.

Pulumi.prod-multihost.yaml reaches its hypervisors as `qemu+ssh://kubeadm@hv-X.lan.example/system` and pins each
one's host key (model/hostkeys.py: the program writes a known_hosts file per hypervisor and adds `knownhosts=` to
the provider's URI). terraform-provider-libvirt 0.8.1 does not run ssh(1): it dials port 22 itself with Go's
x/crypto/ssh, authenticates with ${HOME}/.ssh/id_ed25519 (then id_ecdsa, id_rsa; or an agent), checks the host
key against the `knownhosts` file, then opens a `direct-streamlocal@openssh.com` channel to the remote
/var/run/libvirt/libvirt-sock (libvirt/uri/ssh.go, unix.go in ../shared/third_party). So a hypervisor here is:

- a network namespace on a lab bridge at the address the stack file reserves for it (10.40.0.3-5), with the
  real OpenSSH sshd presenting an ed25519 host key generated for this run, letting in only `kubeadm` by key;
- in sshd's private mount namespace (as tests/integration/sshd.py does): passwd/shadow copies adding the
  `kubeadm` user (with the uid of the machine's `nobody`: see below), its home with the operator's key, a fresh
  /run, and a libvirtd's socket directory at /run/libvirt, so the channel reaches that libvirtd at the system
  path. The socket is made accessible to `kubeadm`'s group, as a real hypervisor's `libvirt` group does.

The operator is a namespace on the same bridge: the CLI runs there (`OperatorSession`), with the host names in an
/etc/hosts bound over the real one only inside its mount namespace. One libvirtd (the caller's) serves all three
names: a preview only configures each provider, which connects. Nothing is reachable from the root namespace;
`Lab.close()` kills every process and deletes every namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from render.scripts import command
from tests.integration.netns import Lab, Namespace, Process, poll_until
from tests.integration.sshd import SHADOW_ENTRY, KeyPair, copy_with, generate_key, home_with_key, sshd_config
from tests.real.engine.cli import Run, UserSession

SSH_PORT = 22  # the provider's only working port (model/hostkeys.py: 0.8.1 dials host:port:port otherwise)
START_SECONDS = 15.0
LAN = ipaddress.IPv4Network("10.40.0.0/24")  # Pulumi.prod-multihost.yaml's network
OPERATOR = ipaddress.IPv4Interface("10.40.0.250/24")


@dataclass
class Hypervisor:
    name: str
    host: str  # the URI's host name
    user: str
    address: ipaddress.IPv4Address
    host_key: KeyPair
    sshd: Process

    def known_hosts_line(self) -> str:
        return f"{self.host} {' '.join(self.host_key.public.split()[:2])}"


@dataclass
class HypervisorLab:
    lab: Lab
    operator: Namespace
    operator_key: KeyPair
    hypervisors: dict[str, Hypervisor] = field(default_factory=dict)

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", *(f"{hv.address} {hv.host}" for hv in self.hypervisors.values())]
        return "\n".join(lines) + "\n"

    def logs(self) -> str:
        return self.lab.logs()


@dataclass
class OperatorSession(UserSession):
    """A UserSession whose commands run in the operator's network namespace (inside its fresh-home namespace)."""

    netns: str = ""

    def pulumi(self, *args: str, timeout: float = 120) -> Run:
        return self._run(["ip", "netns", "exec", self.netns, "pulumi", *args, "--non-interactive"], self.env(), timeout)

    def shell(self, script: str, timeout: float = 120) -> Run:
        env = {key: value for key, value in self.env().items() if key != "PULUMI_CONFIG_PASSPHRASE"}
        return self._run(["ip", "netns", "exec", self.netns, "bash", "-euo", "pipefail", "-c", script], env, timeout)


# The provider's channel to the libvirt socket is a local stream forward, which sshd grants only with local TCP
# forwarding allowed too: under `AllowTcpForwarding no` Debian 12's sshd (OpenSSH 9.2) logs "Received request to
# connect to path /var/run/libvirt/libvirt-sock, but the request was denied" and the preview fails (measured here).
FORWARDING = ("AllowTcpForwarding local", "AllowStreamLocalForwarding local")


@contextlib.contextmanager
def ssh_hypervisors(uris: dict[str, str], work: Path, libvirt_sockets: Path) -> Iterator[HypervisorLab]:
    """A hypervisor per `uris` entry (name -> qemu+ssh URI), each at a reserved LAN address, all on one libvirtd.

    `work` is a root-only directory the caller removes; `libvirt_sockets` the libvirtd's socket directory.
    """
    users = {urlsplit(uri).username for uri in uris.values()}
    assert len(users) == 1 and None not in users, f"one SSH user for every hypervisor, not {users}"
    user = str(users.pop())
    with Lab("hv", log_dir=work / "logs") as lab:
        net = lab.bridge()
        operator = lab.namespace("operator")
        lab.attach(operator, net, OPERATOR)

        etc = work / "etc"
        etc.mkdir(mode=0o755)
        # libvirtd names the peer of its socket by uid (SO_PEERCRED) in *its* user database and refuses one it
        # cannot find ("Failed to find user record for uid '42420'", measured). On a real host sshd and libvirtd
        # share /etc/passwd; here libvirtd sees the machine's (libvirtd.py), so `user` takes the uid and gid of
        # the machine's `nobody`: an account libvirtd finds, with no rights of its own.
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        copy_with(Path("/etc/passwd"), etc / "passwd", f"{user}:x:{uid}:{gid}:hypervisor operator:/home/{user}:/bin/sh")
        copy_with(Path("/etc/shadow"), etc / "shadow", f"{user}:{SHADOW_ENTRY}")
        operator_key = generate_key(work, "operator")
        home_root = home_with_key(work, user, operator_key, uid, gid)
        # libvirt's `unix_sock_group` + `unix_sock_rw_perms = "0770"`, as for a member of the libvirt group.
        socket = libvirt_sockets / "libvirt-sock"
        os.chown(socket, 0, gid)
        socket.chmod(0o770)

        found = HypervisorLab(lab, operator, operator_key)
        hosts = iter(LAN.hosts())
        for _ in range(2):
            next(hosts)  # 10.40.0.1 router, .2 name server: the stack file's reserved list names .3-.5 next
        for name, uri in uris.items():
            address = next(hosts)
            namespace = lab.namespace(name)
            lab.attach(namespace, net, ipaddress.IPv4Interface(f"{address}/{LAN.prefixlen}"))
            own = work / name
            own.mkdir(mode=0o700)
            host_key = generate_key(own, "ssh_host_ed25519_key")
            config = own / "sshd_config"
            config.write_text(
                sshd_config(address, user, [own / "ssh_host_ed25519_key"], quiet_logins=False, forwarding=FORWARDING)
            )
            setup = "\n".join(
                [
                    "set -eu",
                    *(command("mount", "--bind", etc / table, f"/etc/{table}") for table in ("passwd", "shadow")),
                    command("mount", "--bind", home_root, "/home"),
                    "mount -t tmpfs -o mode=0755,nosuid,nodev kubeadm-ha-run /run",
                    "mkdir -m 0755 /run/sshd /run/libvirt",
                    command("mount", "--bind", libvirt_sockets, "/run/libvirt"),
                    f"exec {command('/usr/sbin/sshd', '-D', '-e', '-f', config)}",
                ]
            )
            sshd = lab.spawn(
                namespace, ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", setup], name=name
            )
            host = str(urlsplit(uri).hostname)
            found.hypervisors[name] = Hypervisor(name, host, user, address, host_key, sshd)

        def listening() -> bool:
            for hv in found.hypervisors.values():
                if not hv.sshd.alive():
                    raise RuntimeError(f"sshd of {hv.name} exited:\n{hv.sshd.log()}")
            return all(f"Server listening on {hv.address}" in hv.sshd.log() for hv in found.hypervisors.values())

        poll_until(listening, timeout=START_SECONDS, message="every hypervisor's sshd to listen")
        # The operator reaches each one (bounded): the LAN works before the engine is judged on it.
        for hv in found.hypervisors.values():
            operator.run("bash", "-c", f"exec 3<>/dev/tcp/{hv.address}/{SSH_PORT}", timeout=10)
        yield found


def give_operator_key(user: UserSession, key: KeyPair) -> None:
    """The operator's key where the provider looks for it first: ${HOME}/.ssh/id_ed25519 (the fresh home)."""
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    target = ssh_dir / "id_ed25519"
    target.write_text(key.private)
    target.chmod(0o600)
