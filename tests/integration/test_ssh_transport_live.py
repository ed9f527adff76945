"""`tools.access.SshTransport` against the real OpenSSH server and the real sudo.

A node is a network namespace running Debian's `/usr/sbin/sshd` (its own config, host keys generated for
this run: ed25519 and ecdsa, as a freshly installed node has several), in a private mount namespace
where one unprivileged user with passwordless sudo exists (tests/integration/sshd.py; the host's /etc
is never changed). The operator is a second namespace on the same bridge; the transport's `ssh`
runs from there with the stack's key and the node's pinned ed25519 key, exactly as the tools run it.

Proven:
* through `run_checked`, a rendered `Script` runs as root (uid 0) on the node, reached as the unprivileged
  user through `sudo --non-interactive`; stdin reaches the script and its stdout comes back;
* 8 MiB of random bytes go in from an open file and come back into an open file unchanged (sha256),
  which is how tools.etcd_backup streams snapshots;
* a node whose key is not the pinned one (the pin is another ed25519 key, or the node's own key cut short)
  is refused by ssh before it logs in, so nothing runs, and the `ToolError` names the host and the step; the
  same script with the right pin then runs (the first case fails under StrictHostKeyChecking=no, the
  second under accept-new);
* a failing script's `ToolError` carries its exit code and the tail of its output;
* tools.etcd_backup lists and copies the newest snapshot out of a root-only directory over SSH, byte for byte.

Found here: a step that outlived the transport's timeout was reported, but went on running as root on the
node (only the local ssh was killed; without a pty no hangup reaches it). The node now bounds it too
(`timeout --kill-after` under sudo), and the step is gone within seconds of the bound.

Runs as root. Debian packages: openssh-server openssh-client sudo iproute2 util-linux. Under CI=true
missing ones fail.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from render.scripts import Script, command, quote
from tests.integration.conftest import phase_failed, require_programs, require_root
from tests.integration.netns import Lab, Namespace, cleanup_stale, poll_until, scratch_dir
from tests.integration.sshd import SshNode, generate_key, start_node
from tools.access import Node, SshTransport, StackAccess, ToolError, private_workdir, run_checked
from tools.etcd_backup import backup

pytestmark = pytest.mark.integration

HOST = "kha-ssh-cp-1"
NODE_ADDRESS = ipaddress.IPv4Interface("192.0.2.10/24")
OPERATOR_ADDRESS = ipaddress.IPv4Interface("192.0.2.1/24")
RUN_BOUND = 30.0
# The timeout given to the slow step, and how long it may then go on running on the node.
STEP_BOUND = 2.0
STOP_BOUND = 3.0
STREAM_BYTES = 8 * 1024 * 1024


def report(message: str) -> None:
    print(f"[ssh-transport-live] {message}")


def script(step: str, *body: str) -> Script:
    # on_node=False: an on-node script creates /var/log/kubeadm-ha, and this node shares the host's filesystem.
    return Script(step=step, host=HOST, done_when="false", body=body, on_node=False)


@dataclasses.dataclass
class SshLab:
    node: SshNode
    operator: Namespace
    access: StackAccess
    work: Path  # root-only (0700), removed with the lab: what only root on the node can read or write

    @property
    def target(self) -> Node:
        return self.access.nodes[HOST]

    @contextlib.contextmanager
    def transport(self, access: StackAccess | None = None) -> Iterator[SshTransport]:
        """A fresh `SshTransport` as a tool makes one; this thread is in the operator's namespace meanwhile,
        so the `ssh` it starts connects from there."""
        with private_workdir() as workdir, self.operator.entered():
            yield SshTransport(access or self.access, workdir)

    def run(
        self,
        what: Script,
        *,
        access: StackAccess | None = None,
        stdin: bytes | IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        timeout: float = RUN_BOUND,
    ) -> str:
        with self.transport(access) as transport:
            return run_checked(transport, self.target, what, stdin=stdin, stdout=stdout, timeout=timeout)


@pytest.fixture
def ssh_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SshLab]:
    require_root()
    programs = require_programs("ip", "unshare", "sshd", "ssh", "ssh-keygen", "sudo")
    cleanup_stale()
    work = scratch_dir("sshd")
    lab = Lab("ssh", log_dir=tmp_path / "logs")
    try:
        bridge = lab.bridge()
        node_namespace, operator = lab.namespace("node"), lab.namespace("operator")
        lab.attach(node_namespace, bridge, NODE_ADDRESS)
        lab.attach(operator, bridge, OPERATOR_ADDRESS)
        started = time.monotonic()
        node = start_node(
            lab, node_namespace, NODE_ADDRESS.ip, work, sshd=programs["sshd"], host_key_types=("ecdsa", "ed25519")
        )
        report(f"sshd listening on {NODE_ADDRESS.ip} after {time.monotonic() - started:.2f}s")
        access = StackAccess(
            stack="ssh-live",
            nodes={HOST: Node(HOST, str(NODE_ADDRESS.ip), "cp")},
            ssh_user=node.user,
            ssh_private_key=node.operator_key.private,
            host_keys={HOST: node.host_keys["ed25519"].public},
            etcd_topology="stacked",
            backup_directory=str(work / "backups"),
        )
        yield SshLab(node, operator, access, work)
    finally:
        if phase_failed(request):
            print(f"\n===== logs of lab {lab.prefix} =====\n{lab.logs()}")
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


def test_a_script_runs_as_root_through_sudo_with_stdin_and_stdout(ssh_lab: SshLab) -> None:
    payload = b"\x00stdin for the step\n\xff\x01"
    started = time.monotonic()
    output = ssh_lab.run(
        script(
            "ssh-live-whoami",
            'printf "uid=%s user=%s sudo_user=%s\\n" "$(id -u)" "$(id -un)" "${SUDO_USER-}"',
            'printf "stdin=%s\\n" "$(base64 -w0)"',
        ),
        stdin=payload,
    )
    took = time.monotonic() - started
    assert output.splitlines() == [
        f"uid=0 user=root sudo_user={ssh_lab.node.user}",
        f"stdin={base64.b64encode(payload).decode()}",
        f"kubeadm-ha: ssh-live-whoami done on {HOST}",
    ]
    # The login was the unprivileged user with the stack's key; root came from sudo alone.
    assert f"Accepted publickey for {ssh_lab.node.user} from {OPERATOR_ADDRESS.ip}" in ssh_lab.node.log()
    report(f"script as root through sudo in {took:.2f}s")


def test_binary_streams_both_ways_through_files(ssh_lab: SshLab) -> None:
    source, sink = ssh_lab.work / "in.bin", ssh_lab.work / "out.bin"
    source.write_bytes(os.urandom(STREAM_BYTES))
    started = time.monotonic()
    with open(source, "rb") as stdin, open(sink, "wb") as stdout:
        # exec: the renderer's closing "done" line must not follow the bytes (as in etcd_backup's copy).
        ssh_lab.run(script("ssh-live-stream", "exec cat"), stdin=stdin, stdout=stdout)
    took = time.monotonic() - started
    assert sink.stat().st_size == STREAM_BYTES
    assert hashlib.sha256(sink.read_bytes()).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()
    report(f"{STREAM_BYTES >> 20} MiB in and back out through files in {took:.2f}s")


def truncated(key: str) -> str:
    """The node's own public key cut short, as a bad copy and paste leaves it: ssh cannot parse it."""
    kind, blob = key.split()[:2]
    return f"{kind} {blob[:24]}"


@pytest.mark.parametrize(
    ("pin", "refusal"),
    [
        # StrictHostKeyChecking=no would log in here (OpenSSH only disables password logins then).
        pytest.param(
            "another-ed25519-key",
            "Host key for {address} has changed and you have requested strict checking.",
            id="another-ed25519-key",
        ),
        # Nothing usable pinned: StrictHostKeyChecking=accept-new would trust the node's key here.
        pytest.param(
            "truncated-pin",
            "No ED25519 host key is known for {address} and you have requested strict checking.",
            id="truncated-pin",
        ),
    ],
)
def test_a_node_without_the_pinned_host_key_is_refused(ssh_lab: SshLab, pin: str, refusal: str) -> None:
    pinned = (
        generate_key(ssh_lab.work, "another_ed25519_key").public
        if pin == "another-ed25519-key"
        else truncated(ssh_lab.node.host_keys["ed25519"].public)
    )
    access = dataclasses.replace(ssh_lab.access, host_keys={HOST: pinned})
    marker = ssh_lab.work / "ran"
    touch = script("ssh-live-pinned", command("touch", marker))

    with pytest.raises(ToolError) as refused:
        ssh_lab.run(touch, access=access)
    message = str(refused.value)
    assert message.startswith(f"ssh-live-pinned failed on {HOST} (exit 255):"), message
    assert message.endswith(refusal.format(address=NODE_ADDRESS.ip) + "\n  Host key verification failed."), message
    # ssh gave up before authenticating: the node never saw the user, nothing ran.
    assert not marker.exists()
    assert "Accepted publickey" not in ssh_lab.node.log()

    # The same script, node and user with the node's real key: the refusal was the key's alone.
    ssh_lab.run(touch)
    assert marker.exists()
    report(f"{pin}: refused before login; the node's own key accepted")


def test_a_failing_script_reports_its_exit_code_and_output_tail(ssh_lab: SshLab) -> None:
    failing = script(
        "ssh-live-fails",
        'for i in $(seq -w 1 30); do echo "output line $i"; done',
        "sh -c 'echo \"about to fail\" >&2; exit 7'",
        "echo never reached",
    )
    with pytest.raises(ToolError) as failed:
        ssh_lab.run(failing)
    message = str(failed.value)
    assert message.startswith(f"ssh-live-fails failed on {HOST} (exit 7):"), message
    # The tail is the last 12 lines of stdout then stderr; the step's own error trap names it, the host and the exit.
    lines = [line.strip() for line in message.splitlines()[1:]]
    assert lines[:-1] == [*(f"output line {index}" for index in range(21, 31)), "about to fail"], message
    assert lines[-1].startswith(f"kubeadm-ha: step ssh-live-fails failed on host {HOST} (exit 7 at line "), message
    assert "never reached" not in message


def test_a_script_too_long_for_one_argument_is_a_tool_error_not_a_traceback(ssh_lab: SshLab) -> None:
    """The script travels as one argument of ssh, which Linux caps at 128 KiB."""
    huge = script("ssh-live-huge", *(f"echo {index:0>120}" for index in range(1200)))
    with pytest.raises(ToolError) as refused:
        ssh_lab.run(huge)
    assert str(refused.value) == f"ssh-live-huge could not be started for {HOST}: Argument list too long"


def test_etcd_backup_copies_the_newest_snapshot_over_ssh(ssh_lab: SshLab) -> None:
    directory = Path(ssh_lab.access.backup_directory)
    directory.mkdir(mode=0o700)
    snapshots = {}
    for stamp, size in (("20260101T000000Z", 1 << 20), ("20260102T000000Z", 3 << 20)):
        name = f"etcd-{HOST}-{stamp}.db"
        data = os.urandom(size)
        (directory / name).write_bytes(data)
        (directory / f"{name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
        snapshots[name] = data
    newest = max(snapshots)

    out = ssh_lab.work / "copied"
    started = time.monotonic()
    with ssh_lab.transport() as transport:
        copied = backup(ssh_lab.access, transport, out, now=False, etcdutl=None)
    took = time.monotonic() - started

    assert copied == out / newest
    assert copied.read_bytes() == snapshots[newest]
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert (out / f"{newest}.sha256").read_text().split()[0] == hashlib.sha256(snapshots[newest]).hexdigest()
    assert sorted(path.name for path in out.iterdir()) == [newest, f"{newest}.sha256"]
    report(f"tools.etcd_backup listed and copied {newest} ({len(snapshots[newest]) >> 20} MiB) in {took:.2f}s")


def test_a_step_that_outlives_its_bound_is_stopped_on_the_node(ssh_lab: SshLab) -> None:
    pid_file = ssh_lab.work / "step.pid"
    slow = script("ssh-live-slow", f"echo $$ >{quote(pid_file)}", "exec sleep 60")
    with pytest.raises(ToolError) as late:
        ssh_lab.run(slow, timeout=STEP_BOUND)
    assert str(late.value) == f"ssh-live-slow on {HOST} did not finish within {STEP_BOUND:.0f} s"
    # The node shares this PID namespace: the step's process is visible, and must be gone soon.
    pid = int(poll_until(lambda: pid_file.read_text().strip(), timeout=5, message="the step's pid file"))
    poll_until(
        lambda: not Path(f"/proc/{pid}").exists(), timeout=STOP_BOUND, message=f"the timed-out step (pid {pid}) to end"
    )
