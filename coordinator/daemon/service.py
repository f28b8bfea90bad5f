"""coordinatord's composition root: builds the daemon's parts, starts them in order, stops them
in reverse, and answers for the whole (status, reload, stop).

The parts (docs/architecture.md): the watcher (`watch`) marks batch folders for the barrier
loop (`barrier`), which counts them with the scanner and starts a pipeline (`pipeline`) per
complete batch; the batches live in one registry (`runs`); the agents are reached through the
hub (`hub`); the ledger (`ledger`, `leader`) is PostgreSQL; `control` and `metrics` read the
typed `status` snapshot; `reload` swaps in a new config. systemd hears READY=1 once every part
is up (`notify`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from coordinator import __version__
from coordinator.core.batch import Step
from coordinator.core.config import Config, redact_dsn
from coordinator.core.errors import CoordinatorError
from coordinator.core.iceberg import ensure_tables, lake_spec
from coordinator.core.lake_paths import lake_root
from coordinator.core.messages import Purge
from coordinator.daemon import embedded_pg, notify
from coordinator.daemon.barrier import BarrierLoop
from coordinator.daemon.control import ControlServer
from coordinator.daemon.hub import AgentConn, Hub, TcpListen, check_agent_tls, supervise
from coordinator.daemon.leader import keep_leadership, open_ledger
from coordinator.daemon.ledger import Ledger
from coordinator.daemon.listen import listen
from coordinator.daemon.metrics import Metrics
from coordinator.daemon.pipeline import Context, Pipeline
from coordinator.daemon.reload import Reloader
from coordinator.daemon.runs import BatchRun, Runs
from coordinator.daemon.scanner import Scanner
from coordinator.daemon.status import (
    AgentInfo,
    ConfigInfo,
    DaemonInfo,
    DatabaseInfo,
    ReloadInfo,
    Status,
    WatcherInfo,
)
from coordinator.daemon.watch import poll, watch, watch_watchfiles

log = structlog.get_logger("coordinator.daemon.service")


class Daemon:
    """The coordinator, embeddable: `await Daemon(config, path).run()`, `request_stop()`."""

    def __init__(self, config: Config, config_path: Path, *, with_agents: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.with_agents = with_agents
        self.state = "starting"
        self.started_at = time.time()
        self.hub = Hub(ping_s=config.agents.heartbeat_s)
        # Over TCP: the TLS files are read (and a key others may read refused) now, at start.
        self.agents_tcp = None if config.agents.listen == "unix" else TcpListen.from_config(config)
        if self.agents_tcp is not None and with_agents:
            check_agent_tls(config)
        self.scanner = Scanner(config.paths.staging, config.barrier.settle_s)
        self.lake_root = lake_root(config.paths.lake)[1]
        self.ledger: Ledger | None = None
        self.dsn = ""
        self.metrics = Metrics(config.node_ids, self.status, host=config.host.id)
        self.runs = Runs(on_finished=self._finished)
        self.barrier = BarrierLoop(
            lambda: self.config,
            self.scanner,
            self.runs,
            start_pipeline=self._start_pipeline,
            on_ready=self.metrics.batch_ready,
        )
        self.reloader = Reloader(
            config_path,
            current=lambda: self.config,
            apply=self._apply_config,
            in_flight=lambda: [r.batch_id for r in self.runs.unfinished()],
            ready=lambda: self.ready,
        )
        self._stop = anyio.Event()
        self._ready_or_stop = anyio.Event()
        self._tg: TaskGroup | None = None
        self._started_pg = False
        self._ctx: Context | None = None  # once the ledger exists
        self.in_flight = anyio.Semaphore(config.batch.max_in_flight)
        self.exit_code = 0
        self.ready = False
        self.last_placement: dict[int, float] = {}  # node -> fraction of the last staged batch
        self.loop_lag: collections.deque[float] = collections.deque(maxlen=10_000)

    # -- lifecycle ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the daemon to stop: it stops taking work and cancels; batches resume on restart."""
        self._stop.set()
        self._ready_or_stop.set()

    def _status_line(self, text: str) -> None:
        notify.notify(f"STATUS={text}")
        log.info(text)

    def _set_state(self, state: str) -> None:
        self.state = state

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every part, serve until asked to stop, then shut down in reverse."""
        cfg = self.config
        for p in (cfg.paths.staging, cfg.paths.state_dir):
            p.mkdir(parents=True, exist_ok=True)
        cfg.paths.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.paths.runtime_dir, 0o750)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._signals)
                # Status answers from the start (connecting, standby), READY=1 comes later.
                await tg.start(ControlServer(self).serve, cfg.paths.control_socket)
                if cfg.metrics_listen:
                    await tg.start(self.metrics.serve, cfg.metrics_listen)
                tg.start_soon(self.reloader.watch)
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

    def _made_ledger(self, ledger: Ledger, dsn: str) -> None:
        self.ledger, self.dsn = ledger, dsn
        ledger.on_fenced = self._fenced
        self.barrier.ledger = ledger
        # What every batch's pipeline works with, from now on.
        self._ctx = Context(
            hub=self.hub,
            ledger=ledger,
            runs=self.runs,
            barrier=self.barrier,
            scanner=self.scanner,
            metrics=self.metrics,
            lake_root=self.lake_root,
            in_flight=self.in_flight,
            last_placement=self.last_placement,
        )

    async def _start_serving(self, tg: TaskGroup) -> None:
        """Database and leadership, agents, watcher, first scan and resume; then READY=1."""
        cfg = self.config
        self.state = "connecting"
        self._status_line("connecting to the database")
        self._started_pg = await open_ledger(
            cfg, self._status_line, self._set_state, self._made_ledger
        )
        ledger = self.ledger
        assert ledger is not None  # open_ledger made it
        if cfg.lake.format == "iceberg":
            await self._open_iceberg(ledger)
        # The lease is renewed from now on: a start slower than host.lease_s is no takeover.
        tg.start_soon(keep_leadership, ledger, self._lost_leadership)
        if self.agents_tcp is None:
            await tg.start(self.hub.serve, cfg.paths.agent_socket)
        else:
            await tg.start(self.hub.serve_tcp, self.agents_tcp)
        if self.with_agents:
            for n in cfg.node_ids:
                if not cfg.node(n).remote:  # a remote node's agent runs in its own kernel
                    await tg.start(supervise, self.hub, cfg, self.config_path, n)
        await self._start_watcher(tg, ledger)
        self._status_line("watcher armed; scanning staging and resuming the ledger")
        await self.barrier.resume()
        # From now on every batch in flight is known: copies of any other batch that an agent
        # still holds (a purge lost to a crash) are purged when it says hello.
        self.hub.on_hello = self._purge_leftovers
        for conn in list(self.hub.agents.values()):
            self._purge_leftovers(conn)
        self.barrier.rescan()
        tg.start_soon(self.barrier.run)
        tg.start_soon(self.barrier.reconcile_loop)
        tg.start_soon(self.barrier.deadline_loop)
        tg.start_soon(ledger.flush_loop)
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
            host=cfg.host.id,
            epoch=ledger.epoch,
            staging=str(cfg.paths.staging),
            nodes=list(cfg.node_ids),
            database=redact_dsn(self.dsn),
        )
        self._ready_or_stop.set()

    async def _open_iceberg(self, ledger: Ledger) -> None:
        """The Iceberg lake: its catalog schema and tables, created where absent (docs/lake.md)."""
        cfg = self.config
        self._status_line("creating the Iceberg lake's tables where absent")
        from sqlalchemy.exc import DBAPIError  # the catalog's driver, loaded for this lake only

        spec = lake_spec(cfg, self.dsn, ledger.password or "")
        delay = 0.2
        while True:
            try:
                await anyio.to_thread.run_sync(ensure_tables, spec)
                break
            except DBAPIError as e:
                # The database went away, or another coordinator made the same schema or
                # tables at the same moment: look again (what exists now is kept).
                log.warning("iceberg catalog not ready, retrying", error=str(e), retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, cfg.database.retry_max_s)
        assert self._ctx is not None  # made with the ledger
        self._ctx = dataclasses.replace(self._ctx, lake=spec)
        log.info("iceberg lake ready", warehouse=spec.warehouse, catalog_schema=spec.schema)

    async def _start_watcher(self, tg: TaskGroup, ledger: Ledger) -> None:
        """Start what tells the barrier which batch folders to look at (barrier.backend)."""
        cfg = self.config
        mark, stats = self.barrier.mark, self.scanner.stats
        backend = cfg.barrier.backend
        if backend == "inotify":
            await tg.start(watch, cfg.paths.staging, cfg.barrier, mark, stats)
        elif backend == "watchfiles":
            await tg.start(watch_watchfiles, cfg.paths.staging, cfg.barrier, mark, stats)
        elif backend == "notify":
            # The producers announce on the database: LISTEN on a connection of its own. No
            # inotify here: on the folders this is for it hears nothing, and on some of them
            # it cannot even be armed (docs/config.md, [barrier]).
            await tg.start(
                functools.partial(listen, retry_max_s=cfg.database.retry_max_s),
                self.dsn,
                ledger.password,
                cfg.database.schema,
                mark,
                stats,
            )
        else:
            await tg.start(poll, lambda: self.config.barrier, mark, stats)

    def _fenced(self, why: str) -> None:
        # Another coordinator of this host leads now: stop (exit 1; systemd restarts this one
        # into standby). Writes refused meanwhile wait for the stop.
        log.error("fenced: stopping", host=self.config.host.id, reason=why)
        self._lost_leadership()

    def _lost_leadership(self) -> None:
        self.exit_code = 1
        self.request_stop()

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

    async def _loop_lag(self, interval: float) -> None:
        """Sample event-loop lag: how late a sleep of `interval` wakes up."""
        while True:
            t0 = time.perf_counter()
            await anyio.sleep(interval)
            lag = time.perf_counter() - t0 - interval
            self.loop_lag.append(max(lag, 0.0))
            self.metrics.loop_lag(max(lag, 0.0))

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read the config (see `coordinator.daemon.reload`); the last reload's outcome."""
        return await self.reloader.reload()

    def _apply_config(self, new: Config) -> None:
        self.config = new
        self.barrier.rescan()

    # -- batches ------------------------------------------------------------------------------

    def _start_pipeline(self, run: BatchRun, step: Step) -> None:
        if self._tg is None or self._ctx is None:
            raise CoordinatorError("a pipeline was started before the daemon was serving")
        run.running = True
        self._tg.start_soon(Pipeline(self._ctx, run).run, step)

    def _finished(self, run: BatchRun, count: bool) -> None:
        if count:
            self.metrics.batch_finished(run)
        self.scanner.forget(run.batch_id)

    def _purge_leftovers(self, conn: AgentConn) -> None:
        leftovers = [b for b in conn.hello.staged_batches if b not in self.runs]
        if not leftovers or self._tg is None:
            return
        log.warning(
            "purging node-local copies of batches not in flight", node=conn.node, batches=leftovers
        )

        async def purge() -> None:
            for b in leftovers:
                try:
                    await self.hub.request(conn.node, Purge(batch_id=b), within_s=30.0)
                except CoordinatorError as e:
                    log.warning("leftover purge failed", node=conn.node, batch_id=b, error=str(e))

        self._tg.start_soon(purge)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> Status:
        """Everything `coordinatorctl status` shows, as one snapshot."""
        cfg = self.config
        st = self.scanner.stats
        health = self.ledger.health if self.ledger else None
        state = self.state
        if state == "running" and health is not None and not health.connected:
            state = "degraded"
        return Status(
            daemon=DaemonInfo(
                state=state,
                ready=self.ready,
                pid=os.getpid(),
                uptime_s=round(time.time() - self.started_at, 3),
                version=__version__,
                with_agents=self.with_agents,
                started_at=self.started_at,
                host=cfg.host.id,
            ),
            config=ConfigInfo(
                generation=self.reloader.generation,
                files=tuple(cfg.sources),
                last_reload=ReloadInfo.from_json(self.reloader.last_reload),
                models=tuple(cfg.batch.models),
                quorum=cfg.batch.quorum,
                deadline_s=cfg.batch.deadline_s,
                placement_min_fraction=cfg.placement_min_fraction,
                staging=str(cfg.paths.staging),
            ),
            watcher=WatcherInfo(
                armed=st.armed,
                events=st.events,
                last_event=st.last_event or None,
                reconcile_scans=st.reconcile_scans,
                reconciled=st.reconciled,
                last_reconcile=st.last_reconcile or None,
                watcher_restarts=st.watcher_restarts,
                rejected=dict(st.rejected),
                quarantined=dict(st.quarantined),
                quarantine_failed=st.quarantine_failed,
                quarantine_refused=st.quarantine_refused or None,
                scan_errors=st.scan_errors,
                recovered_by_reconcile=st.recovered_by_reconcile,
            ),
            agents=tuple(
                AgentInfo.from_hub(a, self.last_placement.get(a["node"]))
                for a in self.hub.describe(cfg.node_ids)
            ),
            database=DatabaseInfo(
                embedded=cfg.database.embedded,
                dsn=redact_dsn(self.dsn),
                schema=cfg.database.schema,
                connected=bool(health and health.connected),
                leader=bool(health and health.leader),
                last_error=health.last_error if health else "",
                queued_writes=self.ledger.queued if self.ledger is not None else 0,
                epoch=health.epoch if health else None,
            ),
            batches=tuple(b.describe() for b in self.runs),
            finished=tuple(self.runs.finished),
            agents_refused=dict(self.hub.refused),
        )

    def status_json(self) -> dict[str, Any]:
        """`status` as the control socket sends it."""
        return self.status().to_json()
