"""coordinatord: the daemon. One task group; each subsystem is started in order with tg.start.

Start-up: state folders → control socket (status answers from here on) → database (embedded if
no DSN) and the leader lock → agent socket (and the agents, with --with-agents) → watcher armed
→ first listing and ledger resume → READY=1. Each batch then runs as its own task
(`Pipeline.run`), so batches overlap.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from coordinator import __version__
from coordinator.core import hooks
from coordinator.core.batch import FINAL, FileEntry, State, barrier, deadline_verdict, resume_step
from coordinator.core.config import Config, load_config, locate, redact_dsn
from coordinator.core.errors import ConfigError, CoordinatorError, DatabaseError
from coordinator.core.lake_paths import lake_root
from coordinator.core.logs import configure
from coordinator.core.topology import check_nodes, read_topology
from coordinator.daemon import embedded_pg, notify
from coordinator.daemon.hub import Hub, supervise
from coordinator.daemon.ledger import Ledger
from coordinator.daemon.metrics import Metrics
from coordinator.daemon.scanner import Scan, Scanner
from coordinator.daemon.watch import watch, watch_watchfiles

log = structlog.get_logger("coordinator.daemon.service")


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
    counted: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # model -> ident
    # The cross-check files as the second barrier counted them: model -> ident. The
    # aggregating agent copies exactly these (checked on the open file) or refuses.
    cc_counted: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    cc_event: anyio.Event = field(default_factory=anyio.Event)
    timings: dict[str, float] = field(default_factory=dict)
    staged_bytes: dict[str, int] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    placement_flag: str = ""
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


class Daemon:
    """The coordinator, embeddable: `await Daemon(config, path).run()`, `request_stop()`."""

    def __init__(self, config: Config, config_path: Path, *, with_agents: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.with_agents = with_agents
        self.state = "starting"
        self.started_at = time.time()
        self.generation = 1
        self.last_reload: dict[str, Any] = {
            "at": None,
            "ok": True,
            "error": "",
            "last_success_at": self.started_at,
        }
        self._recovering = False
        self.batches: dict[str, BatchRun] = {}
        self.finished: collections.deque[dict[str, Any]] = collections.deque(maxlen=10)
        self.ignored: set[str] = set()  # failed batches whose folder stays for the operator
        self.finished_ids: dict[str, State] = {}  # batches this run finished, with their state
        self.hub = Hub()
        self.scanner = Scanner(config.paths.staging, config.barrier.settle_s)
        self.lake_root = lake_root(config.paths.lake)[1]
        self.ledger: Ledger | None = None
        self.dsn = ""
        self._dirty: set[str] = set()
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._ready_or_stop = anyio.Event()
        self._tg: TaskGroup | None = None
        self.in_flight = anyio.Semaphore(config.batch.max_in_flight)
        self.exit_code = 0
        self.ready = False
        self.last_placement: dict[int, float] = {}  # node -> fraction of the last staged batch
        self.loop_lag: collections.deque[float] = collections.deque(maxlen=10_000)
        self.metrics = Metrics(self)

    # -- lifecycle ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the daemon to stop: it stops taking work and cancels; batches resume on restart."""
        self._stop.set()
        self._ready_or_stop.set()

    def _status_line(self, text: str) -> None:
        notify.notify(f"STATUS={text}")
        log.info(text)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every subsystem, serve until asked to stop, then shut down in reverse."""
        from coordinator.daemon.control import ControlServer

        cfg = self.config
        for p in (cfg.paths.staging, cfg.paths.state_dir):
            p.mkdir(parents=True, exist_ok=True)
        cfg.paths.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.paths.runtime_dir, 0o750)
        self._started_pg = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._signals)
                # Status answers from the start (connecting, standby), READY=1 comes later.
                await tg.start(ControlServer(self).serve, cfg.paths.control_socket)
                if cfg.metrics_listen:
                    await tg.start(self.metrics.serve, cfg.metrics_listen)
                tg.start_soon(self._watch_config)
                if cfg.loop_lag_interval_ms:
                    tg.start_soon(self._loop_lag, cfg.loop_lag_interval_ms / 1000)
                # Start-up runs as a task so a stop request (TERM while still connecting or
                # in standby) is honoured at any point.
                tg.start_soon(self._start_serving, tg)
                await self._ready_or_stop.wait()
                if self.ready:
                    task_status.started()
                await self._stop.wait()
                self.state = "stopping"
                notify.notify("STOPPING=1", "STATUS=stopping")
                log.info("stopping: in-flight steps are left resumable in the ledger")
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.ledger is not None:
                    await self.ledger.close()
                if cfg.database.embedded and self._started_pg:
                    await anyio.to_thread.run_sync(embedded_pg.stop, cfg.paths.state_dir)
                cfg.paths.control_socket.unlink(missing_ok=True)
                cfg.paths.agent_socket.unlink(missing_ok=True)
            self.state = "stopped"
            log.info("coordinator stopped")

    async def _start_serving(self, tg: TaskGroup) -> None:
        """Database and leadership, agents, watcher, first scan and resume; then READY=1."""
        cfg = self.config
        self.state = "connecting"
        self._status_line("connecting to the database")
        self._started_pg = await self._open_database()
        await tg.start(self.hub.serve, cfg.paths.agent_socket)
        if self.with_agents:
            for n in cfg.node_ids:
                await tg.start(supervise, self.hub, cfg, self.config_path, n)
        await tg.start(
            watch if cfg.barrier.backend == "inotify" else watch_watchfiles,
            cfg.paths.staging,
            cfg.barrier,
            self._mark,
            self.scanner.stats,
        )
        self._status_line("watcher armed; scanning staging and resuming the ledger")
        await self._resume()
        # From now on every batch in flight is known: copies of any other batch that an agent
        # still holds (a purge lost to a crash) are purged when it says hello.
        self.hub.on_hello = self._purge_leftovers
        for conn in list(self.hub.agents.values()):
            self._purge_leftovers(conn)
        self._mark({"*"})
        tg.start_soon(self._process_loop)
        tg.start_soon(self._reconcile_loop)
        tg.start_soon(self._deadline_loop)
        tg.start_soon(self._leadership_loop)
        assert self.ledger is not None
        tg.start_soon(self.ledger.flush_loop)
        interval = notify.watchdog_interval()
        if interval:
            tg.start_soon(self._watchdog, interval)
        self.state = "running"
        self.ready = True
        notify.notify("READY=1", "STATUS=running: waiting for batches")
        log.info(
            "coordinator ready",
            pid=os.getpid(),
            version=__version__,
            staging=str(cfg.paths.staging),
            nodes=list(cfg.node_ids),
            database=redact_dsn(self.dsn),
        )
        self._ready_or_stop.set()

    async def _open_database(self) -> bool:
        cfg = self.config
        started = False
        if cfg.database.embedded:
            self.dsn, started = await anyio.to_thread.run_sync(
                embedded_pg.start, cfg.paths.state_dir
            )
            started = True  # the daemon owns the embedded server: it stops it on a clean stop
        else:
            self.dsn = cfg.database.dsn
        password = None
        if cfg.database.password_file:
            try:
                password = (await anyio.Path(cfg.database.password_file).read_text()).strip()
            except OSError as e:
                raise ConfigError(
                    f"database.password_file {cfg.database.password_file}: {e.strerror}"
                ) from None
        self.ledger = Ledger(
            self.dsn, cfg.database.schema, retry_max_s=cfg.database.retry_max_s, password=password
        )
        delay = 0.2
        while True:
            try:
                await self.ledger.connect()
                break
            except DatabaseError as e:
                self._status_line(f"database unreachable, retrying in {delay:.1f} s: {e}")
                await anyio.sleep(delay)
                delay = min(delay * 2, cfg.database.retry_max_s)
        while not await self.ledger.acquire_leadership():
            self.state = "standby"
            self._status_line("standby: another coordinator holds the leader lock")
            await anyio.sleep(2.0)
        self.state = "starting"
        return started

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("signal received", signal=signal.Signals(sig).name)
                    self.request_stop()

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop itself: a blocked loop stops the pings and systemd notices.
        while True:
            notify.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    async def _watch_config(self) -> None:
        """Reload when the main file or a conf.d/*.toml drop-in changes (as on SIGHUP)."""
        import watchfiles

        folder = self.config_path.parent

        def relevant(_change: watchfiles.Change, path: str) -> bool:
            p = Path(path)
            # conf.d itself too: a drop-in written right after the folder is created can land
            # before the folder is watched.
            return (
                p == self.config_path
                or p == folder / "conf.d"
                or (p.parent.name == "conf.d" and p.suffix == ".toml")
            )

        # Not recursive: the config's folder may also hold data (a demo's state dir holds
        # staging, the lake and PostgreSQL's files), whose every write would wake the watcher.
        # The folder itself and conf.d are watched, each one level deep; when conf.d appears
        # or goes, the watch starts again with the new set.
        confd = folder / "conf.d"
        while True:
            watched = [folder, confd] if confd.is_dir() else [folder]
            async for _changes in watchfiles.awatch(
                *watched,
                watch_filter=relevant,
                debounce=300,
                rust_timeout=500,  # bounds how long a stop waits for the watcher thread
                step=500,  # the watcher thread wakes this often even when nothing changes
                recursive=False,
                ignore_permission_denied=True,
            ):
                log.info("config files changed; reloading")
                await self.reload()
                if (confd in watched) != confd.is_dir():
                    break

    async def _loop_lag(self, interval: float) -> None:
        """Sample event-loop lag: how late a sleep of `interval` wakes up."""
        while True:
            t0 = time.perf_counter()
            await anyio.sleep(interval)
            lag = time.perf_counter() - t0 - interval
            self.loop_lag.append(max(lag, 0.0))
            self.metrics.loop_lag(max(lag, 0.0))

    async def _leadership_loop(self) -> None:
        """Check the leader lock's connection; re-take the lock after an outage. If another
        coordinator took it meanwhile, stop (systemd restarts us into standby)."""
        assert self.ledger is not None
        while True:
            await anyio.sleep(1.0)
            if await self.ledger.check_leadership():
                continue
            log.warning("leader lock connection lost; writes wait until it is re-taken")
            while not await self.ledger.acquire_leadership():
                if self.ledger.held_elsewhere:
                    log.error("another coordinator holds the leader lock; stopping")
                    self.exit_code = 1
                    self.request_stop()
                    return
                await anyio.sleep(1.0)
            log.info("leader lock re-taken")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config; swap it in only if valid. New batches use it, running ones not."""
        # Before READY=1, systemd is still waiting for start-up: no RELOADING/READY then.
        if self.ready:
            notify.notify("RELOADING=1", f"MONOTONIC_USEC={notify.monotonic_usec()}")
        now = time.time()
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
            self._check_reloadable(new)
        except ConfigError as e:
            self.last_reload = {
                "at": now,
                "ok": False,
                "error": str(e),
                "last_success_at": self.last_reload.get("last_success_at"),
            }
            log.error("reload rejected; old config kept", error=str(e))
            self._notify_reloaded(f"STATUS=reload rejected: {e}")
            return self.last_reload
        self.config = new
        self.generation += 1
        self.last_reload = {"at": now, "ok": True, "error": "", "last_success_at": now}
        log.info("config reloaded", generation=self.generation, sources=list(new.sources))
        self._notify_reloaded("STATUS=running: config reloaded")
        self._mark({"*"})
        return self.last_reload

    def _notify_reloaded(self, status: str) -> None:
        if self.ready:
            notify.notify("READY=1", status)
        else:
            notify.notify(status)

    def _check_reloadable(self, new: Config) -> None:
        old = self.config

        def where(key: str) -> str:
            return locate(new.provenance.get(key, "<defaults>"), key)

        fixed: dict[str, tuple[object, object]] = {
            f"paths.{k}": (getattr(old.paths, k), getattr(new.paths, k))
            for k in ("staging", "lake", "node_tmpfs", "state_dir", "runtime_dir")
        }
        fixed["database.dsn"] = (old.database.dsn, new.database.dsn)
        fixed["database.schema"] = (old.database.schema, new.database.schema)
        fixed["metrics.listen"] = (old.metrics_listen, new.metrics_listen)
        for key, (a, b) in fixed.items():
            if a != b:
                raise ConfigError(
                    f"{where(key)}: {key} cannot change without a restart ({a!r} -> {b!r})"
                )
        if old.node_ids != new.node_ids:
            raise ConfigError(
                f"{where('node')}: the [[node]] ids cannot change without a restart "
                f"({list(old.node_ids)} -> {list(new.node_ids)})"
            )
        in_flight = [b for b in self.batches.values() if b.state not in FINAL]
        if in_flight and set(old.batch.models) != set(new.batch.models):
            raise ConfigError(
                f"{where('batch.models')}: batch.models cannot change while batches are in "
                f"flight ({', '.join(b.batch_id for b in in_flight)})"
            )

    # -- barrier ------------------------------------------------------------------------------

    def _mark(self, ids: set[str]) -> None:
        self._dirty |= ids
        self._wake.set()

    async def _process_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            ids, self._dirty = self._dirty, set()
            from_events = {i for i in ids if not i.startswith("*")}
            reconciling = "*reconcile" in ids
            if "*" in ids or reconciling:
                ids -= {"*", "*reconcile"}
                ids |= set(await anyio.to_thread.run_sync(self.scanner.batch_ids))
                ids |= {b for b, r in self.batches.items() if r.state not in FINAL}
            for bid in sorted(ids):
                # A batch that completes in a reconciliation pass without an event naming it
                # was recovered from a lost event.
                self._recovering = reconciling and bid not in from_events
                await self._look_at_guarded(bid)
            self._recovering = False
            if reconciling:
                self.scanner.stats.reconciled += 1

    async def _look_at_guarded(self, batch_id: str) -> None:
        """Look at one batch; an error about its files is that batch's, never the daemon's:
        it is logged (and shown in status), and the batch is looked at again at the next
        event or reconciliation, or fails at its deadline."""
        try:
            await self._look_at(batch_id)
            if (looked := self.batches.get(batch_id)) is not None:
                looked.looks += 1  # a whole look, its decisions made
        except (OSError, ValueError, UnicodeError, CoordinatorError) as e:
            self.scanner.stats.scan_errors += 1
            run = self.batches.get(batch_id)
            if run is not None and run.state is State.WAITING:
                run.error = f"could not look at its folder: {type(e).__name__}: {e}"
            log.error(
                "could not look at a batch folder; will look again",
                batch_id=batch_id,
                error=f"{type(e).__name__}: {e}",
            )

    async def _reconcile_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.barrier.reconcile_s)
            stats = self.scanner.stats
            stats.reconcile_scans += 1
            stats.last_reconcile = time.time()
            self._mark({"*reconcile"})

    async def _deadline_loop(self) -> None:
        while True:
            await anyio.sleep(0.5)
            now = time.time()
            for run in list(self.batches.values()):
                if run.state is State.WAITING and not run.running and now >= run.deadline:
                    try:
                        await self._deadline(run)
                    except OSError as e:  # its folder could not be read: try at the next turn
                        log.error("deadline check failed", batch_id=run.batch_id, error=str(e))

    async def _deadline(self, run: BatchRun) -> None:
        assert self.ledger is not None
        verdict = deadline_verdict(len(run.present), run.config.batch.quorum)
        if verdict is State.FAILED:
            run.error = (
                f"deadline {run.config.batch.deadline_s:.0f} s passed with "
                f"{len(run.present)} of {len(run.config.batch.models)} models "
                f"(quorum {run.config.batch.quorum}); missing {list(run.missing)}"
            )
            run.state = State.FAILED
            await self.ledger.flush(run.batch_id)
            await self.ledger.set_state(
                run.batch_id,
                State.FAILED,
                error=run.error,
                models_present=list(run.present),
                models_missing=list(run.missing),
                finished_at=dt.datetime.now(dt.UTC),
            )
            log.error("batch failed", batch_id=run.batch_id, reason=run.error)
            self._finish(run)
            return
        run.degraded = True
        run.error = f"went on at the deadline without {list(run.missing)}"
        log.warning("batch degraded", batch_id=run.batch_id, missing=list(run.missing))
        # What goes on is what is there now: count it, as the barrier does.
        scan = await anyio.to_thread.run_sync(
            self.scanner.scan, run.batch_id, run.config.batch.models
        )
        run.counted = {m: scan.results[m].ident for m in run.present if m in scan.results}
        await self._fire(run, degraded=True)

    async def _look_at(self, batch_id: str) -> None:
        if batch_id in self.ignored:
            return
        if batch_id in self.finished_ids and batch_id not in self.batches:
            # The daemon removed this folder itself: a new one is the batch published again.
            if await anyio.to_thread.run_sync(self.scanner.is_folder, batch_id):
                await anyio.to_thread.run_sync(
                    self.quarantine_all, batch_id, self.finished_ids[batch_id]
                )
            return
        run = self.batches.get(batch_id)
        cfg = run.config if run else self.config
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
                await self._fire(run, degraded=False)
        run.crosschecks = tuple(scan.valid_crosschecks())
        # The agents reported the files they wrote: another file under such a name is a
        # rewrite, quarantined and never aggregated.
        await self._quarantine_rewrites(
            batch_id,
            run.cc_counted,
            scan.crosschecks,
            "rewritten: the cross-check file changed after its agent wrote it",
        )
        if run.cc_counted and not run.cc_event.is_set():
            ready = scan.counted_crosschecks(run.models, run.cc_counted)
            if run.models and len(ready) == len(run.models):
                # The second barrier: counted once, as the first one counts the results.
                run.cc_counted = {m: scan.crosschecks[m].ident for m in run.models}
                run.cc_event.set()

    async def _quarantine_rewrites(
        self,
        batch_id: str,
        counted: dict[str, tuple[int, int, int]],
        found: dict[str, FileEntry],
        reason: str,
    ) -> None:
        """Quarantine each counted file that is now another file (a link, which has no
        identity, is reported by the scan and left where it is)."""
        for model, ident in counted.items():
            e = found.get(model)
            if e is not None and e.ident != ident and e.ident != (0, 0, 0):
                await anyio.to_thread.run_sync(self.scanner.quarantine, batch_id, e.name, reason)

    async def _adopt(self, batch_id: str) -> BatchRun | None:
        """First sight of a batch folder: create its ledger row, or find it finished."""
        assert self.ledger is not None
        now = time.time()
        cfg = self.config
        seen: dict[str, Any] = {
            "models_present": [],
            "models_missing": list(cfg.batch.models),
            "first_seen": dt.datetime.fromtimestamp(now, dt.UTC),
            "deadline_at": dt.datetime.fromtimestamp(now + cfg.batch.deadline_s, dt.UTC),
        }
        state: State | None = None
        if self.ledger.health.connected:
            with anyio.move_on_after(5.0):
                state = await self.ledger.record_seen(batch_id, **seen)
        if state is None:
            # The database is down: go on optimistically (the commit re-checks the ledger
            # under a row lock, so a batch finished before is never written twice).
            self.ledger.insert_seen_soon(batch_id, **seen)
            state = State.WAITING
        if state in FINAL:
            if state is State.FAILED:
                log.warning(
                    "folder of a failed batch in staging; left for the operator", batch_id=batch_id
                )
                self.ignored.add(batch_id)
                return None
            # A finished batch published again: never used twice; kept in quarantine.
            await anyio.to_thread.run_sync(self.quarantine_all, batch_id, state)
            return None
        if state is not State.WAITING:
            return None  # resumed from the ledger at start; nothing new here
        run = BatchRun(batch_id, cfg, State.WAITING, now, now + cfg.batch.deadline_s)
        self.batches[batch_id] = run
        log.info("batch seen", batch_id=batch_id)
        return run

    def _purge_leftovers(self, conn: Any) -> None:
        leftovers = [
            b
            for b in conn.hello.get("staged_batches", [])
            if isinstance(b, str) and b not in self.batches
        ]
        if not leftovers or self._tg is None:
            return
        log.warning(
            "purging node-local copies of batches not in flight", node=conn.node, batches=leftovers
        )

        async def purge() -> None:
            for b in leftovers:
                try:
                    await self.hub.request(
                        conn.node, {"type": "purge", "batch_id": b}, within_s=30.0
                    )
                except CoordinatorError as e:
                    log.warning("leftover purge failed", node=conn.node, batch_id=b, error=str(e))

        self._tg.start_soon(purge)

    def quarantine_all(self, batch_id: str, state: State) -> None:
        """Move a finished batch's new folder into the quarantine (blocking)."""
        self.scanner.quarantine_batch(
            batch_id, f"finished: batch {batch_id} is already {state.value}"
        )

    async def _resume(self) -> None:
        """Pick up every batch the ledger says is unfinished (after a crash or restart)."""
        assert self.ledger is not None
        for row in await self.ledger.open_batches():
            state = State(row["state"])
            first = dt.datetime.fromisoformat(row["first_seen"]).timestamp()
            deadline = (
                dt.datetime.fromisoformat(row["deadline_at"]).timestamp()
                if row["deadline_at"]
                else first + self.config.batch.deadline_s
            )
            run = BatchRun(
                row["batch_id"], self.config, state, first, deadline, degraded=bool(row["degraded"])
            )
            run.timings.update(row["timings"] or {})
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
            self.batches[run.batch_id] = run
            step = resume_step(state)
            log.info("resuming batch", batch_id=run.batch_id, state=state.value, step=step)
            if step != "barrier":
                self._start_pipeline(run, step)

    async def _fire(self, run: BatchRun, *, degraded: bool) -> None:
        assert self.ledger is not None
        now = time.time()
        run.models = run.present
        run.timings["barrier_wait_ms"] = round((now - run.first_seen) * 1000, 3)
        self.ledger.set_state_soon(
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
        run.state = State.READY
        hooks.crash_point("ready")
        log.info("batch ready", batch_id=run.batch_id, models=list(run.models), degraded=degraded)
        if self._recovering:
            self.scanner.stats.recovered_by_reconcile += 1
            log.warning(
                "barrier completed by reconciliation (events were missed)", batch_id=run.batch_id
            )
        self.metrics.batch_ready(run, now)
        self._start_pipeline(run, "stage")

    def _start_pipeline(self, run: BatchRun, step: str) -> None:
        from coordinator.daemon.pipeline import Pipeline

        assert self._tg is not None and self.ledger is not None
        run.running = True
        self._tg.start_soon(Pipeline(self, run).run, step)

    def _finish(self, run: BatchRun, *, count: bool = True) -> None:
        if count:
            self.metrics.batch_finished(run)
        self.scanner.forget(run.batch_id)
        self.batches.pop(run.batch_id, None)
        if run.state is State.FAILED:
            self.ignored.add(run.batch_id)
        else:
            self.finished_ids[run.batch_id] = run.state
        self.finished.appendleft(
            {**run.describe(), "finished_at": time.time(), "timings": dict(run.timings)}
        )

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `coordinatorctl status` shows."""
        cfg = self.config
        st = self.scanner.stats
        health = self.ledger.health if self.ledger else None
        state = self.state
        if state == "running" and health is not None and not health.connected:
            state = "degraded"
        return {
            "daemon": {
                "state": state,
                "ready": self.ready,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started_at, 3),
                "version": __version__,
                "with_agents": self.with_agents,
            },
            "config": {
                "generation": self.generation,
                "files": list(cfg.sources),
                "last_reload": self.last_reload,
                "models": list(cfg.batch.models),
                "quorum": cfg.batch.quorum,
                "deadline_s": cfg.batch.deadline_s,
            },
            "watcher": {
                "armed": st.armed,
                "events": st.events,
                "last_event": st.last_event or None,
                "reconcile_scans": st.reconcile_scans,
                "reconciled": st.reconciled,
                "last_reconcile": st.last_reconcile or None,
                "watcher_restarts": st.watcher_restarts,
                "rejected": dict(st.rejected),
                "quarantined": dict(st.quarantined),
                "quarantine_failed": st.quarantine_failed,
                "quarantine_refused": st.quarantine_refused or None,
                "scan_errors": st.scan_errors,
            },
            "agents": [
                {**a, "last_placement": self.last_placement.get(a["node"])}
                for a in self.hub.describe(cfg.node_ids)
            ],
            "database": {
                "embedded": cfg.database.embedded,
                "dsn": redact_dsn(self.dsn),
                "schema": cfg.database.schema,
                "connected": bool(health and health.connected),
                "leader": bool(health and health.leader),
                "last_error": health.last_error if health else "",
            },
            "batches": [b.describe() for b in self.batches.values()],
            "finished": list(self.finished),
        }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coordinatord`."""
    p = argparse.ArgumentParser(prog="coordinatord", description="NUMA-aware batch coordinator")
    p.add_argument("--config", required=True, help="path to coordinator.toml")
    p.add_argument(
        "--with-agents",
        action="store_true",
        help="start and supervise one staging-agent per configured node",
    )
    args = p.parse_args(argv)
    path = Path(args.config).resolve()
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    configure(config.log.level, config.log.format, role="coordinator")
    try:
        check_nodes(read_topology(), list(config.node_ids))
    except CoordinatorError as e:
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    daemon = Daemon(config, path, with_agents=args.with_agents)
    try:
        anyio.run(daemon.run, backend="asyncio", backend_options={"use_uvloop": True})
    except CoordinatorError as e:
        log.error("coordinator failed", error=str(e))
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
