"""How the operator tools reach a stack's nodes: its outputs, and a swappable transport.

The tools read `pulumi stack output --json --show-secrets` once: the SSH user and key, the nodes and
their pinned host keys (`hostKeys`), the etcd topology. `SshTransport` runs a rendered script as root
on a node over SSH with exactly that host key trusted (a known_hosts file of one line per call,
`StrictHostKeyChecking=yes`): nothing is ever trusted on first use. Tests swap in a transport that
runs the same scripts in network namespaces.

The private key and the kubeconfig only ever go to files of mode 0600 in a private temporary directory
that is removed when the tool ends; they are never printed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from components.backup import ETCD_BACKUPS_OUTPUT, HOST_KEYS_OUTPUT
from model.previous import SECRETS_ENCRYPTION_KEYS_OUTPUT, SECRETS_ENCRYPTION_OUTPUT
from render.etcd import EtcdMember
from render.scripts import Script, quote

PULUMI_TIMEOUT_SECONDS = 60
SSH_CONNECT_TIMEOUT_SECONDS = 10
# A step past its bound gets SIGTERM on the node, then SIGKILL this much later.
REMOTE_KILL_AFTER_SECONDS = 10


class ToolError(RuntimeError):
    """A refusal or failure the tool reports in one line and exits 1 for."""


@dataclass(frozen=True)
class Node:
    hostname: str
    address: str
    role: str  # lb, etcd, cp, worker


@dataclass(frozen=True)
class StackAccess:
    """What a tool needs from a stack's outputs."""

    stack: str
    nodes: Mapping[str, Node]
    ssh_user: str
    # Secrets are left out of the repr: a test's failure report prints every argument's repr (pytest does).
    ssh_private_key: str = field(repr=False)
    host_keys: Mapping[str, str]
    etcd_topology: str
    backup_directory: str
    kubeconfig: str = field(default="", repr=False)
    api_endpoint: str = ""
    # Secrets' encryption at rest: the key control planes write with, and every key the stack ever had
    # (name -> base64), from `secretsEncryption` and the secret `secretsEncryptionKeys`.
    encryption_key: str = ""
    encryption_keys: Mapping[str, str] = field(default_factory=dict, repr=False)

    def role(self, role: str) -> list[Node]:
        return sorted((node for node in self.nodes.values() if node.role == role), key=_index)

    @property
    def etcd_nodes(self) -> list[Node]:
        """The nodes an etcd member runs on: the control planes (stacked) or the etcd VMs (external)."""
        return self.role("etcd" if self.etcd_topology == "external" else "cp")

    @property
    def etcd_members(self) -> list[EtcdMember]:
        import ipaddress  # noqa: PLC0415 - only here

        return [
            EtcdMember(node.hostname, _index(node), ipaddress.IPv4Address(node.address)) for node in self.etcd_nodes
        ]

    @property
    def etcd_token(self) -> str:
        # What the members were started with: the program's token for external etcd, etcd's default
        # (kubeadm sets none) for stacked; a restore may use any token, so long as every member uses it.
        cluster = next(iter(self.nodes)).rsplit("-", 2)[0] if self.nodes else self.stack
        return f"{cluster}-etcd" if self.etcd_topology == "external" else "etcd-cluster"


def _index(node: Node) -> int:
    return int(node.hostname.rsplit("-", 1)[1])


def access_from_outputs(stack: str, outputs: Mapping[str, Any]) -> StackAccess:
    missing = [key for key in ("nodes", "sshUser", "sshPrivateKey", HOST_KEYS_OUTPUT) if not outputs.get(key)]
    if missing:
        raise ToolError(
            f"stack {stack} has no output(s) {', '.join(missing)}: run `pulumi up --stack {stack}` with this "
            "program version first (the tools pin each node's host key from `hostKeys`)"
        )
    nodes = {name: Node(name, str(node["address"]), str(node["role"])) for name, node in dict(outputs["nodes"]).items()}
    host_keys = {name: str(key).strip() for name, key in dict(outputs[HOST_KEYS_OUTPUT]).items()}
    unpinned = sorted(set(nodes) - set(host_keys))
    if unpinned:
        raise ToolError(f"no pinned host key for {', '.join(unpinned)} in the `hostKeys` output of {stack}")
    backups = outputs.get(ETCD_BACKUPS_OUTPUT) or {}
    return StackAccess(
        stack=stack,
        nodes=nodes,
        ssh_user=str(outputs["sshUser"]),
        ssh_private_key=str(outputs["sshPrivateKey"]),
        host_keys=host_keys,
        etcd_topology=str(outputs.get("etcdTopology") or "stacked"),
        backup_directory=str(backups.get("directory") or "/var/backups/kubeadm-ha/etcd"),
        kubeconfig=str(outputs.get("kubeconfig") or ""),
        api_endpoint=str(outputs.get("apiEndpoint") or ""),
        encryption_key=str((outputs.get(SECRETS_ENCRYPTION_OUTPUT) or {}).get("key") or ""),
        encryption_keys={str(k): str(v) for k, v in dict(outputs.get(SECRETS_ENCRYPTION_KEYS_OUTPUT) or {}).items()},
    )


def read_stack_outputs(stack: str, project_dir: Path, file: Path | None = None) -> dict[str, Any]:
    """`pulumi stack output --json --show-secrets` of `stack` (bounded), or the same JSON from `file`."""
    if file is not None:
        data = json.loads(file.read_text())
    else:
        argv = ["pulumi", "stack", "output", "--json", "--show-secrets", "--stack", stack]
        try:
            done = subprocess.run(
                argv, cwd=project_dir, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_SECONDS, check=False
            )
        except FileNotFoundError:
            raise ToolError("the pulumi CLI is not installed (or pass --outputs FILE)") from None
        except subprocess.TimeoutExpired:
            raise ToolError(f"`pulumi stack output` did not answer within {PULUMI_TIMEOUT_SECONDS} s") from None
        if done.returncode != 0:
            raise ToolError(f"`pulumi stack output --stack {stack}` failed: {done.stderr.strip()[-300:]}")
        data = json.loads(done.stdout or "{}")
    if not isinstance(data, dict):
        raise ToolError(f"the outputs of {stack} are not a JSON object")
    return data


class Transport(Protocol):
    """Runs a rendered script as root on a node; stdin and stdout may be files (snapshots are large)."""

    def run(
        self,
        node: Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]: ...


def run_checked(
    transport: Transport,
    node: Node,
    script: Script,
    *,
    timeout: float,
    stdin: bytes | IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> str:
    """Run `script` and return its output; a failure raises ToolError with the node, step and the output's tail."""
    try:
        done = transport.run(node, script, stdin=stdin, stdout=stdout, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{script.step} on {node.hostname} did not finish within {timeout:.0f} s") from None
    except OSError as error:  # e.g. a script longer than one command-line argument may be (128 KiB on Linux)
        raise ToolError(f"{script.step} could not be started for {node.hostname}: {error.strerror}") from None
    text = (done.stdout or b"").decode(errors="replace") + (done.stderr or b"").decode(errors="replace")
    if done.returncode != 0:
        tail = "\n  ".join(text.strip().splitlines()[-12:])
        raise ToolError(f"{script.step} failed on {node.hostname} (exit {done.returncode}):\n  {tail}")
    return (done.stdout or b"").decode(errors="replace") if stdout is None else text


class SshTransport:
    """SSH as the stack's user with its key, trusting only the node's pinned host key; the script runs under sudo."""

    def __init__(self, access: StackAccess, workdir: Path) -> None:
        self.access = access
        self.workdir = workdir
        self.identity = workdir / "id_operator"
        self.identity.touch(mode=0o600)
        self.identity.write_text(access.ssh_private_key.rstrip("\n") + "\n")

    def ssh_argv(self, node: Node) -> list[str]:
        known_hosts = self.workdir / f"known_hosts.{node.hostname}"
        known_hosts.write_text(f"{node.address} {self.access.host_keys[node.hostname]}\n")
        return [
            "ssh",
            "-i", str(self.identity),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}",
            "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3",
            "-l", self.access.ssh_user,
            node.address,
        ]  # fmt: skip

    def run(
        self,
        node: Node,
        script: Script,
        *,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float,
    ) -> subprocess.CompletedProcess[bytes]:
        # Killing the local ssh at the timeout would leave the step running as root on the node (no pty, so
        # no hangup reaches it): the node bounds it too (tests/integration/test_ssh_transport_live.py).
        bound = f"timeout --kill-after={REMOTE_KILL_AFTER_SECONDS} {math.ceil(timeout)}"
        remote = f"sudo --non-interactive {bound} bash -c {quote(script.render())} {quote('kubeadm-ha-' + script.step)}"
        return _run([*self.ssh_argv(node), remote], stdin=stdin, stdout=stdout, timeout=timeout)


def _run(
    argv: list[str], *, stdin: bytes | IO[bytes] | None, stdout: IO[bytes] | None, timeout: float
) -> subprocess.CompletedProcess[bytes]:
    if isinstance(stdin, bytes) or stdin is None:
        return subprocess.run(
            argv, input=stdin or b"", stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout
        )
    return subprocess.run(argv, stdin=stdin, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


@contextlib.contextmanager
def private_workdir() -> Iterator[Path]:
    """A 0700 temporary directory for the key and known_hosts files, removed however the tool ends."""
    path = Path(tempfile.mkdtemp(prefix="kubeadm-ha-tool-"))
    try:
        path.chmod(0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def say(message: str) -> None:
    """Every step a tool takes is printed, flushed, so an operator can follow (and a log can show) it."""
    print(message, flush=True)
