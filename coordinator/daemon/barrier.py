"""The barrier: looks at batch folders when the watcher says they changed, counts each batch's
results, and hands a complete batch to its pipeline; the deadline, the reconciliation scan, the
resumption from the ledger and the second barrier (the cross-check files) live here too.

What a folder holds is the scanner's (`coordinator.daemon.scanner`); the rule that says a batch
is complete is `coordinator.core.batch.barrier`; the batches are `coordinator.daemon.runs`'.
Every look at a folder is one batch's business: an error there is logged for that batch, never
the daemon's.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import structlog

from coordinator.core import hooks
from coordinator.core.batch import (
    FINAL,
    FileEntry,
    State,
    Step,
    barrier,
    deadline_verdict,
    resume_step,
)
from coordinator.core.config import Config
from coordinator.core.errors import AgentError, BatchOfAnotherHost, CoordinatorError
from coordinator.core.timings import Phase
from coordinator.daemon.ledger import Ledger
from coordinator.daemon.runs import BatchRun, Ident, Runs
from coordinator.daemon.scanner import Scan, Scanner
from coordinator.daemon.watch import Rescan

log = structlog.get_logger("coordinator.daemon.barrier")


class BarrierLoop:
    """Marks batches to look at (`mark`), looks at them in one task (`run`), and starts a
    pipeline (`start_pipeline(run, step)`) for each batch that is complete or resumed."""

    def __init__(
        self,
        config: Callable[[], Config],
        scanner: Scanner,
        runs: Runs,
        start_pipeline: Callable[[BatchRun, Step], None],
        on_ready: Callable[[BatchRun, float], None],
    ) -> None:
        self._config = config
        self.scanner = scanner
        self.runs = runs
        self._start_pipeline = start_pipeline
        self._on_ready = on_ready
        self.ledger: Ledger | None = None  # set once the database is open
        self._dirty: set[str | Rescan] = set()
        self._wake = anyio.Event()
        self._cc_waiters: dict[str, anyio.Event] = {}

    # -- what to look at ------------------------------------------------------------------------

    def mark(self, ids: Iterable[str | Rescan]) -> None:
        """Look at these batches (or, with a Rescan mark, at every folder) soon."""
        self._dirty.update(ids)
        self._wake.set()

    def rescan(self) -> None:
        """Look at every folder in staging soon (start, reload)."""
        self.mark({Rescan.STAGING})

    async def run(self) -> None:
        """The one task that looks at folders, in order, each batch once per wake-up."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            marks, self._dirty = self._dirty, set()
            named = {m for m in marks if isinstance(m, str)}
            reconciling = Rescan.RECONCILE in marks
            ids = set(named)
            if reconciling or Rescan.STAGING in marks:
                ids |= set(await anyio.to_thread.run_sync(self.scanner.batch_ids))
                ids |= {r.batch_id for r in self.runs.unfinished()}
            for bid in sorted(ids):
                # A batch that completes in a reconciliation pass without an event naming it
                # was recovered from a lost event.
                await self._look_at_guarded(bid, recovering=reconciling and bid not in named)
            if reconciling:
                self.scanner.stats.reconciled += 1

    async def reconcile_loop(self) -> None:
        """Every barrier.reconcile_s, look at everything: events can be lost."""
        while True:
            await anyio.sleep(self._config().barrier.reconcile_s)
            stats = self.scanner.stats
            stats.reconcile_scans += 1
            stats.last_reconcile = time.time()
            self.mark({Rescan.RECONCILE})

    async def deadline_loop(self) -> None:
        """Batches past their deadline go on degraded with a quorum, or fail without one."""
        while True:
            await anyio.sleep(0.5)
            now = time.time()
            for run in self.runs:
                if run.state is State.WAITING and not run.running and now >= run.deadline:
                    try:
                        await self._deadline(run)
                    except OSError as e:  # its folder could not be read: try at the next turn
                        log.error("deadline check failed", batch_id=run.batch_id, error=str(e))

    # -- looking at one batch -------------------------------------------------------------------

    async def _look_at_guarded(self, batch_id: str, *, recovering: bool) -> None:
        """Look at one batch; an error about its files is that batch's, never the daemon's:
        it is logged (and shown in status), and the batch is looked at again at the next
        event or reconciliation, or fails at its deadline."""
        try:
            await self._look_at(batch_id, recovering=recovering)
            if (looked := self.runs.get(batch_id)) is not None:
                looked.looks += 1  # a whole look, its decisions made
        except (OSError, ValueError, UnicodeError, CoordinatorError) as e:
            self.scanner.stats.scan_errors += 1
            run = self.runs.get(batch_id)
            if run is not None and run.state is State.WAITING:
                run.error = f"could not look at its folder: {type(e).__name__}: {e}"
            log.error(
                "could not look at a batch folder; will look again",
                batch_id=batch_id,
                error=f"{type(e).__name__}: {e}",
            )

    async def _look_at(self, batch_id: str, *, recovering: bool) -> None:
        if batch_id in self.runs.ignored:
            return
        if batch_id in self.runs.ended and batch_id not in self.runs:
            # The daemon removed this folder itself: a new one is the batch published again.
            if await anyio.to_thread.run_sync(self.scanner.is_folder, batch_id):
                await anyio.to_thread.run_sync(
                    self.quarantine_all, batch_id, self.runs.ended[batch_id]
                )
            return
        run = self.runs.get(batch_id)
        cfg = run.config if run else self._config()
        scan: Scan = await anyio.to_thread.run_sync(self.scanner.scan, batch_id, cfg.batch.models)
        if run is None:
            if not scan.exists:
                return
            run = await self._adopt(batch_id)
            if run is None:
                return
        for name, reason in scan.settled_bad:
            await anyio.to_thread.run_sync(
                self.scanner.quarantine, batch_id, name, f"corrupt: {reason}"
            )
        # The batch's file set is frozen once counted: a rewrite is quarantined, never used
        # (the batch goes on with the copies staged from the counted content).
        await self._quarantine_rewrites(
            batch_id,
            run.counted,
            scan.results,
            "rewritten: the file changed after the batch counted it",
        )
        if run.state is State.WAITING and scan.exists:
            b = barrier(run.config.batch.models, scan.valid_models())
            run.present, run.missing = b.present, b.missing
            if b.complete and not run.running:
                run.counted = {m: scan.results[m].ident for m in b.present}
                await self._fire(run, degraded=False, recovering=recovering)
        run.crosschecks = tuple(scan.valid_crosschecks())
        # The agents reported the files they wrote: another file under such a name is a
        # rewrite, quarantined and never aggregated.
        await self._quarantine_rewrites(
            batch_id,
            run.cc_counted,
            scan.crosschecks,
            "rewritten: the cross-check file changed after its agent wrote it",
        )
        waiter = self._cc_waiters.get(batch_id)
        if waiter is not None and not waiter.is_set():
            ready = scan.counted_crosschecks(run.models, run.cc_counted)
            if run.models and len(ready) == len(run.models):
                # The second barrier: counted once, as the first one counts the results.
                run.cc_counted = {m: scan.crosschecks[m].ident for m in run.models}
                waiter.set()

    async def _quarantine_rewrites(
        self, batch_id: str, counted: dict[str, Ident], found: dict[str, FileEntry], reason: str
    ) -> None:
        """Quarantine each counted file that is now another file (a link, which has no
        identity, is reported by the scan and left where it is)."""
        for model, ident in counted.items():
            e = found.get(model)
            if e is not None and e.ident != ident and e.ident != (0, 0, 0):
                await anyio.to_thread.run_sync(self.scanner.quarantine, batch_id, e.name, reason)

    def quarantine_all(self, batch_id: str, state: State) -> None:
        """Move a finished batch's new folder into the quarantine (blocking)."""
        self.scanner.quarantine_batch(
            batch_id, f"finished: batch {batch_id} is already {state.value}"
        )

    # -- the second barrier ---------------------------------------------------------------------

    async def crosschecks(
        self, run: BatchRun, reported: dict[str, Ident], within_s: float
    ) -> dict[str, Ident]:
        """The second barrier: wait until every model's cross-check file in staging is the
        one its agent reported (`reported`), and return them as counted. Any other file under
        such a name is a rewrite (quarantined). AgentError when, after `within_s` and a last
        look, a file is missing or not the reported one."""
        run.cc_counted = dict(reported)
        waiter = self._cc_waiters[run.batch_id] = anyio.Event()
        try:
            self.mark({run.batch_id})
            with anyio.move_on_after(within_s):
                await waiter.wait()
            if waiter.is_set():
                return run.cc_counted
        finally:
            self._cc_waiters.pop(run.batch_id, None)
        models = list(run.models)
        scan = await anyio.to_thread.run_sync(
            self.scanner.scan, run.batch_id, run.config.batch.models
        )
        missing = set(models) - set(scan.counted_crosschecks(models, run.cc_counted))
        if missing:
            raise AgentError(
                f"cross-check files missing or rewritten after the step: {sorted(missing)}"
            )
        run.cc_counted = {m: scan.crosschecks[m].ident for m in models}
        return run.cc_counted

    # -- first sight, deadline, readiness, resumption -------------------------------------------

    def _ledger(self) -> Ledger:
        if self.ledger is None:
            raise CoordinatorError("the barrier looked at a batch before the database was open")
        return self.ledger

    async def _adopt(self, batch_id: str) -> BatchRun | None:
        """First sight of a batch folder: create its ledger row, or find it finished."""
        ledger = self._ledger()
        now = time.time()
        cfg = self._config()
        seen: dict[str, Any] = {
            "models_present": [],
            "models_missing": list(cfg.batch.models),
            "first_seen": dt.datetime.fromtimestamp(now, dt.UTC),
            "deadline_at": dt.datetime.fromtimestamp(now + cfg.batch.deadline_s, dt.UTC),
        }
        state: State | None = None
        if ledger.health.connected:
            try:
                with anyio.move_on_after(5.0):
                    state = await ledger.record_seen(batch_id, **seen)
            except BatchOfAnotherHost as e:
                # Another host's batch id: never ours, never written; its files are kept.
                log.error(
                    "batch id taken by another host; quarantined", batch_id=batch_id, error=str(e)
                )
                await anyio.to_thread.run_sync(self.scanner.quarantine_batch, batch_id, str(e))
                return None
        if state is None:
            # The database is down: go on optimistically (the commit re-checks the ledger
            # under a row lock, so a batch finished before is never written twice).
            ledger.insert_seen_soon(batch_id, **seen)
            state = State.WAITING
        if state in FINAL:
            if state is State.FAILED:
                log.warning(
                    "folder of a failed batch in staging; left for the operator", batch_id=batch_id
                )
                self.runs.ignored.add(batch_id)
                return None
            # A finished batch published again: never used twice; kept in quarantine.
            await anyio.to_thread.run_sync(self.quarantine_all, batch_id, state)
            return None
        if state is not State.WAITING:
            return None  # resumed from the ledger at start; nothing new here
        run = self.runs.add(BatchRun(batch_id, cfg, State.WAITING, now, now + cfg.batch.deadline_s))
        log.info("batch seen", batch_id=batch_id)
        return run

    async def _deadline(self, run: BatchRun) -> None:
        ledger = self._ledger()
        verdict = deadline_verdict(len(run.present), run.config.batch.quorum)
        if verdict is State.FAILED:
            run.error = (
                f"deadline {run.config.batch.deadline_s:.0f} s passed with "
                f"{len(run.present)} of {len(run.config.batch.models)} models "
                f"(quorum {run.config.batch.quorum}); missing {list(run.missing)}"
            )
            self.runs.move(run, State.FAILED)
            await ledger.flush(run.batch_id)
            await ledger.set_state(
                run.batch_id,
                State.FAILED,
                error=run.error,
                models_present=list(run.present),
                models_missing=list(run.missing),
                finished_at=dt.datetime.now(dt.UTC),
            )
            log.error("batch failed", batch_id=run.batch_id, reason=run.error)
            self.runs.finish(run)
            return
        run.degraded = True
        run.error = f"went on at the deadline without {list(run.missing)}"
        log.warning("batch degraded", batch_id=run.batch_id, missing=list(run.missing))
        # What goes on is what is there now: count it, as the barrier does.
        scan = await anyio.to_thread.run_sync(
            self.scanner.scan, run.batch_id, run.config.batch.models
        )
        run.counted = {m: scan.results[m].ident for m in run.present if m in scan.results}
        await self._fire(run, degraded=True, recovering=False)

    async def _fire(self, run: BatchRun, *, degraded: bool, recovering: bool) -> None:
        ledger = self._ledger()
        now = time.time()
        run.models = run.present
        run.timings.set(Phase.BARRIER_WAIT, (now - run.first_seen) * 1000)
        ledger.set_state_soon(
            run.batch_id,
            State.READY,
            models_present=list(run.present),
            models_missing=list(run.missing),
            degraded=degraded,
            ready_at=dt.datetime.fromtimestamp(now, dt.UTC),
            timings=run.timings,
            error=run.error or None,
            counted={m: list(ident) for m, ident in run.counted.items()},
        )
        self.runs.move(run, State.READY)
        hooks.crash_point("ready")
        log.info("batch ready", batch_id=run.batch_id, models=list(run.models), degraded=degraded)
        if recovering:
            self.scanner.stats.recovered_by_reconcile += 1
            log.warning(
                "barrier completed by reconciliation (events were missed)", batch_id=run.batch_id
            )
        self._on_ready(run, now)
        self._start_pipeline(run, Step.STAGE)

    async def resume(self) -> None:
        """Pick up every batch the ledger says is unfinished (after a crash or restart)."""
        cfg = self._config()
        for row in await self._ledger().open_batches():
            state = State(row["state"])
            first = dt.datetime.fromisoformat(row["first_seen"]).timestamp()
            deadline = (
                dt.datetime.fromisoformat(row["deadline_at"]).timestamp()
                if row["deadline_at"]
                else first + cfg.batch.deadline_s
            )
            run = BatchRun(
                row["batch_id"], cfg, state, first, deadline, degraded=bool(row["degraded"])
            )
            run.timings.merge(row["timings"] or {})
            if state is not State.WAITING:
                run.models = tuple(row["models_present"])
                run.present = run.models
                run.missing = tuple(row["models_missing"])
                # The barrier's count survives the restart: a file rewritten meanwhile is
                # still refused (quarantined, and never copied by an agent).
                run.counted = {
                    str(m): (int(v[0]), int(v[1]), int(v[2]))
                    for m, v in (row.get("counted") or {}).items()
                }
            self.runs.add(run)
            step = resume_step(state)
            log.info("resuming batch", batch_id=run.batch_id, state=state.value, step=step)
            if step is not Step.BARRIER:
                self._start_pipeline(run, step)
