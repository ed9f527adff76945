"""Shared policy for tests that drive real programs (daemons, network namespaces).

Locally a missing program or a non-root user *skips* such a test with the
reason. Under ``CI=true`` the same condition *fails* it: CI must install and
run everything, and a silently skipped suite proves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator

import pytest

# Root's PATH has the sbin directories; a CI user's may not.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the test because of `reason`, or fail it under CI=true."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (creates network namespaces and runs daemons)")


def require_programs(*names: str) -> dict[str, str]:
    """Absolute paths of `names`; skips (or fails under CI) listing every missing one."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = {name: shutil.which(name, path=search) for name in names}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        unavailable(f"missing program(s): {', '.join(missing)} (install the Debian packages listed in the test module)")
    return {name: path for name, path in found.items() if path is not None}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item so fixtures can tell, in teardown,
    # whether the test failed (and print daemon logs only then).
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def phase_failed(request: pytest.FixtureRequest) -> bool:
    """True in a fixture's teardown when the test's setup or call failed."""
    return any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call"))
