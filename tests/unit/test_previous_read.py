"""model.previous reads the stack's own outputs and state at the start of every run: a transient failure of that
read is retried (bounded), a lasting one still refuses the run.

Found with the real engine (tests/real/engine/test_engine_stacks.py, pulumi v3.259.0, file backend): the read
can fail with `failed to load checkpoint: EOF` while the engine writes the same stack's checkpoint at the start
of `pulumi up`. The file backend's blob store (gocloud.dev fileblob, pinned by pulumi pkg/v3's go.mod) renames the
checkpoint into place atomically, but rewrites its `<stack>.json.attrs` sidecar in place (attrs.go setAttrs:
os.Create, then encode), and every read decodes that sidecar first (fileblob.go forKey -> getAttrs): a read that
meets it truncated fails with io.EOF. The next read succeeds.
"""

from __future__ import annotations

import time
from typing import Any

import pulumi
import pytest

import model.previous as previous
from model.previous import READ_STACK_OUTPUTS, READ_STACK_RESOURCE_OUTPUTS, read_previous_deployment

RECORD = {
    "urn:x": {
        "type": "pulumi:index:Stash",
        "outputs": {"output": {"kind": "kubeadm-ha/node", "hostname": "dev-cp-1", "hypervisor": "local"}},
    }
}


class Result:
    def __init__(self, value: Any) -> None:
        self.value = value


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(pulumi, "get_organization", lambda: "organization")
    monkeypatch.setattr(pulumi, "get_project", lambda: "kubeadm-ha")
    monkeypatch.setattr(pulumi, "get_stack", lambda: "dev")
    slept: list[float] = []  # no real waiting in the suite
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def flaky_invoke(failures: dict[str, int], calls: list[str]) -> Any:
    def invoke(token: str, args: dict[str, Any]) -> Result:
        calls.append(token)
        if failures.get(token, 0) > 0:
            failures[token] -= 1
            raise Exception("invocation of " + token + " returned an error: failed to load checkpoint: EOF")
        if token == READ_STACK_OUTPUTS:
            return Result({"outputs": {"apiEndpoint": "https://10.17.3.10:6443"}})
        return Result({"outputs": RECORD})

    return invoke


@pytest.mark.parametrize("token", [READ_STACK_OUTPUTS, READ_STACK_RESOURCE_OUTPUTS])
def test_a_transient_read_failure_is_retried(monkeypatch: pytest.MonkeyPatch, engine: list[float], token: str) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pulumi.runtime, "invoke", flaky_invoke({token: 1}, calls))
    deployment = read_previous_deployment()
    assert deployment.api_endpoint == "https://10.17.3.10:6443"
    assert deployment.node_hypervisors == {"dev-cp-1": "local"}
    assert calls.count(token) == 2


def test_a_lasting_read_failure_still_refuses_the_run(monkeypatch: pytest.MonkeyPatch, engine: list[float]) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pulumi.runtime, "invoke", flaky_invoke({READ_STACK_RESOURCE_OUTPUTS: 100}, calls))
    with pytest.raises(pulumi.RunError) as caught:
        read_previous_deployment()
    message = str(caught.value)
    assert "could not read the last deployment of stack organization/kubeadm-ha/dev" in message
    assert "failed to load checkpoint: EOF" in message and "refusing to continue" in message
    # Bounded: a few attempts, about a second and a half of waiting in all.
    assert calls.count(READ_STACK_RESOURCE_OUTPUTS) == previous.READ_ATTEMPTS
    assert len(engine) == previous.READ_ATTEMPTS - 1 and sum(engine) <= 2.0, engine
