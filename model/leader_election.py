"""`controlPlane.leaderElection`: the lease timing of kube-controller-manager and kube-scheduler."""

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
