"""The failover drill as a command: take one control plane down, then the VIP holder, and measure what held.

    python -m tools.drill --stack NAME [--yes] [--only control-plane|load-balancer] [--allow-quorum-loss]
                          [--outputs FILE]

Without --yes it reads the cluster's state (etcd leader, lease holders, VIP holder) and prints what it would
do; nothing is stopped. With --yes:

1. record the etcd leader, the kube-scheduler and kube-controller-manager lease holders, the VIP holder;
2. stop one control plane (the controller manager's lease holder: its lease must move), by holding its static
   pod manifests (and, with stacked etcd, its etcd member's); show that the API through the VIP answers and
   takes writes, that etcd elects a new leader if it lost its own, and that the leases move;
3. bring it back and wait until its API server is ready and every etcd member is healthy;
4. stop the load balancer holding the VIP (keepalived and HAProxy) and show the VIP moves and the API answers;
   bring it back;
5. print a table of what held and how long each recovery took.

`--only` runs one of the two drills: steps 2-3 (`control-plane`) or step 4 (`load-balancer`), e.g. the
load balancers of a cluster with one control plane, which no control-plane drill can pass.

It never stops a control plane whose loss would cost etcd its quorum (counting only members healthy now)
unless --allow-quorum-loss. Everything the drill does goes through a `DrillTarget`: SSH to the nodes (host
keys pinned) and HTTPS to the VIP with the stack's kubeconfig in production, the namespace lab in the tests.

However it ends (an error, SSH failing, SIGINT, SIGTERM, SIGHUP; a second signal does not cut the restore
short), what it stopped is started again, each restore bounded, and it prints what it restored. A restore
that fails names what is still stopped, where, and the command that brings it back; the drill exits 1 then,
else 128 + the signal's number after a signal. SIGKILL cannot be caught: nothing restores after one.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol, TypeVar, get_args

from tools.access import (
    SshTransport,
    ToolError,
    access_from_outputs,
    private_workdir,
    read_stack_outputs,
    say,
)
from tools.drill_checks import DrillReport, other_than, read, wait
from tools.drill_stack import StackTarget

LEASES = ("kube-scheduler", "kube-controller-manager")
API_BOUND = 60.0
LEADER_BOUND = 60.0
# A lease is taken over once it lapses (15 s by default) and a candidate's retry comes round.
LEASE_BOUND = 120.0
RECOVERY_BOUND = 300.0
VIP_BOUND = 60.0
# One restore: StackTarget's release is two SSH scripts of at most 60 s each (stacked etcd), its LB start one.
RESTORE_BOUND = 150.0
# The signals an operator (Ctrl-C, `kill`, a closed terminal or SSH session) ends the drill with.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Kind = Literal["control-plane", "load-balancer"]
STOPPED: dict[Kind, str] = {
    "control-plane": "static pods kube-apiserver, kube-controller-manager, kube-scheduler",
    "load-balancer": "keepalived and HAProxy",
}

T = TypeVar("T")


class DrillTarget(Protocol):
    """What the drill observes and does; production: SSH + HTTPS (`StackTarget`), tests: the namespace lab."""

    def control_planes(self) -> list[str]: ...
    def load_balancers(self) -> list[str]: ...
    def etcd_members(self) -> list[str]: ...
    def stacked_etcd(self) -> bool: ...
    def etcd_leader(self) -> str | None: ...
    def etcd_healthy(self) -> set[str]: ...
    def lease_holder(self, lease: str) -> str | None: ...
    def api_ready(self) -> bool: ...
    def api_write(self, value: str) -> bool: ...
    def stop_control_plane(self, host: str) -> None: ...
    def start_control_plane(self, host: str) -> None: ...
    def control_plane_ready(self, host: str) -> bool: ...
    def vip_holder(self) -> str | None: ...
    def stop_load_balancer(self, host: str) -> None: ...
    def start_load_balancer(self, host: str) -> None: ...
    def start_command(self, host: str, kind: Kind) -> str: ...  # by hand, printed if a restore fails


class Interrupted(KeyboardInterrupt):
    """A signal, raised in the main thread by the drill's handler: a KeyboardInterrupt, as SIGINT is in Python."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Restorer:
    """What the drill stopped and has not started again (`pending`, recorded before the stop: one failing half
    way, the hold's wait timing out, may have stopped part), started again however the drill ends. Each start
    is idempotent (a release moves only what is held, `systemctl start` of a running unit does nothing)."""

    def __init__(self, target: DrillTarget) -> None:
        self.target = target
        self.pending: list[tuple[Kind, str]] = []
        self.deferred: list[int] = []

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Signals raise `Interrupted` inside; on any exit, what is still stopped is started again."""
        previous = _handle(_interrupt)
        try:
            yield
        except BaseException as error:
            _handle(self._defer)  # a second signal must not cut the restore short: each restore is bounded
            self.restore(error)
            raise
        finally:
            _handle(previous)
        self.restore(None)  # a safety net: the drill itself starts everything again on the way

    def restore(self, cause: BaseException | None) -> None:
        if not self.pending:
            return
        say(f"drill ended early ({_why(cause) if cause else 'a step was skipped'}): starting again what it stopped")
        # Blocked, not only deferred: a terminal's Ctrl-C reaches the whole process group, so the restore's own
        # SSH would die of it; a blocked signal stays blocked in the children, and runs `_defer` once unblocked.
        main = threading.current_thread() is threading.main_thread()  # the only one that runs handlers
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS) if main else None
        etcd = ", etcd" if _safe(self.target.stacked_etcd) else ""
        failed: list[str] = []
        try:
            for kind, host in reversed(self.pending):
                start = self.target.start_control_plane if kind == "control-plane" else self.target.start_load_balancer
                error = _bounded(partial(start, host), RESTORE_BOUND)
                what = f"{kind.replace('-', ' ')} {host}: {STOPPED[kind]}" + (etcd if kind == "control-plane" else "")
                if error is None:
                    say(f"restored {what} " + ("put back" if kind == "control-plane" else "started"))
                else:
                    command = _safe(partial(self.target.start_command, host, kind))
                    failed.append(f"{what} ({error})\n    bring it back: {command or '(unknown)'}")
        finally:
            self.pending = []
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.deferred:
            say(f"({', '.join(signal.Signals(n).name for n in self.deferred)} while restoring: it went on to its end)")
        if failed:
            key = "as the stack's SSH user, with its key: `pulumi stack output sshPrivateKey --show-secrets`"
            raise ToolError(
                f"starting again what the drill stopped failed; STILL STOPPED ({key}):\n  " + "\n  ".join(failed)
            ) from cause

    def _defer(self, signum: int, frame: FrameType | None) -> None:
        self.deferred.append(signum)  # only noted: printing inside a handler may re-enter a print in progress


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _handle(handler: Any) -> dict[int, Any]:
    """`handler` (or the previous ones: a dict) for SIGNALS; returns those replaced. Only the main thread may."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = handler if isinstance(handler, dict) else dict.fromkeys(SIGNALS, handler)
    return {signum: signal.signal(signum, new) for signum, new in handlers.items()}


def _bounded(action: Callable[[], None], bound: float) -> str | None:
    """Run `action` for at most `bound` seconds; None if it succeeded, else why not. A hung SSH (the target's
    own timeouts failing) is left behind in a daemon thread rather than holding the drill and its operator."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as error:  # reported, not raised: the other restores still run
            outcome.append(error)

    worker = threading.Thread(target=run, name="drill-restore", daemon=True)
    worker.start()
    worker.join(bound)
    if not outcome:
        return f"did not finish within {bound:g} s"
    return None if outcome[0] is None else _why(outcome[0])


def _why(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):  # an `Interrupted` says its signal's name
        return f"interrupted by {error or 'Ctrl-C'}"
    return " ".join(str(error).split()) or type(error).__name__


def _safe(call: Callable[[], T]) -> T | None:
    try:
        return call()
    except Exception:  # only for the wording of a message: a failing target must not hide the restore
        return None


def quorum(members: int) -> int:
    return members // 2 + 1


def choose_control_plane(target: DrillTarget) -> str:
    """The controller manager's lease holder (its lease must move), else the first control plane."""
    holder = read(lambda: target.lease_holder("kube-controller-manager"))
    planes = target.control_planes()
    return holder if holder in planes else planes[0]


def quorum_refusal(target: DrillTarget, host: str) -> str | None:
    """Why stopping `host` would cost etcd its quorum now (None: it would not)."""
    if not target.stacked_etcd():
        return None
    members = read(target.etcd_members)
    healthy = read(target.etcd_healthy)
    left = len(healthy - {host})
    if left < quorum(len(members)):
        return (
            f"stopping {host} leaves {left} of {len(members)} etcd members healthy (quorum is "
            f"{quorum(len(members))}; healthy now: {', '.join(sorted(healthy)) or 'none'})"
        )
    return None


def drill(target: DrillTarget, *, yes: bool, allow_quorum_loss: bool = False, only: Kind | None = None) -> DrillReport:
    report = DrillReport()
    leader = read(target.etcd_leader)
    holders = {lease: read(partial(target.lease_holder, lease)) for lease in LEASES}
    vip = read(target.vip_holder)
    say(f"etcd leader: {leader}; " + "; ".join(f"{lease} lease: {who}" for lease, who in holders.items()))
    say(f"VIP held by: {vip or 'no load balancer (one LB owns the VIP as its address)'}")
    host = choose_control_plane(target) if only != "load-balancer" else None
    # Without a VIP holder (one load balancer owns the VIP as its address) there is no failover to drill.
    lb = vip if only != "control-plane" and len(target.load_balancers()) > 1 else None
    plan = [f"stop control plane {host}, check the API, leader and leases, bring it back"] if host else []
    if lb:
        plan.append(f"stop load balancer {lb} (the VIP holder), check the VIP moves, bring it back")
    if not plan:
        raise ToolError("nothing to drill: the load-balancer drill needs 2 load balancers and one holding the VIP")
    say("plan:\n" + "\n".join(f"  {index}. {step}" for index, step in enumerate(plan, 1)))
    refusal = quorum_refusal(target, host) if host else None
    if refusal and not allow_quorum_loss:
        also = "; or --only load-balancer to drill the load balancers alone" if lb else ""
        raise ToolError(f"refusing: {refusal}; pass --allow-quorum-loss to drill anyway{also}")
    if not yes:
        say("dry run: nothing was stopped (pass --yes to run the drill)")
        return report
    restorer = Restorer(target)
    with restorer.guard():
        if host:
            _control_plane_drill(target, restorer, report, host=host, leader=leader, holders=holders)
        if lb:
            _load_balancer_drill(target, restorer, report, vip=lb, first=3 if host else 1)
    say("\n" + report.table())
    say("drill " + ("passed: everything held" if report.passed else "FAILED: see the rows marked NO"))
    return report


def _control_plane_drill(
    target: DrillTarget,
    restorer: Restorer,
    report: DrillReport,
    *,
    host: str,
    leader: str | None,
    holders: dict[str, str | None],
) -> None:
    say(f"1. stopping control plane {host}")
    restorer.pending.append(("control-plane", host))
    target.stop_control_plane(host)
    stopped = time.monotonic()
    ready, took = wait(target.api_ready, API_BOUND)
    report.add("API /readyz through the VIP", "ready", "ready" if ready else "not ready", bool(ready), took)
    wrote, took = wait(lambda: target.api_write(f"{host}-down-{int(time.time())}"), API_BOUND)
    report.add("write through the VIP", "ok", "ok" if wrote else "refused", bool(wrote), took)
    if target.stacked_etcd() and leader == host:
        new, _ = wait(other_than(target.etcd_leader, host), LEADER_BOUND)
        report.add("etcd leader re-elected", leader, new, new is not None, time.monotonic() - stopped)
    else:
        now = read(target.etcd_leader)
        report.add("etcd leader (unaffected)", leader, now, now is not None, None)
    for lease, before in holders.items():
        if before == host:
            moved, _ = wait(other_than(lambda lease=lease: target.lease_holder(lease), host), LEASE_BOUND)  # type: ignore[misc]
            report.add(f"{lease} lease moved", before, moved, moved is not None, time.monotonic() - stopped)
        else:
            now = read(partial(target.lease_holder, lease))
            report.add(f"{lease} lease kept", before, now, now is not None and now != host, None)

    say(f"2. starting control plane {host} again")
    target.start_control_plane(host)
    restorer.pending.remove(("control-plane", host))
    back, took = wait(lambda: target.control_plane_ready(host), RECOVERY_BOUND)
    report.add(f"{host} API server ready again", "stopped", "ready" if back else "not ready", bool(back), took)
    members = set(read(target.etcd_members))
    healthy, took = wait(lambda: target.etcd_healthy() == members or None, RECOVERY_BOUND)
    report.add("every etcd member healthy", "-", "healthy" if healthy else "unhealthy", bool(healthy), took)


def _load_balancer_drill(target: DrillTarget, restorer: Restorer, report: DrillReport, *, vip: str, first: int) -> None:
    say(f"{first}. stopping load balancer {vip}, which holds the VIP")
    restorer.pending.append(("load-balancer", vip))
    target.stop_load_balancer(vip)
    moved, took = wait(other_than(target.vip_holder, vip), VIP_BOUND)
    report.add("VIP moved", vip, moved, moved is not None, took)
    ready, took = wait(target.api_ready, API_BOUND)
    report.add("API through the moved VIP", "ready", "ready" if ready else "not ready", bool(ready), took)
    say(f"{first + 1}. starting load balancer {vip} again")
    target.start_load_balancer(vip)
    restorer.pending.remove(("load-balancer", vip))
    holder, took = wait(target.vip_holder, VIP_BOUND)
    report.add("VIP held after the LB returned", "-", holder, holder is not None, took)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--yes", action="store_true", help="really stop things (default: a dry run)")
    parser.add_argument("--allow-quorum-loss", action="store_true", help="drill even if etcd would lose quorum")
    parser.add_argument("--only", choices=get_args(Kind), help="run one of the two drills")
    parser.add_argument("--outputs", type=Path, help="the stack's `pulumi stack output --json --show-secrets`")
    args = parser.parse_args(argv)
    try:
        access = access_from_outputs(args.stack, read_stack_outputs(args.stack, Path.cwd(), args.outputs))
        with private_workdir() as workdir:
            target = StackTarget(access, SshTransport(access, workdir), workdir)
            report = drill(target, yes=args.yes, allow_quorum_loss=args.allow_quorum_loss, only=args.only)
    except ToolError as error:
        print(f"drill: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupted:  # `Interrupted` (a signal), or a Ctrl-C outside the drill's handlers
        signum = int(getattr(interrupted, "signum", signal.SIGINT))
        print(
            f"drill: interrupted by {signal.Signals(signum).name}; nothing it stopped is left stopped", file=sys.stderr
        )
        return 128 + signum
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["DrillTarget", "Interrupted", "drill", "main"]
