"""The notify backend's ear (`barrier.backend = "notify"`): a PostgreSQL connection of its own
that LISTENs on the schema's announcement channel (`coordinator.core.announce`) and reports the
batch each announcement names, as the inotify watcher reports a changed batch folder.

For a staging folder that other kernels write into (NFS, a VM guest's shared folder), where
inotify hears nothing. An announcement only marks its batch: the barrier looks at the folder
and decides, so a payload that names a batch that is not there, a model that is not configured
or a wrong size costs one look. A payload that is not `<batch>/<model>/<size>` is logged and
dropped.

Notifications sent while the connection is down are lost (PostgreSQL keeps none for a listener
that is not there): after every reconnection the whole of staging is looked at again, and the
reconciliation scan stays the safety net. A connection that dies quietly is found by a
`SELECT 1` every `KEEPALIVE_S`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.abc import TaskStatus

from coordinator.core import announce
from coordinator.daemon.scanner import Stats
from coordinator.daemon.watch import RESCAN, Rescan

log = structlog.get_logger("coordinator.daemon.listen")

KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


def application_name(schema: str) -> str:
    """The LISTEN connection's application_name in pg_stat_activity."""
    return f"numa-coordinator-listen:{schema}"


async def listen(
    dsn: str,
    password: str | None,
    schema: str,
    on_batches: Callable[[set[str | Rescan]], None],
    stats: Stats,
    *,
    retry_max_s: float = 30.0,
    task_status: TaskStatus[None],
) -> None:
    """LISTEN on `schema`'s channel and report the batch of each announcement.

    Signals started after the first attempt to LISTEN, whether it worked or not (the daemon's
    first scan of staging follows; a LISTEN set up later is followed by a rescan of its own).
    `stats.armed` says whether the LISTEN is in place, `stats.events` counts the notifications
    heard, `stats.watcher_restarts` the reconnections."""
    chan = announce.channel(schema)
    started = False
    delay = 0.2

    def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        stats.events += 1
        stats.last_event = time.time()
        try:
            a = announce.decode(payload)
        except ValueError as e:
            log.warning("ignored an announcement: not <batch>/<model>/<size>", error=str(e))
            return
        on_batches({a.batch_id})

    while True:
        lost = anyio.Event()
        conn: Any = None
        try:
            conn = await asyncpg.connect(
                dsn,
                password=password,
                timeout=CONNECT_TIMEOUT_S,
                server_settings={"application_name": application_name(schema)},
            )
            conn.add_termination_listener(functools.partial(_set, lost))
            await conn.add_listener(chan, heard)
        except Exception as e:  # anything: the scans go on, and the LISTEN is tried again
            if conn is not None:
                conn.terminate()
            stats.armed = False
            log.error(
                "cannot LISTEN for announcements, retrying",
                channel=chan,
                retry_in_s=delay,
                error=f"{type(e).__name__}: {e}",
            )
            if not started:
                task_status.started()
                started = True
            await anyio.sleep(delay)
            delay = min(delay * 2, retry_max_s)
            continue
        stats.armed = True
        if not started:
            log.info("listening for announcements", channel=chan)
            task_status.started()
            started = True
        else:
            # Whatever was announced while no one listened is lost: look at everything.
            stats.watcher_restarts += 1
            log.warning("listening for announcements again; rescanning staging", channel=chan)
            on_batches({RESCAN})
        up = time.monotonic()
        try:
            await _until_lost(conn, lost)
        finally:
            stats.armed = False
            conn.terminate()
        log.error("the LISTEN connection was lost; reconnecting", channel=chan)
        if time.monotonic() - up >= 1.0:
            delay = 0.2  # it held: the backoff starts afresh, and the next try is now
        else:
            # Lost as soon as made: do not go round faster than the backoff.
            await anyio.sleep(delay)
            delay = min(delay * 2, retry_max_s)


def _set(event: anyio.Event, _conn: Any) -> None:
    event.set()


async def _until_lost(conn: Any, lost: anyio.Event) -> None:
    """Return when the connection is closed, or does not answer a keep-alive."""
    while not lost.is_set():
        with anyio.move_on_after(KEEPALIVE_S):  # read at each turn (the tests shorten it)
            await lost.wait()
        if lost.is_set() or conn.is_closed():
            return
        try:
            with anyio.fail_after(KEEPALIVE_TIMEOUT_S):
                await conn.fetchval("SELECT 1")
        except Exception as e:
            log.warning("the LISTEN connection did not answer", error=f"{type(e).__name__}: {e}")
            return
