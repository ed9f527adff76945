"""What the drill measures and how it waits: the report's rows and table, the bounded polls of its checks.

Split from tools/drill.py, which decides what to stop and restores it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tools.access import say

POLL = 0.5
# A single read (an etcd status over SSH, a lease over HTTPS) retried while it fails: under load a socket read
# times out now and then, and that must neither end the drill nor count as an answer.
READ_BOUND = 30.0

T = TypeVar("T")


@dataclass
class Row:
    check: str
    before: str
    after: str
    held: bool
    seconds: float | None


@dataclass
class DrillReport:
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, before: object, after: object, held: bool, seconds: float | None) -> None:
        self.rows.append(Row(check, str(before), str(after), held, seconds))
        say(f"   {check}: {before} -> {after} ({'held' if held else 'FAILED'}" + _took(seconds) + ")")

    @property
    def passed(self) -> bool:
        return all(row.held for row in self.rows)

    def table(self) -> str:
        head = ("check", "before", "after", "held", "recovery (s)")
        lines = [head, *((r.check, r.before, r.after, "yes" if r.held else "NO", _num(r.seconds)) for r in self.rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
        out.insert(1, "-+-".join("-" * width for width in widths))
        return "\n".join(out)


def _num(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def _took(seconds: float | None) -> str:
    return "" if seconds is None else f", {seconds:.1f} s"


def wait(probe: Callable[[], T | None], bound: float) -> tuple[T | None, float]:
    """Poll `probe` until truthy or `bound` seconds; (value or None, seconds waited). Errors count as "not yet"."""
    started = time.monotonic()
    while True:
        try:
            value = probe()
        except Exception:  # a probe that fails (a connection refused) is just not ready yet
            value = None
        elapsed = time.monotonic() - started
        if value or elapsed >= bound:
            return (value or None), elapsed
        time.sleep(POLL)


def read(probe: Callable[[], T]) -> T:
    """`probe`'s answer, asked again while it raises, for at most READ_BOUND seconds; then its error."""
    started = time.monotonic()
    while True:
        try:
            return probe()
        except Exception:
            if time.monotonic() - started >= READ_BOUND:
                raise
            time.sleep(POLL)


def other_than(probe: Callable[[], str | None], excluded: str) -> Callable[[], str | None]:
    """A probe that answers only once `probe` names someone other than `excluded`."""
    return lambda: (lambda found: found if found not in (None, excluded) else None)(probe())


__all__ = ["DrillReport", "Row", "other_than", "read", "wait"]
