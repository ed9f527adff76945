"""The labs' `Process.alive()` while another thread waits on the same child.

Found by CI (stop 25): test_drill_live's check "the drill's stop did not stop the API server" failed although
the hold had stopped it. The Kubelet stand-in's thread was still inside `Popen.wait()` for the exited
kube-apiserver, holding the waitpid lock, and `Popen.poll()` answers None ("know nothing yet") then, so
`alive()` said the dead process was running.
"""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, cast

from tests.integration.netns import Process, install_executable


def _process(tmp_path: Path) -> Process:
    popen = subprocess.Popen(["sleep", "60"])
    # No namespace: alive() reads only the child and /proc.
    return Process("sleep", cast(Any, None), ["sleep", "60"], tmp_path / "sleep.log", popen)


def _zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_child_that_exited_is_not_alive_while_another_thread_holds_its_wait(tmp_path: Path) -> None:
    process = _process(tmp_path)
    lock = process.popen._waitpid_lock  # type: ignore[attr-defined]  # what Popen.wait() holds in another thread
    assert lock.acquire(timeout=5)
    try:
        assert process.alive()
        process.popen.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _zombie(process.pid):
            assert time.monotonic() < deadline, "sleep did not exit within 10 s of SIGKILL"
            time.sleep(0.05)
        assert not process.alive(), "an exited child counted as alive while its waitpid lock was held"
    finally:
        lock.release()
        process.popen.kill()
        process.popen.wait(timeout=10)
    assert not process.alive()


def test_a_running_child_is_alive_while_another_thread_holds_its_wait(tmp_path: Path) -> None:
    process = _process(tmp_path)
    lock = process.popen._waitpid_lock  # type: ignore[attr-defined]
    assert lock.acquire(timeout=5)
    try:
        assert process.alive()
    finally:
        lock.release()
        process.popen.kill()
        process.popen.wait(timeout=10)


def test_an_executable_in_use_is_replaced_not_rewritten(tmp_path: Path) -> None:
    """Found by CI (Dec 5): the control-plane lab wrote the second load balancer's keepalived check script over
    the path the first keepalived was running, and the write failed with ETXTBSY. A running copy of `sleep`
    makes the clash certain: writing in place fails, `install_executable` replaces it and the runner is
    unaffected."""
    path = tmp_path / "check"
    shutil.copy2("/bin/sleep", path)
    running = subprocess.Popen([str(path), "30"])
    try:
        try:
            path.write_text("#!/bin/sh\nexit 0\n")
        except OSError as error:
            assert error.errno == errno.ETXTBSY
        else:
            raise AssertionError("writing over a running executable did not fail; the test proves nothing here")
        install_executable(path, "#!/bin/sh\nexit 0\n")
        assert subprocess.run([str(path)], timeout=10).returncode == 0
        assert running.poll() is None
        assert [entry.name for entry in tmp_path.iterdir()] == ["check"]  # no scratch file left
    finally:
        running.kill()
        running.wait(timeout=10)
