"""Fault-injection hooks for the test suite, off unless $NUMA_COORDINATOR_TEST_HOOKS is set.

The variable holds a JSON object, e.g. {"crash_at": "staged"} (the daemon SIGKILLs itself right
after the ledger records that state) or {"stage_pause_s": 2} (an agent pauses mid-copy, leaving
a partial file, so a test can kill it there). Production never sets it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from functools import cache
from typing import Any

ENV = "NUMA_COORDINATOR_TEST_HOOKS"


@cache
def hooks() -> dict[str, Any]:
    """The hook settings of this process (empty in production)."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


def crash_point(point: str) -> None:
    """SIGKILL this process if the test asked to crash at `point` (kill -9 semantics)."""
    if hooks().get("crash_at") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def pause(name: str, batch_id: str | None = None) -> None:
    """Sleep for the configured `<name>_pause_s` (blocking: called from worker threads).

    `<name>_pause_batch` limits the pause to that batch (other batches pass at once), and
    `<name>_pause_until` names a file whose appearance ends the pause early: a test holds one
    batch at a point for as long as it needs, while the others run."""
    h = hooks()
    seconds = float(h.get(f"{name}_pause_s", 0))
    only = h.get(f"{name}_pause_batch")
    if seconds <= 0 or (only is not None and batch_id != only):
        return
    # A line the test waits for: the process is at the pause point now.
    print(f"test hook: pausing at {name} for {seconds:g} s", file=sys.stderr, flush=True)
    until = h.get(f"{name}_pause_until")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if until is not None and os.path.exists(until):
            return
        time.sleep(min(0.05 if until is not None else seconds, max(0.0, end - time.monotonic())))
