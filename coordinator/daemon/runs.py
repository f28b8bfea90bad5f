"""The batches the daemon looks after: the one registry, and the only writer of a batch's state.

A batch is a `BatchRun` from the first sight of its folder (or its resumption from the ledger)
until it finishes. Its state moves only through `Runs.move`, by the transition rule of
`coordinator.core.batch.may_move`, or through `Runs.settle` when the ledger says it finished
elsewhere. `Runs.finish` takes it out of flight and remembers how it ended, so that its folder
published again is recognised.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from coordinator.core.batch import FINAL, State, may_move
from coordinator.core.config import Config
from coordinator.core.errors import CoordinatorError
from coordinator.core.messages import Aggregated, Crosschecked, Staged
from coordinator.core.timings import Timings
from coordinator.core.usage import BatchCompression, NodeUsage

Ident = tuple[int, int, int]  # (inode, size, mtime_ns): a file as the barrier counted it


@dataclass
class BatchRun:
    """A batch the daemon is looking after, with the config it started with."""

    batch_id: str
    config: Config
    state: State
    first_seen: float
    deadline: float
    present: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # the models this run goes on with
    degraded: bool = False
    error: str = ""
    running: bool = False
    crosschecks: tuple[str, ...] = ()
    counted: dict[str, Ident] = field(default_factory=dict)  # model -> ident
    # The cross-check files as the second barrier counted them: model -> ident. The
    # aggregating agent copies exactly these (checked on the open file) or refuses.
    cc_counted: dict[str, Ident] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    staged_bytes: dict[str, int] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    placement_flag: str = ""
    # What each node's agent copied and read for this batch, by where the pages were, and
    # its peak RSS (running totals over the attempts in this process); the batch's files'
    # compression as the first `staged` reply told it.
    usage: dict[int, NodeUsage] = field(default_factory=dict)
    compression: BatchCompression | None = None
    looks: int = 0  # scans of its folder so far (status: proof that the daemon looked again)

    @property
    def date(self) -> str:
        """The lake partition of this batch: the UTC day it was first seen."""
        return dt.datetime.fromtimestamp(self.first_seen, dt.UTC).strftime("%Y-%m-%d")

    def describe(self) -> dict[str, Any]:
        """What status shows about a batch in flight."""
        return {
            "batch_id": self.batch_id,
            "state": self.state.value,
            "present": list(self.present),
            "missing": list(self.missing),
            "age_s": round(time.time() - self.first_seen, 3),
            "deadline_in_s": round(self.deadline - time.time(), 3),
            "degraded": self.degraded,
            "error": self.error,
            "placement": {
                n: p.get("fraction") for n, p in self.placement.items() if isinstance(p, dict)
            },
            "placement_flag": self.placement_flag,
            "looks": self.looks,
        }

    def add_usage(self, node: int, reply: Staged | Crosschecked | Aggregated) -> None:
        """Fold an agent's reply into its node's accounting for this batch."""
        self.usage.setdefault(node, NodeUsage()).add(reply)

    def usage_rows(self) -> dict[str, dict[str, Any]]:
        """The ledger's `node_usage` of this batch: a copy, as it stands now."""
        return {str(n): u.as_row() for n, u in sorted(self.usage.items())}


class Runs:
    """The batches in flight, the last few finished, and how each batch of this run ended.

    `on_finished(run, count)` is called once per batch that leaves flight (`count`: False when
    it had finished before, in an earlier life, and is only being recognised again).
    """

    def __init__(self, on_finished: Callable[[BatchRun, bool], None]) -> None:
        self._in_flight: dict[str, BatchRun] = {}
        self.finished: collections.deque[dict[str, Any]] = collections.deque(maxlen=10)
        self.ignored: set[str] = set()  # failed batches whose folder stays for the operator
        self.ended: dict[str, State] = {}  # batches this run finished, with their state
        self._on_finished = on_finished

    def __iter__(self) -> Iterator[BatchRun]:
        return iter(list(self._in_flight.values()))

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._in_flight

    def __len__(self) -> int:
        return len(self._in_flight)

    def get(self, batch_id: str) -> BatchRun | None:
        return self._in_flight.get(batch_id)

    def add(self, run: BatchRun) -> BatchRun:
        """Take a batch into flight (first sight, or resumed from the ledger)."""
        self._in_flight[run.batch_id] = run
        return run

    def unfinished(self) -> list[BatchRun]:
        return [r for r in self._in_flight.values() if r.state not in FINAL]

    def move(self, run: BatchRun, state: State) -> None:
        """Move a batch to `state`; CoordinatorError if that is not a move a batch makes."""
        if not may_move(run.state, state):
            raise CoordinatorError(
                f"{run.state.value} -> {state.value} is not a move a batch makes"
            )
        run.state = state

    def settle(self, run: BatchRun, state: State) -> None:
        """The ledger's word on a batch that finished elsewhere (another life of the daemon,
        or the deadline while this one committed): `state` is final, whatever this run thought."""
        if state not in FINAL:
            raise CoordinatorError(f"settle: {state.value} is not a final state")
        run.state = state

    def finish(self, run: BatchRun, *, count: bool = True) -> None:
        """Take a batch out of flight, remembering how it ended."""
        self._on_finished(run, count)
        self._in_flight.pop(run.batch_id, None)
        if run.state is State.FAILED:
            self.ignored.add(run.batch_id)
        else:
            self.ended[run.batch_id] = run.state
        self.finished.appendleft(
            {**run.describe(), "finished_at": time.time(), "timings": run.timings.to_json()}
        )
