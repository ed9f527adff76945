"""A disposable network lab for integration tests: namespaces, bridges, veths, processes.

Everything a `Lab` creates carries its prefix (``kha-<pid>-<tag>-``), lives in
namespaces it created (the root namespace is never touched, so test traffic
cannot leave the lab), and is removed by `Lab.close()` even after a failure:
processes first (whole process groups, then anything still inside a lab
namespace), then the namespaces, which takes their veths and the bridge with
them. `cleanup_stale()` removes what a killed earlier run left behind (namespaces,
the processes in them, and `scratch_dir()` directories).

The test process itself can act inside a namespace without a subprocess:
`Namespace.entered()` switches the calling thread's network namespace, and
sockets created there stay in that namespace.

Usage::

    with Lab("lb") as lab:
        net = lab.bridge()
        server = lab.namespace("server")
        lab.attach(server, net, ipaddress.IPv4Interface("10.0.0.2/24"))
        process = lab.spawn(server, ["my-daemon", "--foreground"], name="daemon")
        with server.entered():
            socket.create_connection(("10.0.0.2", 80), timeout=2)
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import http.client
import io
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT_PREFIX = "kha-"
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


class LabError(RuntimeError):
    pass


def run(*argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure the error carries its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def poll_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Call `probe` until it returns something truthy, at most `timeout` seconds; exceptions count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # any failure of the probe means "not yet"
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}{detail}")
        time.sleep(interval)


def haproxy_stats(namespace: Namespace, port: int, stats_uri: str) -> str:
    """HAProxy's stats CSV (`stats_uri;csv` on `port`), fetched from inside `namespace`."""
    with namespace.entered():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.connect()
    try:
        connection.request("GET", stats_uri + ";csv")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def haproxy_servers(namespace: Namespace, port: int, stats_uri: str, backend: str) -> dict[str, dict[str, str]]:
    """The servers of `backend` in HAProxy's stats (`haproxy_stats`): server name -> its row, by HAProxy's
    column names (`status`, `stot`, `wretr`, ...)."""
    return backend_servers(haproxy_stats_rows(haproxy_stats(namespace, port, stats_uri)), backend)


def haproxy_stats_rows(text: str) -> list[dict[str, str]]:
    """The rows of HAProxy's stats CSV, by its column names (its header line starts with "# ")."""
    return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))


def backend_servers(rows: Iterable[dict[str, str]], backend: str) -> dict[str, dict[str, str]]:
    """Server name -> its row, for the servers of `backend` (not its FRONTEND and BACKEND summary rows)."""
    return {
        row["svname"]: row for row in rows if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def wait_for_backends(
    states: Callable[[str], dict[str, str]],
    lbs: Iterable[str],
    expected: dict[str, str],
    *,
    timeout: float,
    interval: float,
) -> float:
    """Wait until every load balancer in `lbs` reports `expected` (server -> exact status) through `states`,
    all within `timeout`; returns the seconds it took."""
    started = time.monotonic()
    for lb in lbs:

        def reached(lb: str = lb) -> bool:
            found = states(lb)
            return all(found.get(server) == status for server, status in expected.items())

        poll_until(
            reached,
            timeout=max(timeout - (time.monotonic() - started), 0.1),
            interval=interval,
            message=f"HAProxy on {lb} to report {expected}",
        )
    return time.monotonic() - started


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@dataclass
class Namespace:
    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *args, check=check)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return run(*self.exec_argv(argv), check=check, timeout=timeout)

    def ipv4_addresses(self, ifname: str = "eth0") -> frozenset[ipaddress.IPv4Address]:
        """The IPv4 addresses on `ifname` right now."""
        output = self.ip("-4", "-o", "addr", "show", "dev", ifname).stdout
        found = set()
        for line in output.splitlines():
            words = line.split()
            if "inet" in words:
                found.add(ipaddress.IPv4Interface(words[words.index("inet") + 1]).ip)
        return frozenset(found)

    def pids(self) -> list[int]:
        result = run("ip", "netns", "pids", self.name, check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with this thread in the namespace (sockets made here stay in it)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)


@dataclass
class Bridge:
    """A Linux bridge alone in its own namespace: the lab's L2 segment."""

    namespace: Namespace
    name: str = "br0"
    ports: list[str] = field(default_factory=list)


@dataclass
class Process:
    name: str
    namespace: Namespace
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        if self.popen.poll() is not None:
            return False
        # poll() answers None, "know nothing yet", while another thread waits on this child (a Kubelet
        # stand-in's stop() in Popen.wait holds its waitpid lock): the kernel's view decides then. An exited
        # child not yet reaped is a zombie, state Z in /proc/PID/stat (proc(5)).
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, signum: int, *, group: bool = True) -> None:
        """Signal the process (with `group`, its whole process group, i.e. everything it forked)."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, *, timeout: float = 5, group: bool = True) -> int:
        """Send `signum`, wait up to `timeout`, then SIGKILL the group; returns the exit status."""
        if self.alive():
            self.send_signal(signum, group=group)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Children that outlived their parent still carry its process group id.
        self.send_signal(signal.SIGKILL)
        return self.popen.returncode


class Lab:
    """Namespaces, a bridge, veths and processes that all disappear in `close()`."""

    def __init__(self, tag: str = "lab", *, log_dir: Path | None = None) -> None:
        if not tag.replace("-", "").isalnum():
            raise ValueError(f"tag {tag!r} must be alphanumeric")
        self.prefix = f"{ROOT_PREFIX}{os.getpid()}-{next(_counter)}{tag}-"
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=self.prefix))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.namespaces: list[Namespace] = []
        self.processes: list[Process] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, name: str) -> Namespace:
        namespace = Namespace(self.prefix + name)
        run("ip", "netns", "add", namespace.name)
        with self._lock:
            self.namespaces.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        return namespace

    def bridge(self, name: str = "br0") -> Bridge:
        namespace = self.namespace(f"net-{name}")
        namespace.ip("link", "add", name, "type", "bridge", "stp_state", "0")
        namespace.ip("link", "set", name, "up")
        return Bridge(namespace, name)

    def link(self, bridge: Bridge, uplink: Bridge) -> str:
        """Join `bridge` to `uplink` with a veth (one L2 segment, as a host's bridge on the LAN switch);
        returns the port on `bridge`'s side, which `cut` takes down."""
        port, peer = f"up-{uplink.name}"[:15], f"dn-{bridge.name}"[:15]
        bridge.namespace.ip("link", "add", port, "type", "veth", "peer", "name", peer, "netns", uplink.namespace.name)
        bridge.namespace.ip("link", "set", port, "master", bridge.name, "up")
        uplink.namespace.ip("link", "set", peer, "master", uplink.name, "up")
        bridge.ports.append(port)
        uplink.ports.append(peer)
        return port

    @staticmethod
    def cut(bridge: Bridge, port: str) -> None:
        """Take `port` down: everything behind it drops off the segment at once, as a host losing power does."""
        bridge.namespace.ip("link", "set", port, "down")

    def kill(self, namespaces: Sequence[Namespace]) -> None:
        """SIGKILL every process inside `namespaces`: no daemon gets to say goodbye (no VRRP priority-0 advert)."""
        doomed = {namespace.name for namespace in namespaces}
        for process in self.processes:
            if process.namespace.name in doomed:
                process.send_signal(signal.SIGKILL)
        for namespace in namespaces:
            for pid in namespace.pids():
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def attach(
        self,
        namespace: Namespace,
        bridge: Bridge,
        address: ipaddress.IPv4Interface,
        *,
        ifname: str = "eth0",
        mac: str | None = None,
    ) -> None:
        """A veth from `bridge` into `namespace`, named `ifname` there, with `address` (and `mac`)."""
        port = f"p{len(bridge.ports)}-{ifname}"[:15]
        bridge.namespace.ip("link", "add", port, "type", "veth", "peer", "name", ifname, "netns", namespace.name)
        bridge.ports.append(port)
        bridge.namespace.ip("link", "set", port, "master", bridge.name, "up")
        if mac:
            namespace.ip("link", "set", ifname, "address", mac)
        namespace.ip("addr", "add", str(address), "dev", ifname)
        namespace.ip("link", "set", ifname, "up")

    def standalone_interface(
        self, namespace: Namespace, address: ipaddress.IPv4Interface, *, ifname: str = "eth0"
    ) -> None:
        """An `ifname` with `address` and carrier but no link anywhere, for daemons that only
        need the interface to exist (a veth pair inside `namespace`: the dummy module may be absent)."""
        peer = f"{ifname}-peer"[:15]
        namespace.ip("link", "add", ifname, "type", "veth", "peer", "name", peer)
        namespace.ip("addr", "add", str(address), "dev", ifname)
        namespace.ip("link", "set", peer, "up")
        namespace.ip("link", "set", ifname, "up")

    def spawn(
        self, namespace: Namespace, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None
    ) -> Process:
        """Start `argv` inside `namespace` in its own session (so its process group can be killed)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(  # argv is built by the tests, never by a shell
                namespace.exec_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        process = Process(name, namespace, list(argv), log_path, popen)
        with self._lock:
            self.processes.append(process)
        return process

    def logs(self, tail: int = 40) -> str:
        """The last lines of every process log, for failure reports."""
        parts = []
        for process in self.processes:
            lines = process.log().splitlines()[-tail:]
            state = "running" if process.alive() else f"exited {process.popen.returncode}"
            parts.append(f"----- {process.name} ({state}) {process.log_path}\n" + "\n".join(lines))
        return "\n".join(parts)

    def close(self) -> None:
        # Everything gets TERM at once, then a short common grace period, then KILL.
        for process in self.processes:
            if process.alive():
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.01))
            process.stop(signal.SIGKILL, timeout=5)
        for namespace in reversed(self.namespaces):
            _remove_namespace(namespace)
        self.namespaces.clear()


def _remove_namespace(namespace: Namespace) -> None:
    """Kill whatever still runs inside, then delete the namespace (its veths go with it)."""
    if not namespace.path.exists():
        return
    for pid in namespace.pids():
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        result = run("ip", "netns", "del", namespace.name, check=False)
        if result.returncode == 0 or not namespace.path.exists():
            return
        time.sleep(0.1)
    raise LabError(f"could not delete namespace {namespace.name}: {result.stderr.strip()}")


def cleanup_stale(prefix: str = ROOT_PREFIX) -> list[str]:
    """Delete namespaces and temporary directories named `<prefix><pid>-...` whose creating
    process is gone (a run that was killed); returns their names."""
    removed = []
    if NETNS_DIR.is_dir():
        for path in sorted(NETNS_DIR.iterdir()):
            if _stale(path.name, prefix):
                _remove_namespace(Namespace(path.name))
                removed.append(path.name)
    for path in sorted(Path(tempfile.gettempdir()).glob(prefix + "*")):
        if path.is_dir() and not path.is_symlink() and _stale(path.name, prefix):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def scratch_dir(tag: str, *, mode: int = 0o700) -> Path:
    """A new temporary directory `<prefix><pid>-<tag>-*` (so `cleanup_stale` can find it after a crash)."""
    path = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-{tag}-"))
    path.chmod(mode)
    return path


def install_executable(path: Path, text: str) -> Path:
    """Write `text` as an executable at `path` by renaming a new file over it. Writing the file in place fails
    with ETXTBSY (errno 26) while anything executes it, or is in the middle of exec'ing it: keepalived runs
    its track script every second, and a second load balancer's copy once met the first one's run (CI, Dec 5)."""
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(scratch, 0o755)
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
        raise
    return path


def _stale(name: str, prefix: str) -> bool:
    if not name.startswith(prefix):
        return False
    owner = name[len(prefix) :].split("-", 1)[0]
    return owner.isdigit() and not _pid_alive(int(owner))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "Bridge",
    "Lab",
    "LabError",
    "Namespace",
    "Process",
    "cleanup_stale",
    "poll_until",
    "run",
    "scratch_dir",
]
