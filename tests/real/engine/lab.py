"""`tests/real/engine-lab`: build the Pulumi toolchain, run the engine tests, print one summary line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from tempfile import TemporaryDirectory

from tests.real.engine import toolchain

BUILD = toolchain.ROOT / "tests" / "real" / "build-binaries"
BUILD_TIMEOUT_SECONDS = 3600
TEST_TIMEOUT_SECONDS = 3 * 3600


def build_all() -> tuple[dict[str, str], dict[str, str]]:
    """Each name on its own, so one refused name does not hide the others: (built, failed reasons)."""
    built: dict[str, str] = {}
    failed: dict[str, str] = {}
    for name in toolchain.TOOLS:
        started = time.monotonic()
        cold = not toolchain.cached(name).is_file()
        try:
            done = subprocess.run(
                [sys.executable, str(BUILD), name],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            failed[name] = f"build timed out after {BUILD_TIMEOUT_SECONDS} s"
            continue
        sys.stderr.write(done.stderr)
        seconds = time.monotonic() - started
        if done.returncode == 0:
            version = done.stdout.split()[1]
            built[name] = f"{version} ({'cold' if cold else 'cached'} {seconds:.0f} s)"
        else:
            failed[name] = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit {done.returncode}"
    return built, failed


def run_tests(args: list[str]) -> tuple[dict[str, int], float]:
    started = time.monotonic()
    with TemporaryDirectory(prefix="engine-lab-") as scratch:
        report = Path(scratch) / "junit.xml"
        env = {**os.environ, "KUBEADM_HA_ENGINE_LAB": "1"}
        argv = [sys.executable, "-m", "pytest", "tests/real/engine", "-p", "no:cacheprovider", "-ra"]
        argv += [f"--junitxml={report}", *args]
        try:
            subprocess.run(argv, cwd=toolchain.ROOT, env=env, timeout=TEST_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            return {"tests": 0, "failures": 1, "errors": 0, "skipped": 0, "timeout": 1}, time.monotonic() - started
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    return counts, time.monotonic() - started


def main(args: list[str]) -> int:
    started = time.monotonic()
    built, failed = build_all()
    for name, reason in failed.items():
        print(f"engine-lab: {name} not built: {reason}", file=sys.stderr)
    counts, test_seconds = run_tests(args)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = not failed and counts["tests"] > 0 and passed == counts["tests"]
    tools = "; ".join(f"{name} {how}" for name, how in built.items()) or "none"
    print(
        f"engine-lab: {'PASS' if ok else 'FAIL'}: toolchain {len(built)}/{len(toolchain.TOOLS)} built [{tools}]"
        + (f", not built: {', '.join(failed)}" if failed else "")
        + f"; tests {passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
        + f" in {test_seconds:.0f} s; total {time.monotonic() - started:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
