"""The encryption rewrite step (render/encryption.py, phase 3) in a sandbox: every Secret read and written back,
retried through `kha_retry` while the API drops the call, and the marker written only once it went through.
The success path against a real kube-apiserver is tests/real/test_encryption_live.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from render.encryption import REWRITE_ATTEMPTS, REWRITE_PAUSE_SECONDS, REWRITTEN_MARKER, rewrite_script
from tests.sandbox import RECORD_ONLY, Sandbox, Stub

HOST = "dev-cp-1"
KEY = "key-1"
# `kubectl get secrets` prints a list; `kubectl replace -f -` reads it. With `replace-fails` holding a count, that
# many replace calls fail first (an API server restarting under load); empty, every one fails.
KUBECTL = Stub(
    'case " $* " in\n'
    '  *" get secrets "*) echo \'{"kind": "List", "items": []}\' ;;\n'
    "  *)\n"
    "    cat >/dev/null\n"
    '    if [ -e "$STATE/replace-fails" ]; then\n'
    '      left="$(cat "$STATE/replace-fails")"\n'
    '      if [ -z "$left" ] || [ "$left" -gt 0 ]; then\n'
    '        [ -z "$left" ] || echo $((left - 1)) >"$STATE/replace-fails"\n'
    '        echo "error: the server is currently unable to handle the request" >&2\n'
    "        exit 1\n"
    "      fi\n"
    "    fi ;;\n"
    "esac",
    reads_stdin=True,
)


@pytest.fixture
def sandbox(sandbox_support: None, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, {"kubectl": KUBECTL, "sleep": RECORD_ONLY})


def test_a_dropped_rewrite_is_tried_again_and_then_marked_done(sandbox: Sandbox) -> None:
    sandbox.put_state("replace-fails", "2")
    result = sandbox.run(rewrite_script(HOST, KEY).render())
    assert result.returncode == 0, result.stderr
    assert f"re-writing every Secret with {KEY} on {HOST} failed (attempt 1 of {REWRITE_ATTEMPTS})" in result.stderr
    assert sandbox.calls_of("sleep") == [[str(REWRITE_PAUSE_SECONDS)]] * 2
    assert sandbox.exists(REWRITTEN_MARKER)


def test_a_rewrite_that_never_goes_through_fails_naming_the_host_and_its_log(sandbox: Sandbox) -> None:
    sandbox.put_state("replace-fails")
    result = sandbox.run(rewrite_script(HOST, KEY).render())
    assert result.returncode == 1
    assert f"re-writing every Secret with {KEY} on {HOST} failed {REWRITE_ATTEMPTS} times; giving up" in result.stderr
    assert f"see /var/log/kubeadm-ha/encryption-rewrite.log on {HOST}" in result.stderr
    assert len(sandbox.calls_of("sleep")) == REWRITE_ATTEMPTS - 1
    assert not sandbox.exists(REWRITTEN_MARKER)
