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


def pause(name: str) -> None:
    """Sleep for the configured `<name>_pause_s` (blocking: called from worker threads)."""
    seconds = float(hooks().get(f"{name}_pause_s", 0))
    if seconds > 0:
        # A line the test waits for: the process is at the pause point now.
        print(f"test hook: pausing at {name} for {seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(seconds)
