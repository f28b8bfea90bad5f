"""The SDK's publish announcements: a PostgreSQL NOTIFY after each publish, for a coordinator
whose kernel does not hear the producer's writes (`barrier.backend = "notify"`; the channel and
payload are `coordinator.core.announce`'s, docs/protocol.md "Announcing a publish").

Producers are plain, synchronous Python, so `PgNotifier` keeps one asyncpg connection on an
event loop of its own, in a daemon thread, and each announcement is one `SELECT pg_notify(...)`
on it (about a millisecond on a local server). It works the same whether or not the caller
runs an event loop of its own.

An announcement never fails a publish: the file is published before it is sent, and a
coordinator's scan finds the file anyway. A failure is logged (logger `agents.notifier`) and,
after it, the notifier sends nothing for `retry_after_s` (so a database that is away costs
each publish nothing), then connects again.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from coordinator.core import announce

log = logging.getLogger("agents.notifier")

DSN_ENV = "NUMA_COORDINATOR_NOTIFY_DSN"
SCHEMA_ENV = "NUMA_COORDINATOR_NOTIFY_SCHEMA"
DEFAULT_SCHEMA = "numa_coordinator"  # database.schema's default
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # database.schema's rule

# What `publish(..., notify=)` takes besides a DSN: a callable given (batch_id, model, size).
Announcer = Callable[[str, str, int], object]


class PgNotifier:
    """Announces publishes on `schema`'s channel of the PostgreSQL at `dsn`; call it with
    (batch_id, model, size). Reusable and thread-safe; `close()` (or `with`) ends it. The
    connection is opened at the first announcement, not here."""

    def __init__(
        self,
        dsn: str,
        schema: str = DEFAULT_SCHEMA,
        *,
        password: str | None = None,
        timeout_s: float = 2.0,
        retry_after_s: float = 5.0,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError(f"PgNotifier: dsn must be a non-empty PostgreSQL DSN, got {dsn!r}")
        if not isinstance(schema, str) or not SCHEMA_RE.fullmatch(schema):
            raise ValueError(
                f"PgNotifier: schema {schema!r} is not a lower-case SQL identifier "
                f"({SCHEMA_RE.pattern}), as database.schema must be"
            )
        self.dsn = dsn
        self.schema = schema
        self.channel = announce.channel(schema)
        self.password = password
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.sent = 0  # announcements sent
        self.failed = 0  # announcements not sent (failed, or skipped while the database was away)
        self.last_error = ""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # asyncpg.Connection, used on the notifier's loop only
        self._down_until = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"PgNotifier(schema={self.schema!r}, channel={self.channel!r})"

    def __enter__(self) -> PgNotifier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __call__(self, batch_id: str, model: str, size: int) -> bool:
        """Announce one publish; True when the NOTIFY was sent. Never raises for the
        database's sake (a bad name or size is the caller's error: ValueError)."""
        payload = announce.encode(batch_id, model, size)
        with self._lock:
            if self._closed:
                raise ValueError("PgNotifier: announce after close()")
            if time.monotonic() < self._down_until:
                self.failed += 1
                log.debug("database away: announcement of %s skipped", payload)
                return False
            try:
                self._submit(self._send(payload)).result(self.timeout_s * 3 + 1)
            except Exception as e:  # anything: the publish is done, the scan finds the file
                self.failed += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._down_until = time.monotonic() + self.retry_after_s
                self._drop()
                log.warning(
                    "could not announce %s on %s (the file is published; the coordinator's "
                    "scan finds it); not trying again for %.0f s: %s",
                    payload,
                    self.channel,
                    self.retry_after_s,
                    self.last_error,
                )
                return False
            self.sent += 1
            return True

    def close(self) -> None:
        """Close the connection and stop the notifier's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            try:
                asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(5)
            except Exception as e:  # closing is best effort: the process may be on its way out
                log.debug("closing the notifier's connection: %s: %s", type(e).__name__, e)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()

    # -- the notifier's own loop -----------------------------------------------------------------

    def _submit(self, coro: Any) -> Future[None]:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="numa-coordinator-notifier", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _connect(self) -> Any:
        import asyncpg  # here: the SDK loads without it until a publish is announced

        return await asyncpg.connect(
            self.dsn,
            password=self.password,
            timeout=self.timeout_s,
            server_settings={"application_name": f"numa-coordinator-publish:{self.schema}"},
        )

    async def _send(self, payload: str) -> None:
        import asyncpg

        fresh = self._conn is None or self._conn.is_closed()
        if fresh:
            self._conn = await self._connect()
        try:
            await self._conn.execute(
                "SELECT pg_notify($1, $2)", self.channel, payload, timeout=self.timeout_s
            )
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            if fresh:
                raise
            # A connection that went stale while idle (the server restarted): once more, anew.
            self._conn.terminate()
            self._conn = await self._connect()
            await self._conn.execute(
                "SELECT pg_notify($1, $2)", self.channel, payload, timeout=self.timeout_s
            )

    async def _aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
        await asyncio.sleep(0)  # the transport's own close runs on the next turn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(conn.terminate)


_shared: dict[tuple[str, str], PgNotifier] = {}
_shared_lock = threading.Lock()


def shared(dsn: str, schema: str) -> PgNotifier:
    """The process's one notifier for (dsn, schema), made at first use and closed at exit."""
    with _shared_lock:
        n = _shared.get((dsn, schema))
        if n is None:
            if not _shared:
                atexit.register(close_shared)
            n = _shared[(dsn, schema)] = PgNotifier(dsn, schema)
        return n


def close_shared() -> None:
    """Close the process's shared notifiers (done at exit; a later publish makes new ones)."""
    with _shared_lock:
        notifiers = list(_shared.values())
        _shared.clear()
    for n in notifiers:
        n.close()


def resolve(notify: object) -> Announcer | None:
    """What `publish(..., notify=notify)` announces with, or None for no announcement:
    None: the environment's ($NUMA_COORDINATOR_NOTIFY_DSN, with the schema in
    $NUMA_COORDINATOR_NOTIFY_SCHEMA, default numa_coordinator), none where it is unset;
    False: none; a DSN string: the process's notifier for it (the schema from the environment
    as above); a callable (a PgNotifier, or a function of (batch_id, model, size)): itself.
    TypeError or ValueError, naming the argument or variable, for anything else."""
    if notify is False:
        return None
    if notify is None:
        dsn = os.environ.get(DSN_ENV, "")
        return shared(dsn, _env_schema()) if dsn else None
    if isinstance(notify, str):
        if not notify:
            raise ValueError("publish: notify='' is not a DSN (pass False for no announcement)")
        return shared(notify, _env_schema())
    if callable(notify) and not isinstance(notify, bool | type):
        return notify
    raise TypeError(
        "publish: notify must be None (the environment's), False, a PostgreSQL DSN, a "
        f"PgNotifier or a callable of (batch_id, model, size), not {type(notify).__name__}"
    )


def _env_schema() -> str:
    schema = os.environ.get(SCHEMA_ENV, "") or DEFAULT_SCHEMA
    if not SCHEMA_RE.fullmatch(schema):
        raise ValueError(
            f"${SCHEMA_ENV}={schema!r} is not a lower-case SQL identifier ({SCHEMA_RE.pattern})"
        )
    return schema
