"""The scale benchmark, run small so it cannot rot; its scaling checks are asserted, not just printed."""

from __future__ import annotations

import pytest

from benchmarks.scale import Measurement, main, measure, problems


def test_small_run_scales_linearly_with_a_constant_chain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "1", "3", "5", "--check"]) == 0
    out = capsys.readouterr().out
    assert "| 3 + 5 |" in out and "longest chain of remote steps" in out
    one, three, five = measure(1), measure(3), measure(5)
    assert three.resources - one.resources == five.resources - three.resources > 0
    # ready, configure-lb, init, CNI, then per further control plane: token, join, wait Ready (10); the kubelet
    # serving approval after every join (1); then the Secrets' encryption phases and the settings around them, one
    # control plane at a time: add, settings, promote (3 each), one rewrite, drop (3) (16). Constant in the
    # number of workers.
    assert one.longest_chain == three.longest_chain == five.longest_chain == 27


def test_checks_catch_a_growing_chain_and_slow_evaluation() -> None:
    fine = [Measurement(10, 0.5, 80, 107, 6), Measurement(100, 2.0, 128, 647, 6), Measurement(300, 6.0, 230, 1847, 6)]
    assert problems(fine) == []
    growing = [*fine[:2], Measurement(300, 6.0, 230, 1847, 7)]
    assert any("longest chain" in problem for problem in problems(growing))
    slow = [Measurement(100, 3.5, 400, 647, 6)]
    assert len(problems(slow)) == 2
    uneven = [*fine[:2], Measurement(300, 6.0, 230, 1900, 6)]
    assert any("per worker" in problem for problem in problems(uneven))
