"""How long the control plane's leaders may go unheard before the others act, for hardware slower than the
defaults assume: `controlPlane.leaderElection` (kube-controller-manager's and kube-scheduler's leases) and
`etcd.timing` (etcd's Raft heartbeat and election timeout). Both unset by default: no flag is added."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from model.base import StrictModel


class LeaderElectionConfig(StrictModel):
    """How long kube-controller-manager and kube-scheduler hold their leader lease (client-go leaderelection).

    A leader that cannot renew within `renewDeadlineSeconds` exits and restarts, and its restart (listing every
    object again) loads the API further. Where the API can stall for longer than the default 10 s (emulated or
    nested VMs, overloaded hosts), raise all three; a standby then takes over `leaseDurationSeconds` after its
    leader's node dies. The defaults are client-go's (component-base config/v1alpha1
    RecommendedDefaultLeaderElectionConfiguration: 15 s, 10 s, 2 s)."""

    lease_duration_seconds: Annotated[int, Field(alias="leaseDurationSeconds", ge=1, le=600)] = 15
    renew_deadline_seconds: Annotated[int, Field(alias="renewDeadlineSeconds", ge=1, le=600)] = 10
    retry_period_seconds: Annotated[int, Field(alias="retryPeriodSeconds", ge=1, le=600)] = 2

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionConfig:
        # client-go v0.37.2 tools/leaderelection/leaderelection.go NewLeaderElector: leaseDuration > renewDeadline
        # > JitterFactor (1.2) x retryPeriod, or the component refuses to start.
        if self.lease_duration_seconds <= self.renew_deadline_seconds:
            raise ValueError(
                f"leaseDurationSeconds {self.lease_duration_seconds} must be greater than renewDeadlineSeconds "
                f"{self.renew_deadline_seconds}"
            )
        if self.renew_deadline_seconds * 5 <= self.retry_period_seconds * 6:
            raise ValueError(
                f"renewDeadlineSeconds {self.renew_deadline_seconds} must be greater than 1.2 x retryPeriodSeconds "
                f"{self.retry_period_seconds}"
            )
        return self


class EtcdTimingConfig(StrictModel):
    """etcd's Raft timing: how often the leader sends heartbeats, and how long a follower waits without one before
    it calls an election. A leader that cannot send heartbeats in time (a starved CPU, a slow disk: etcd logs
    "leader failed to send out heartbeat on time") loses its followers, and every linearizable read waits for
    the new election. Raise both together; etcd's tuning guide puts the election timeout at about 10 x the
    heartbeat, and a cluster then takes that much longer to replace a leader whose node died. The defaults are
    etcd's (server v3.7.0 embed/config.go NewConfig: 100 ms, 1000 ms)."""

    heartbeat_interval_ms: Annotated[int, Field(alias="heartbeatIntervalMs", ge=1, le=10000)] = 100
    # etcd v3.7.0 embed/config.go Validate: both above 0, the election timeout at most maxElectionMs (50000).
    election_timeout_ms: Annotated[int, Field(alias="electionTimeoutMs", ge=1, le=50000)] = 1000

    @model_validator(mode="after")
    def _ordered(self) -> EtcdTimingConfig:
        # etcd v3.7.0 embed/config.go Validate: `5*TickMs > ElectionMs` is refused at start.
        if self.election_timeout_ms < 5 * self.heartbeat_interval_ms:
            raise ValueError(
                f"electionTimeoutMs {self.election_timeout_ms} must be at least 5 x heartbeatIntervalMs "
                f"{self.heartbeat_interval_ms} (etcd refuses to start otherwise; about 10 x is usual)"
            )
        return self
