"""tools.drill's decisions against a simulated cluster: what it stops, in which order, and what it refuses.

The real failovers are measured in tests/real/test_drill_live.py; here a model cluster answers instantly:
stopping a control plane moves its leases and (stacked) etcd leadership to the next node, stopping the VIP
holder moves the VIP.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tools.access import ToolError
from tools.drill import drill, quorum_refusal
from tools.drill_stack import holder_host, write_configmap


class Model:
    def __init__(self, *, stacked: bool = True, cps: int = 3, lbs: int = 2, unhealthy: set[str] | None = None) -> None:
        self.cps = [f"dev-cp-{index}" for index in range(1, cps + 1)]
        self.lbs = [f"dev-lb-{index}" for index in range(1, lbs + 1)]
        self.stacked = stacked
        self.down: set[str] = set(unhealthy or ())
        self.leader: str | None = self.cps[0]
        self.leases: dict[str, str | None] = {
            "kube-scheduler": self.cps[1 % cps],
            "kube-controller-manager": self.cps[0],
        }
        self.vip = self.lbs[0] if lbs > 1 else None
        self.lb_down: set[str] = set()
        self.calls: list[str] = []

    def _next_up(self, excluded: str) -> str | None:
        return next((cp for cp in self.cps if cp != excluded and cp not in self.down), None)

    def control_planes(self) -> list[str]:
        return self.cps

    def load_balancers(self) -> list[str]:
        return self.lbs

    def etcd_members(self) -> list[str]:
        return self.cps if self.stacked else ["dev-etcd-1", "dev-etcd-2", "dev-etcd-3"]

    def stacked_etcd(self) -> bool:
        return self.stacked

    def etcd_leader(self) -> str | None:
        return self.leader

    def etcd_healthy(self) -> set[str]:
        return set(self.etcd_members()) - self.down

    def lease_holder(self, lease: str) -> str | None:
        return self.leases[lease]

    def api_ready(self) -> bool:
        return len(self.down) < len(self.cps)

    def api_write(self, value: str) -> bool:
        self.calls.append("write")
        return self.api_ready()

    def stop_control_plane(self, host: str) -> None:
        self.calls.append(f"stop {host}")
        self.down.add(host)
        if self.stacked and self.leader == host:
            self.leader = self._next_up(host)
        for lease, holder in self.leases.items():
            if holder == host:
                self.leases[lease] = self._next_up(host)

    def start_control_plane(self, host: str) -> None:
        self.calls.append(f"start {host}")
        self.down.discard(host)

    def control_plane_ready(self, host: str) -> bool:
        return host not in self.down

    def vip_holder(self) -> str | None:
        return self.vip

    def stop_load_balancer(self, host: str) -> None:
        self.calls.append(f"stop {host}")
        self.lb_down.add(host)
        self.vip = next(lb for lb in self.lbs if lb not in self.lb_down)

    def start_load_balancer(self, host: str) -> None:
        self.calls.append(f"start {host}")
        self.lb_down.discard(host)

    def start_command(self, host: str, kind: str) -> str:
        return f"model: start {kind} {host}"


def test_a_dry_run_stops_nothing() -> None:
    model = Model()
    report = drill(model, yes=False)
    assert model.calls == [] and report.rows == []


def test_the_drill_stops_the_lease_holder_then_the_vip_holder_and_everything_holds() -> None:
    model = Model()
    report = drill(model, yes=True)
    assert [call for call in model.calls if call != "write"] == [
        "stop dev-cp-1",
        "start dev-cp-1",
        "stop dev-lb-1",
        "start dev-lb-1",
    ]
    assert report.passed
    rows = {row.check: row for row in report.rows}
    assert rows["etcd leader re-elected"].after == "dev-cp-2"
    assert rows["kube-controller-manager lease moved"].after == "dev-cp-2"
    assert rows["kube-scheduler lease kept"].after == "dev-cp-2"
    assert rows["VIP moved"].after == "dev-lb-2"
    table = report.table()
    assert "recovery (s)" in table and "NO" not in table


def test_one_load_balancer_owns_the_vip_and_is_not_stopped() -> None:
    model = Model(lbs=1)
    drill(model, yes=True)
    assert not any("lb" in call for call in model.calls)


@pytest.mark.parametrize(("cps", "unhealthy"), [(1, set()), (3, {"dev-cp-2"}), (5, {"dev-cp-4", "dev-cp-5"})])
def test_a_stop_that_loses_quorum_is_refused_unless_allowed(
    cps: int, unhealthy: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Model(cps=cps, unhealthy=unhealthy)
    assert quorum_refusal(model, "dev-cp-1") is not None
    with pytest.raises(ToolError, match="allow-quorum-loss"):
        drill(model, yes=True)
    assert model.calls == []
    # Allowed: it goes ahead, and reports what did not hold (waits cut short: the model never recovers).
    for bound in ("API_BOUND", "LEADER_BOUND", "LEASE_BOUND", "RECOVERY_BOUND", "VIP_BOUND"):
        monkeypatch.setattr(f"tools.drill.{bound}", 0.2)
    allowed = Model(cps=cps, unhealthy=unhealthy)
    report = drill(allowed, yes=True, allow_quorum_loss=True)
    assert allowed.calls[0] == "stop dev-cp-1" and not report.passed


def test_one_control_plane_can_drill_its_load_balancers_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """The cluster lab's shape on 2 TCG cores (1 control plane, 2 load balancers): the whole drill is refused,
    naming `--only load-balancer`, which stops the VIP holder and nothing else."""
    with pytest.raises(ToolError, match="--only load-balancer to drill the load balancers alone"):
        drill(Model(cps=1), yes=True)
    model = Model(cps=1)
    report = drill(model, yes=True, only="load-balancer")
    assert [call for call in model.calls if call != "write"] == ["stop dev-lb-1", "start dev-lb-1"]
    assert report.passed
    said = capsys.readouterr()
    assert "1. stopping load balancer dev-lb-1" in said.out + said.err
    assert [row.check for row in report.rows] == [
        "VIP moved",
        "API through the moved VIP",
        "VIP held after the LB returned",
    ]
    dry = Model(cps=1)
    assert drill(dry, yes=False, only="load-balancer").rows == [] and dry.calls == []


def test_only_the_control_plane_drill_leaves_the_load_balancers_alone() -> None:
    model = Model()
    report = drill(model, yes=True, only="control-plane")
    assert [call for call in model.calls if call != "write"] == ["stop dev-cp-1", "start dev-cp-1"]
    assert report.passed and not any(row.check.startswith("VIP") for row in report.rows)


def test_a_load_balancer_drill_without_a_vip_holder_is_refused() -> None:
    model = Model(cps=1, lbs=1)
    with pytest.raises(ToolError, match="nothing to drill: the load-balancer drill needs 2 load balancers"):
        drill(model, yes=True, only="load-balancer")
    assert model.calls == []


def test_external_etcd_is_never_a_quorum_concern_for_a_control_plane() -> None:
    model = Model(stacked=False, cps=1)
    assert quorum_refusal(model, "dev-cp-1") is None


def test_lease_identities_and_the_write() -> None:
    assert holder_host({"spec": {"holderIdentity": "dev-cp-2_6f1c"}}, ["dev-cp-1", "dev-cp-2"]) == "dev-cp-2"
    assert holder_host({"spec": {}}, ["dev-cp-1"]) is None
    seen: list[tuple[str, str]] = []

    def request(method: str, path: str, body: object) -> tuple[int, object]:
        seen.append((method, path))
        return (404, None) if method == "PUT" else (201, None)

    assert write_configmap(request, "x")
    assert [method for method, _ in seen] == ["PUT", "POST"]


READS = (
    "etcd_leader",
    "lease_holder",
    "vip_holder",
    "etcd_members",
    "etcd_healthy",
    "api_ready",
    "control_plane_ready",
)


class Slow(Model):
    """Every other answer of each read is a socket read timing out, as the real target's HTTPS and SSH do under
    load (a clean-clone run saw `TimeoutError: The read operation timed out` end a drill after its stop)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.asked: dict[str, int] = {}
        for name in READS:
            setattr(self, name, self._flaky(name, getattr(self, name)))

    def _flaky(self, name: str, read: Callable[..., object]) -> Callable[..., object]:
        def answer(*args: object) -> object:
            self.asked[name] = self.asked.get(name, 0) + 1
            if self.asked[name] % 2:
                raise TimeoutError("The read operation timed out")
            return read(*args)

        return answer


@pytest.mark.parametrize("stacked", [True, False])
def test_a_read_timing_out_once_does_not_end_the_drill(stacked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tools.drill_checks.POLL", 0.01)
    model = Slow(stacked=stacked)
    report = drill(model, yes=True)
    assert report.passed, report.table()
    assert [call for call in model.calls if call != "write"] == [
        "stop dev-cp-1",
        "start dev-cp-1",
        "stop dev-lb-1",
        "start dev-lb-1",
    ]
    assert {row.check for row in report.rows} >= {"kube-scheduler lease kept", "VIP held after the LB returned"}
    assert all(model.asked[name] >= 2 for name in READS)  # each read really timed out once
