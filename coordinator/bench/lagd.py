"""The daemon the benchmark runs: coordinatord --with-agents, plus an event-loop lag sampler.

`python -m coordinator.bench.lagd --config FILE --lag-dir DIR` runs the real `Daemon` exactly as
`coordinatord --with-agents` does (same config, uvloop, agents under numactl), and in the same
event loop a sampler that is off until SIGUSR1. While on, it sleeps 1 ms at a time and records
how late each wake-up is, tagged with the pipeline step the batches in flight are in; SIGUSR2
turns it off and writes the samples to DIR/lag-<n>.json. Off, it costs nothing, so CPU figures
taken with it off are the daemon's own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from coordinator.core.batch import State
from coordinator.core.config import load_config
from coordinator.core.logs import configure
from coordinator.core.timings import Phase
from coordinator.daemon.service import Daemon

TICK_S = 0.001
# What a sample is tagged with: the latest step any batch in flight is in.
TAGS = ("idle", "barrier", "staging", "crosscheck", "aggregate", "commit", "archive", "cleanup")
_STEP = {
    State.WAITING: "barrier",
    State.READY: "barrier",
    State.STAGING: "staging",
    State.STAGED: "staging",
    State.CROSSCHECKING: "crosscheck",
    State.CROSSCHECKED: "crosscheck",
    State.AGGREGATING: "aggregate",
    State.COMMITTED: "archive",
    State.ARCHIVED: "cleanup",
}


def step_of(daemon: Daemon) -> str:
    """The step the batches in flight are in (the last one when several are in flight)."""
    best = 0
    for run in daemon.runs:
        tag = _STEP.get(run.state)
        if tag is None:
            continue
        if tag == "aggregate" and run.timings.has(Phase.AGGREGATE):
            tag = "commit"  # aggregated, now in Ledger.commit (the state changes after it)
        best = max(best, TAGS.index(tag))
    return TAGS[best]


class LagSampler:
    """A 1 ms ticker in the daemon's own loop, switched by SIGUSR1 (on) and SIGUSR2 (off)."""

    def __init__(self, daemon: Daemon, out_dir: Path) -> None:
        self.daemon = daemon
        self.out_dir = out_dir
        self.n = 0

    async def serve(self) -> None:
        """Wait for the signals; sample between them."""
        with anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as sigs:
            async for sig in sigs:
                if sig == signal.SIGUSR1:
                    await self._sample(sigs)

    async def _sample(self, sigs: AsyncIterator[signal.Signals]) -> None:
        times = array("d")
        lags = array("d")
        waits = array("d")  # of each lag, the time the loop's thread sat runnable without a CPU
        tags = array("b")
        stop = anyio.Event()
        # schedstat's second field: ns this thread spent waiting on a run queue.
        stat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)

        def run_wait() -> float:
            return int(os.pread(stat, 128, 0).split()[1]) / 1e6

        async def tick() -> None:
            clock = time.perf_counter
            while not stop.is_set():
                t0, w0 = clock(), run_wait()
                await anyio.sleep(TICK_S)
                lags.append((clock() - t0 - TICK_S) * 1000.0)
                waits.append(run_wait() - w0)
                times.append(time.time())
                tags.append(TAGS.index(step_of(self.daemon)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            async for sig in sigs:
                if sig == signal.SIGUSR2:
                    break
            stop.set()
        os.close(stat)
        self.n += 1
        path = self.out_dir / f"lag-{self.n}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        doc = {
            "tags": TAGS,
            "t": list(times),
            "lag_ms": list(lags),
            "run_wait_ms": list(waits),
            "tag": list(tags),
        }
        tmp.write_text(json.dumps(doc))
        tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="coordinator.bench.lagd")
    p.add_argument("--config", required=True)
    p.add_argument("--lag-dir", required=True)
    args = p.parse_args(argv)
    path = Path(args.config).resolve()
    config = load_config(path)
    configure(config.log.level, config.log.format, role="coordinator")
    daemon = Daemon(config, path, with_agents=True)
    sampler = LagSampler(daemon, Path(args.lag_dir))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.serve)
            await daemon.run()
            tg.cancel_scope.cancel()

    anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
