"""What one step of an agent cost: its peak resident memory and its CPU seconds.

The peak is the kernel's high-water mark of the agent process (`VmHWM` in /proc/self/status),
reset to the current RSS at the start of a step by writing 5 to /proc/self/clear_refs (Linux
4.0). `ru_maxrss` cannot serve: it is the process's peak over its whole life. The mark is the
process's, not a step's: while two steps overlap (two batches on one agent), neither resets it
under the other, so each reports a peak that includes the other's memory (an upper bound,
flagged `alone=False`). Where the reset is refused (an old kernel, /proc read-only), no peak is
reported at all rather than the lifetime one.

CPU seconds are the process's (user + system, all threads: pyarrow decodes in its own pool),
so they too include an overlapping step's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

__all__ = ["Meter", "StepUsage", "parse_hwm", "peak_rss", "reset_peak"]

log = structlog.get_logger("agents.accounting")

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def parse_hwm(status: str) -> int:
    """Bytes of the `VmHWM:` line of a /proc/PID/status text (pure); ValueError without one."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmHWM in {unit!r}, expected kB")
            return int(value) * 1024
    raise ValueError("no VmHWM line in the process status")


def peak_rss() -> int:
    """This process's resident-set high-water mark, in bytes."""
    return parse_hwm(STATUS.read_text())


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False when the kernel refuses."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class StepUsage:
    """One step's figures, filled in when it ends."""

    peak_rss: int | None = None  # bytes; None when the mark could not be reset
    cpu_s: float = 0.0  # the process's CPU seconds during the step
    alone: bool = True  # no other step ran at any time during this one


class Meter:
    """Counts the agent's steps in flight, so that a step resets the peak only when it runs
    alone, and tells a step whether another ran beside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._started = 0  # steps started so far
        self._warned = False
        self._reset_ok = True  # the last reset worked (a step not alone relies on it)

    @contextmanager
    def step(self) -> Iterator[StepUsage]:
        """Measure the step run inside the block."""
        with self._lock:
            self._active += 1
            self._started += 1
            alone = self._active == 1
            started = self._started
            reset = reset_peak() if alone else self._reset_ok
            if alone:
                self._reset_ok = reset
        if not reset and not self._warned:
            self._warned = True
            log.warning("cannot reset the peak RSS (/proc/self/clear_refs): no per-batch peak")
        usage = StepUsage(alone=alone)
        cpu0 = _cpu()
        try:
            yield usage
        finally:
            usage.cpu_s = _cpu() - cpu0
            with self._lock:
                usage.alone = alone and self._started == started and self._active == 1
                self._active -= 1
            usage.peak_rss = peak_rss() if reset else None


def _cpu() -> float:
    return time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: every thread, to the nanosecond


@contextmanager
def cpu_seconds() -> Iterator[list[float]]:
    """The process's CPU seconds spent inside the block, in the list's one item once done."""
    out = [0.0]
    cpu0 = _cpu()
    try:
        yield out
    finally:
        out[0] = _cpu() - cpu0
