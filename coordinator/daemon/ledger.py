"""PostgreSQL: the schema and its migrations, the batch ledger, the commit, and the leader lock.

Every write is idempotent so a retry after a lost connection (or a lost COMMIT acknowledgement)
never writes a row twice: the commit reads the ledger row FOR UPDATE and does nothing if the
batch is already committed (or finished, or failed); otherwise no row of the batch can exist, so
its rows are COPYed straight into `aggregates`, where the primary key turns any duplicate into a
failed transaction rather than a second row.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import structlog

from coordinator.core import hooks
from coordinator.core.batch import COMMITTED_OR_LATER, State, may_move, moves_into
from coordinator.core.errors import (
    AgentError,
    BatchOfAnotherHost,
    DatabaseError,
    FencedError,
    NotLeaderError,
)
from coordinator.core.iceberg import CATALOG_NAME
from coordinator.core.rowsfile import RowsFile, RowsReader
from coordinator.core.summary import COPY_COLUMNS, AggregateSummary
from coordinator.core.timings import Timings
from coordinator.core.usage import FIELDS as USAGE_FIELDS

log = structlog.get_logger("coordinator.daemon.ledger")


class _LakeMoved(Exception):
    """A lake table's catalog row moved since the agent read it (rolls the transaction back)."""


T = TypeVar("T")

# Each entry moves the schema from version i to i+1. Never edit a shipped entry: append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {s}.batches (
        batch_id        text PRIMARY KEY,
        state           text NOT NULL,
        models_present  text[] NOT NULL DEFAULT '{{}}',
        models_missing  text[] NOT NULL DEFAULT '{{}}',
        degraded        boolean NOT NULL DEFAULT false,
        rows            integer,
        fleiss_kappa    double precision,
        consensus_agreement jsonb NOT NULL DEFAULT '{{}}',
        timings         jsonb NOT NULL DEFAULT '{{}}',
        staged_bytes    jsonb NOT NULL DEFAULT '{{}}',
        placement       jsonb NOT NULL DEFAULT '{{}}',
        lake_path       text,
        error           text,
        first_seen      timestamptz,
        ready_at        timestamptz,
        deadline_at     timestamptz,
        created_at      timestamptz NOT NULL DEFAULT now(),
        updated_at      timestamptz NOT NULL DEFAULT now(),
        finished_at     timestamptz
    );
    CREATE INDEX batches_state_idx ON {s}.batches (state);
    CREATE TABLE {s}.aggregates (
        batch_id    text NOT NULL REFERENCES {s}.batches (batch_id),
        item_id     text NOT NULL,
        consensus   text,
        votes       integer NOT NULL,
        n_models    integer NOT NULL,
        confidence  double precision NOT NULL,
        PRIMARY KEY (batch_id, item_id)
    );
    CREATE TABLE {s}.model_agreement (
        batch_id    text NOT NULL REFERENCES {s}.batches (batch_id),
        model_a     text NOT NULL,
        model_b     text NOT NULL,
        agreement   double precision,
        n_common    integer NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, model_a, model_b)
    );
    """,
    # 2: no foreign key from the rows to the ledger. PostgreSQL checks one per inserted row
    # (a trigger and an index probe each), which made the commit's COPY three times slower;
    # the commit writes a batch's rows only in the transaction that holds its ledger row
    # FOR UPDATE, so the rows never point at a batch that is not there.
    """
    ALTER TABLE {s}.aggregates DROP CONSTRAINT IF EXISTS aggregates_batch_id_fkey;
    ALTER TABLE {s}.model_agreement DROP CONSTRAINT IF EXISTS model_agreement_batch_id_fkey;
    """,
    # 3: the identity (inode, size, mtime_ns) of each model's file as the barrier counted it,
    # so a daemon restarted before the batch is staged still refuses content published after.
    """
    ALTER TABLE {s}.batches ADD COLUMN IF NOT EXISTS counted jsonb NOT NULL DEFAULT '{{}}';
    """,
    # 4: several hosts on one schema. Each batch row is its host's (the rows already there are
    # the migrating coordinator's host's: `_migrate` sets numa_coordinator.host_id), and each
    # host's leader holds an epoch and a lease in `leaders` (docs/reliability.md, "Fencing").
    """
    ALTER TABLE {s}.batches ADD COLUMN IF NOT EXISTS host_id text;
    UPDATE {s}.batches SET host_id = current_setting('numa_coordinator.host_id')
        WHERE host_id IS NULL;
    ALTER TABLE {s}.batches ALTER COLUMN host_id SET NOT NULL;
    CREATE INDEX IF NOT EXISTS batches_host_state_idx ON {s}.batches (host_id, state);
    CREATE TABLE IF NOT EXISTS {s}.leaders (
        host_id     text PRIMARY KEY,
        epoch       bigint NOT NULL,
        holder      text NOT NULL,
        holder_pid  integer NOT NULL,
        holder_app  text NOT NULL,
        lease_until timestamptz NOT NULL,
        taken_at    timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 5: each batch's accounting per node (the bytes its agent copied and read by where their
    # pages were, its decoding CPU, its peak RSS: core.usage, docs/numa.md §2) and the batch's
    # compression as its files' footers tell.
    """
    CREATE TABLE IF NOT EXISTS {s}.node_usage (
        batch_id        text NOT NULL REFERENCES {s}.batches (batch_id) ON DELETE CASCADE,
        node            integer NOT NULL,
        stage_copied_bytes              bigint,
        stage_remote_bytes              bigint,
        stage_absent_bytes              bigint,
        crosscheck_read_bytes           bigint,
        crosscheck_remote_bytes         bigint,
        aggregate_copied_bytes          bigint,
        aggregate_copied_remote_bytes   bigint,
        aggregate_copied_absent_bytes   bigint,
        aggregate_read_bytes            bigint,
        aggregate_remote_bytes          bigint,
        decode_cpu_s    double precision,
        peak_rss_bytes  bigint,
        updated_at      timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (batch_id, node)
    );
    ALTER TABLE {s}.batches
        ADD COLUMN IF NOT EXISTS compressed_bytes bigint,
        ADD COLUMN IF NOT EXISTS decoded_bytes bigint,
        ADD COLUMN IF NOT EXISTS encode_cpu_s double precision;
    """,
    # 6: in how many ranges of item ids a node's agent worked on the batch (agents.ranges:
    # more than 1 when the batch did not fit its memory budget).
    """
    ALTER TABLE {s}.node_usage ADD COLUMN IF NOT EXISTS work_ranges integer;
    """,
)


# Ledger columns a state change may set, with how each is encoded.
def _flat_timings(value: Timings | Mapping[str, object]) -> dict[str, float]:
    """The ledger's flat `timings` object (core/timings.py) of a Timings, or of a mapping of
    its keys (read as Timings.from_json reads one: ValueError naming a key that is no number)."""
    return (value if isinstance(value, Timings) else Timings.from_json(value)).to_json()


_JSON_COLS = frozenset({"timings", "staged_bytes", "placement", "consensus_agreement", "counted"})
_PLAIN_COLS = frozenset(
    {
        "models_present",
        "models_missing",
        "degraded",
        "rows",
        "fleiss_kappa",
        "lake_path",
        "error",
        "first_seen",
        "ready_at",
        "deadline_at",
        "finished_at",
        "compressed_bytes",
        "decoded_bytes",
        "encode_cpu_s",
    }
)
# The per-node accounting a state change may carry ({node: NodeUsage.as_row()}), written into
# `node_usage` in the same transaction, and only when the state change applied.
_USAGE = "node_usage"

# Errors after which the same call may succeed once the server is back.
TRANSIENT = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionFailureError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a connection cut mid-protocol by a server restart
    ConnectionError,
    TimeoutError,
)


LOCK_APP_PREFIX = "numa-coordinator-leader:"  # the application_name of a leader lock's session


def schema_key(schema: str) -> int:
    """The schema's own advisory-lock key (+1 serialises migrations): a stable signed number."""
    return zlib.crc32(f"numa-coordinator:{schema}".encode()) - 2**31


def lock_key(schema: str, host_id: str) -> int:
    """The leader lock's key for one host on one schema: a stable signed 64-bit number."""
    digest = hashlib.blake2b(f"numa-coordinator:{schema}:{host_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def lock_ids(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows the advisory lock of a bigint `key`."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


# -- the lease and epoch rules (pure) ---------------------------------------------------------


def next_epoch(ours: int | None, current: int | None) -> int | None:
    """The epoch to lead with once the lock is taken. A first take bumps the host's epoch
    (`current`, None when the host never had a leader). A re-take by a leader that lost its
    lock connection keeps its epoch when nobody moved it meanwhile: no other leader wrote in
    between. None: another leader did (the epoch moved on); this one is fenced."""
    if ours is None:
        return (current or 0) + 1
    return ours if current == ours else None


def may_take_over(
    *,
    expired_s: float,
    lease_s: float,
    lock_pid: int | None,
    holder_pid: int | None,
    lock_app: str = "",
) -> bool:
    """Whether a standby may terminate the session holding its host's leader lock.
    `expired_s`: how long ago the recorded lease ran out (negative while it runs); `lock_pid`:
    the backend holding the lock now (None: free, just take it); `holder_pid`: the one the
    leaders row records; `lock_app`: the application_name of the lock's session. The recorded
    holder silent past its lease is taken over. A coordinator's session that holds the lock
    without having recorded itself (stuck between the lock and the bump) is given one more
    lease to do so; a session of anything else is never ended."""
    if lock_pid is None or holder_pid is None or expired_s <= 0:
        return False
    if lock_pid == holder_pid:
        return True
    return lock_app.startswith(LOCK_APP_PREFIX) and expired_s > lease_s


def renew_every(lease_s: float) -> float:
    """How often the leader renews its lease (and checks its lock connection)."""
    return min(1.0, lease_s / 3)


@dataclass
class DbHealth:
    """What status shows about the database."""

    connected: bool = False
    leader: bool = False
    last_error: str = ""
    since: float = field(default_factory=time.time)
    epoch: int | None = None  # the host's epoch this process leads with, once it led


class Ledger:
    """The daemon's one door to PostgreSQL."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        host_id: str | None = None,
        lease_s: float = 10.0,
        retry_max_s: float = 30.0,
        password: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.schema = schema
        self.host_id = host_id or socket.gethostname()
        self.lease_s = lease_s
        self.retry_max_s = retry_max_s
        self.health = DbHealth()
        # Every connection of this process is named so that a standby taking over can end
        # them all (a transaction of ours paused mid-commit holds the leaders row FOR KEY SHARE).
        self.app_name = f"numa-coordinator:{uuid.uuid4().hex[:16]}"
        self.fenced = ""  # why this process may no longer write, once fenced
        # Called once when fenced (the daemon stops); without it a fenced write raises.
        self.on_fenced: Callable[[str], None] | None = None
        self._pool: asyncpg.Pool | None = None
        # Write-behind queue of intermediate state changes: batch -> [(state, fields)].
        self._soon: dict[str, list[tuple[State, dict[str, Any]]]] = {}
        self._soon_wake = anyio.Event()
        self._leader_conn: asyncpg.Connection | None = None
        self._s = f'"{schema}"'
        self.held_elsewhere = False  # the last try found the lock held by another process

    # -- connection and leadership ------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool and migrate the schema; raise DatabaseError if unreachable."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=4,
                command_timeout=120,
                password=self.password,
                server_settings={"application_name": self.app_name},
            )
            async with self._pool.acquire() as conn:
                await self._migrate(conn)
        except TRANSIENT as e:
            self._mark_down(e)
            if self._pool is not None:
                self._pool.terminate()  # a pool whose migration failed is not kept
                self._pool = None
            raise DatabaseError(f"database unreachable: {e}") from e
        self.health.connected = True

    @property
    def is_open(self) -> bool:
        """True once connect() has opened the pool."""
        return self._pool is not None

    @property
    def epoch(self) -> int | None:
        """The host's epoch this process leads with (None before it first led)."""
        return self.health.epoch

    @property
    def lock_app_name(self) -> str:
        """The application_name of the leader lock's connection."""
        return f"{LOCK_APP_PREFIX}{self.schema}:{self.host_id}"[:63]

    async def acquire_leadership(self) -> bool:
        """Try to take this host's leader lock on a dedicated connection (not pooled: a pool's
        reset would release it), taking over from a leader silent past its lease, then record
        the epoch in `leaders`. Return True when this process is the host's leader."""
        if self._leader_conn is not None and not self._leader_conn.is_closed():
            return self.health.leader
        if self.fenced:
            return False
        key = lock_key(self.schema, self.host_id)
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                self.dsn,
                password=self.password,
                server_settings={"application_name": self.lock_app_name},
            )
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
            if not got and self.epoch is None and await self._take_over(conn, key):
                got = await self._lock_within(conn, key, 5.0)
            epoch: int | None = None
            current: int | None = None
            if got:
                epoch = await self._record_leader(conn)
            elif self.epoch is not None:  # a leader that lost its lock session: who has it?
                current = await conn.fetchval(
                    f"SELECT epoch FROM {self._s}.leaders WHERE host_id = $1", self.host_id
                )
        except (*TRANSIENT, asyncpg.LockNotAvailableError) as e:
            self._mark_down(e)
            self.held_elsewhere = False
            if conn is not None:
                conn.terminate()
            return False
        if not got or epoch is None:
            await conn.close()
            self.held_elsewhere = True
            self.health.leader = False
            if got:  # the lock was free again, but another leader led in between
                self._fence(
                    f"host {self.host_id}: another coordinator led meanwhile (the epoch moved"
                    f" past ours, {self.epoch}); refusing to lead again"
                )
            elif self.epoch is not None and current != self.epoch:
                self._fence(
                    f"host {self.host_id}: another coordinator took leadership (epoch {current},"
                    f" ours {self.epoch})"
                )
            return False
        self._leader_conn = conn
        self.held_elsewhere = False
        self.health.leader = True
        if epoch != self.epoch:
            log.info("leadership taken", host=self.host_id, epoch=epoch, previous=self.epoch)
        self.health.epoch = epoch
        return True

    async def _record_leader(self, conn: asyncpg.Connection) -> int | None:
        """With the lock held: in one transaction, read the host's epoch and write ours (bumped
        on a first take, kept on a re-take nobody interrupted), our lease and our sessions.
        None when another leader led meanwhile."""
        async with conn.transaction():
            # A fenced leader's write may still hold the row FOR KEY SHARE: FOR UPDATE waits for
            # it to end (terminated by a takeover), not forever.
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            current = await conn.fetchval(
                f"SELECT epoch FROM {self._s}.leaders WHERE host_id = $1 FOR UPDATE",
                self.host_id,
            )
            epoch = next_epoch(self.epoch, current)
            if epoch is None:
                return None
            await conn.execute(
                f"INSERT INTO {self._s}.leaders AS l"
                " (host_id, epoch, holder, holder_pid, holder_app, lease_until)"
                " VALUES ($1, $2, $3, pg_backend_pid(), $4, now() + make_interval(secs => $5))"
                " ON CONFLICT (host_id) DO UPDATE SET epoch = EXCLUDED.epoch,"
                " holder = EXCLUDED.holder, holder_pid = EXCLUDED.holder_pid,"
                " holder_app = EXCLUDED.holder_app, lease_until = EXCLUDED.lease_until,"
                " taken_at = CASE WHEN l.epoch = EXCLUDED.epoch THEN l.taken_at ELSE now() END",
                self.host_id,
                epoch,
                f"{socket.gethostname()}:{os.getpid()}",
                self.app_name,
                self.lease_s,
            )
        return epoch

    async def _take_over(self, conn: asyncpg.Connection, key: int) -> bool:
        """A standby finding the lock held: if the holder is silent past its lease (stopped,
        hung, cut off but still holding its session), terminate its sessions. True when it did
        (the lock is released as the server ends them)."""
        classid, objid = lock_ids(key)
        row = await conn.fetchrow(
            f"SELECT l.epoch, l.holder, l.holder_pid, l.holder_app,"
            " extract(epoch FROM now() - l.lease_until)::float8 AS expired_s,"
            " (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            "  AND classid::bigint = $2 AND objid::bigint = $3 AND objsubid = 1"
            "  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            "  LIMIT 1) AS lock_pid,"
            " (SELECT a.application_name FROM pg_stat_activity a JOIN pg_locks k ON k.pid = a.pid"
            "  WHERE k.locktype = 'advisory' AND k.granted AND k.classid::bigint = $2"
            "  AND k.objid::bigint = $3 AND k.objsubid = 1 LIMIT 1) AS lock_app"
            f" FROM {self._s}.leaders l WHERE l.host_id = $1",
            self.host_id,
            classid,
            objid,
        )
        if row is None or not may_take_over(
            expired_s=row["expired_s"],
            lease_s=self.lease_s,
            lock_pid=row["lock_pid"],
            holder_pid=row["holder_pid"],
            lock_app=row["lock_app"] or "",
        ):
            return False
        # Only if the epoch seen is still the host's and its lease still expired: a leader that
        # renewed or took over meanwhile is left alone.
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a"
            " WHERE (a.pid = $2 OR a.application_name = $3) AND a.pid <> pg_backend_pid()"
            f" AND EXISTS (SELECT 1 FROM {self._s}.leaders WHERE host_id = $1 AND epoch = $4"
            " AND lease_until < now())",
            self.host_id,
            row["lock_pid"],
            row["holder_app"],
            row["epoch"],
        )
        if ended:
            log.warning(
                "leader silent past its lease: its sessions terminated, taking over",
                host=self.host_id,
                holder=row["holder"],
                holder_pid=row["lock_pid"],
                epoch=row["epoch"],
                expired_s=round(row["expired_s"], 3),
                sessions=ended,
            )
        return bool(ended)

    @staticmethod
    async def _lock_within(conn: asyncpg.Connection, key: int, seconds: float) -> bool:
        """Poll for the lock while a terminated holder's session ends."""
        with anyio.move_on_after(seconds):
            # The lock is released by the server as the old session ends, in another process.
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return True
        return False

    async def check_leadership(self) -> bool:
        """Renew the lease on the lock's connection; losing the connection means losing
        leadership, and finding the host's epoch moved on means being fenced."""
        conn = self._leader_conn
        if conn is None or conn.is_closed():
            self.health.leader = False
            return False
        try:
            with anyio.fail_after(5):
                renewed = await conn.fetchval(
                    f"UPDATE {self._s}.leaders SET lease_until = now() + make_interval(secs => $3)"
                    " WHERE host_id = $1 AND epoch = $2 RETURNING true",
                    self.host_id,
                    self.epoch,
                    self.lease_s,
                )
        except Exception as e:
            # Any failure on the lock's connection (a terminated session can also surface as
            # asyncpg's InternalClientError) means the lock can no longer be vouched for.
            self.health.leader = False
            self._mark_down(e)
            conn.terminate()
            self._leader_conn = None
            return False
        if not renewed:
            conn.terminate()
            self._leader_conn = None
            current = await self._current_epoch()
            self._fence(
                f"host {self.host_id}: another coordinator took leadership (epoch {current},"
                f" ours {self.epoch})"
            )
            return False
        return True

    async def _current_epoch(self) -> int | None:
        """The host's epoch in `leaders` (None when it cannot be read now)."""
        if self._pool is None:
            return None
        try:
            with anyio.fail_after(5):
                async with self._pool.acquire() as c:
                    epoch: int | None = await c.fetchval(
                        f"SELECT epoch FROM {self._s}.leaders WHERE host_id = $1", self.host_id
                    )
                    return epoch
        except (*TRANSIENT, asyncpg.PostgresError):
            return None

    def _fence(self, why: str) -> None:
        """From now on this process writes nothing; the daemon is told once (it stops)."""
        if self.fenced:
            return
        self.fenced = why
        self.health.leader = False
        self.held_elsewhere = True
        log.error("fenced: this coordinator may no longer write; stepping down", reason=why)
        if self.on_fenced is not None:
            self.on_fenced(why)

    async def _check_epoch(self, c: asyncpg.Connection) -> None:
        """Inside a write's transaction: the host's epoch is still ours. The row is read FOR
        KEY SHARE: a takeover's bump (which reads it FOR UPDATE) waits for this transaction to
        end, or this one sees the bump; the lease renewals (an UPDATE of a non-key column) do
        not wait for it. Raise FencedError otherwise, NotLeaderError before this process led."""
        if self.fenced:
            raise FencedError(self.fenced)
        if self.epoch is None:
            raise NotLeaderError(f"host {self.host_id}: never led; refusing to write")
        current = await c.fetchval(
            f"SELECT epoch FROM {self._s}.leaders WHERE host_id = $1 FOR KEY SHARE", self.host_id
        )
        if current != self.epoch:
            raise FencedError(
                f"host {self.host_id}: another coordinator took leadership (epoch {current},"
                f" ours {self.epoch}); write refused"
            )

    async def close(self) -> None:
        """Release the leader lock and close the pool."""
        if self._leader_conn is not None:
            self._leader_conn.terminate()
            self._leader_conn = None
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
        self.health.connected = False
        self.health.leader = False

    def _mark_down(self, e: BaseException) -> None:
        if self.health.connected or not self.health.last_error:
            self.health.since = time.time()
        self.health.connected = False
        self.health.last_error = f"{type(e).__name__}: {e}"

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            # Serialise concurrent migrators (a second coordinator starting at the same time).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", schema_key(self.schema) + 1)
            # Rows of a ledger from before several hosts become this host's (migration 4).
            await conn.execute(
                "SELECT set_config('numa_coordinator.host_id', $1, true)", self.host_id
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._s}.schema_version ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(
                f"SELECT coalesce(max(version), 0) FROM {self._s}.schema_version"
            )
            for version in range(current, len(MIGRATIONS)):
                await conn.execute(MIGRATIONS[version].format(s=self._s))
                await conn.execute(
                    f"INSERT INTO {self._s}.schema_version (version) VALUES ($1)", version + 1
                )
                log.info("schema migrated", schema=self.schema, version=version + 1)

    async def schema_version(self) -> int:
        """The schema version in the database."""
        return int(
            await self._run(
                lambda c: c.fetchval(f"SELECT max(version) FROM {self._s}.schema_version")
            )
        )

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn` on a pooled connection, retrying transient failures with backoff forever
        (nothing accepted is dropped); the health record says why while it waits."""
        delay = 0.2
        while True:
            if self._pool is None:
                raise DatabaseError("ledger is closed")
            if self.fenced:
                await self._refuse(FencedError(self.fenced))
            try:
                async with self._pool.acquire() as conn:
                    result = await fn(conn)
            except FencedError as e:
                self._fence(str(e))
                await self._refuse(e)
            except TRANSIENT as e:
                self._mark_down(e)
                log.warning("database unavailable, retrying", error=str(e), retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if not self.health.connected:
                log.info("database reachable again")
            self.health.connected = True
            self.health.last_error = ""
            return result

    async def _refuse(self, e: FencedError) -> None:
        """A fenced write: in the daemon (on_fenced set) it waits for the stop that cancels
        it, so no step goes on as if it had written; elsewhere it raises."""
        if self.on_fenced is not None:
            await anyio.sleep_forever()
        raise e

    # -- the ledger ---------------------------------------------------------------------------

    async def record_seen(
        self,
        batch_id: str,
        *,
        models_present: Sequence[str],
        models_missing: Sequence[str],
        first_seen: Any,
        deadline_at: Any,
    ) -> State:
        """Create the ledger row of a batch seen for the first time (if absent).

        Return the batch's state in the ledger; BatchOfAnotherHost when the batch id is
        already another host's (nothing is written, their row is untouched)."""

        async def op(c: asyncpg.Connection) -> State:
            async with c.transaction():
                await self._check_epoch(c)
                await c.execute(
                    f"INSERT INTO {self._s}.batches (batch_id, host_id, state, models_present,"
                    " models_missing, first_seen, deadline_at)"
                    " VALUES ($1, $2, 'waiting', $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
                    batch_id,
                    self.host_id,
                    list(models_present),
                    list(models_missing),
                    first_seen,
                    deadline_at,
                )
                row = await c.fetchrow(
                    f"SELECT state, host_id FROM {self._s}.batches WHERE batch_id = $1", batch_id
                )
            assert row is not None  # inserted above, or there already
            self._own(batch_id, row["host_id"])
            return State(row["state"])

        return await self._run(op)

    async def set_state(self, batch_id: str, state: State, **fields: Any) -> None:
        """Move a batch to `state`, setting the given ledger columns; JSON columns merge.
        `node_usage` ({node: {column: value}}) goes into that table: each column keeps the
        larger of what it held and what is given (the pipeline gives running totals, so a
        write retried, or a batch resumed by a restarted daemon, never counts twice)."""
        sets = ["state = $2", "updated_at = now()"]
        args: list[Any] = [batch_id, state.value]
        usage = _usage_rows(batch_id, fields.pop(_USAGE, None) or {})  # checked before a write
        for key, value in fields.items():
            if key == "timings":
                value = _flat_timings(value)
            args.append(json.dumps(value) if key in _JSON_COLS else value)
            if key in _JSON_COLS:
                sets.append(f"{key} = {key} || ${len(args)}::jsonb")
            elif key in _PLAIN_COLS:
                sets.append(f"{key} = ${len(args)}")
            else:
                raise ValueError(f"unknown ledger column {key!r}")
        # The one transition rule (batch.may_move): a move it does not allow changes nothing.
        args.append(sorted(s.value for s in moves_into(state)))
        guard = f"state = ANY(${len(args)}::text[])"
        args.append(self.host_id)  # another host's row is never touched
        sql = (
            f"UPDATE {self._s}.batches SET {', '.join(sets)} WHERE batch_id = $1 AND {guard}"
            f" AND host_id = ${len(args)}"
        )

        async def op(c: asyncpg.Connection) -> None:
            async with c.transaction():
                await self._check_epoch(c)
                status = await c.execute(sql, *args)
                if usage and status.split()[-1] != "0":
                    await c.executemany(_USAGE_SQL.format(s=self._s), usage)

        await self._run(op)

    def set_state_soon(self, batch_id: str, state: State, **fields: Any) -> None:
        """Queue an intermediate state change; `flush_loop` writes it when the database is
        reachable. Steps before the commit are redone on resume, so they need not wait."""
        self._soon.setdefault(batch_id, []).append((state, fields))
        self._soon_wake.set()

    def insert_seen_soon(self, batch_id: str, **fields: Any) -> None:
        """Queue the creation of a ledger row (for a batch adopted while the database is down)."""
        self._soon.setdefault(batch_id, []).insert(0, (State.WAITING, {"_insert": fields}))
        self._soon_wake.set()

    async def flush(self, batch_id: str) -> None:
        """Write a batch's queued state changes now, in order."""
        while self._soon.get(batch_id):
            state, fields = self._soon[batch_id][0]
            if "_insert" in fields:
                try:
                    await self.record_seen(batch_id, **fields["_insert"])
                except BatchOfAnotherHost as e:
                    # Adopted while the database was down, and another host's: nothing of
                    # it is written (its commit refuses it too, failing it here alone).
                    log.error("batch id taken by another host", batch_id=batch_id, error=str(e))
                    self._soon.pop(batch_id, None)
                    return
            else:
                await self.set_state(batch_id, state, **fields)
            queue = self._soon.get(batch_id)
            if queue:
                queue.pop(0)
            if not queue:
                self._soon.pop(batch_id, None)

    async def flush_loop(self) -> None:
        """Background writer of the queued state changes."""
        while True:
            await self._soon_wake.wait()
            self._soon_wake = anyio.Event()
            for batch_id in list(self._soon):
                await self.flush(batch_id)

    @property
    def queued(self) -> int:
        """State changes waiting for the database."""
        return sum(len(v) for v in self._soon.values())

    async def commit(
        self,
        batch_id: str,
        agg: AggregateSummary,
        rows: Path | RowsFile,
        *,
        fields: Mapping[str, Any],
    ) -> State | None:
        """Write a batch's aggregates and agreement and move its ledger row to `committed`,
        all in one transaction. `rows` is the batch's COPY CSV file (streamed as it is read) and
        must hold exactly `agg.rows` rows: an agent's file (`RowsFile`), opened by descriptor
        and checked against what the agent reported as it is read, or a path the caller
        trusts (a benchmark's, a test's own). Return None when written;
        otherwise write nothing and return the state found (the batch was already committed,
        or finished before). AgentError when the file is gone, RowsRefused when it is not the
        agent's (nothing written either way)."""
        if not self.health.leader:
            raise NotLeaderError("not the leader: refusing to write batch " + batch_id)
        await self.flush(batch_id)
        pairs = [(batch_id, p.model_a, p.model_b, p.agreement, p.n_common) for p in agg.agreement]
        rows_file = rows if isinstance(rows, RowsFile) else None

        async def op(c: asyncpg.Connection) -> State | None:
            reader: RowsReader | None = None
            async with c.transaction():
                # The fence first: a coordinator that lost its host's leadership commits nothing.
                await self._check_epoch(c)
                hooks.pause("commit")  # tests stop the process here, inside the transaction
                row = await c.fetchrow(
                    f"SELECT state, host_id FROM {self._s}.batches WHERE batch_id = $1 FOR UPDATE",
                    batch_id,
                )
                if row is None:
                    raise DatabaseError(f"batch {batch_id}: no ledger row to commit")
                self._own(batch_id, row["host_id"])
                found = State(row["state"])
                if found in COMMITTED_OR_LATER or not may_move(found, State.COMMITTED):
                    return found  # committed before, finished, failed, or never counted
                # The row lock and the state check above mean no row of this batch is in
                # `aggregates`: COPY straight into it (a temp table and INSERT ... ON CONFLICT
                # would read every row twice and make a speculative insert of each).
                # The file is read in chunks by asyncpg (in a worker thread) and sent as read:
                # the rows pass through this process without being decoded or held whole.
                # An agent's file is opened here, by descriptor (never through a link), and
                # hashed as it is sent: bytes other than the agent's abort the COPY (RowsRefused,
                # raised at the end of the file), and the transaction with it.
                try:
                    if rows_file is not None:
                        reader = await anyio.to_thread.run_sync(rows_file.open)
                    # asyncpg takes a path, or anything with read(n) (called in a thread)
                    source: Any = rows if reader is None else reader
                    status = await c.copy_to_table(
                        "aggregates",
                        schema_name=self.schema,
                        source=source,
                        columns=list(COPY_COLUMNS),
                        format="csv",
                        header=True,
                    )
                except FileNotFoundError as e:
                    # Not the database's fault (an OSError would be retried as one): the
                    # agent's file is gone; it is opened before the COPY is sent.
                    raise AgentError(f"batch {batch_id}: rows file gone: {e}") from e
                finally:
                    if reader is not None:
                        reader.close()
                inserted = int(status.split()[-1])
                if inserted != agg.rows:
                    # Raising inside the transaction rolls the COPY back.
                    raise DatabaseError(
                        f"batch {batch_id}: {rows if rows_file is None else rows_file.where} "
                        f"held {inserted} rows, the aggregate counted {agg.rows}"
                    )
                await c.executemany(
                    f"INSERT INTO {self._s}.model_agreement"
                    " (batch_id, model_a, model_b, agreement, n_common)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    pairs,
                )
                await c.execute(
                    f"UPDATE {self._s}.batches SET state = 'committed', rows = $2,"
                    " fleiss_kappa = $3, consensus_agreement = $4::jsonb,"
                    " timings = timings || $5::jsonb, updated_at = now() WHERE batch_id = $1",
                    batch_id,
                    inserted,
                    agg.fleiss_kappa,
                    json.dumps(agg.consensus_agreement),
                    json.dumps(_flat_timings(fields.get("timings", {}))),
                )
            return None

        return await self._run(op)

    async def lake_locations(self, catalog_schema: str, namespace: str) -> dict[str, str]:
        """The Iceberg lake's tables and their current metadata locations, from the catalog's
        rows (pyiceberg's SQL catalog, `catalog_schema`)."""

        async def op(c: asyncpg.Connection) -> dict[str, str]:
            rows = await c.fetch(
                f'SELECT table_name, metadata_location FROM "{catalog_schema}".iceberg_tables'
                " WHERE catalog_name = $1 AND table_namespace = $2",
                CATALOG_NAME,
                namespace,
            )
            return {r["table_name"]: r["metadata_location"] for r in rows}

        return await self._run(op)

    async def commit_archive(
        self,
        batch_id: str,
        *,
        catalog_schema: str,
        namespace: str,
        commits: Mapping[str, tuple[str, str]],
        lake_path: str,
        timings: Timings | Mapping[str, object],
    ) -> bool:
        """The Iceberg lake's commit and the ledger's, in one transaction: each table's
        catalog row moves from the metadata location the agent started from to the one it
        wrote (a compare-and-set, as pyiceberg's SQL catalog commits), and the batch moves to
        `archived`. Return False, and write nothing, when a table moved meanwhile (another
        writer committed first: the caller prepares again) or the batch is not `committed`
        any more (archived before: nothing to do)."""
        if not self.health.leader:
            raise NotLeaderError("not the leader: refusing to archive batch " + batch_id)
        await self.flush(batch_id)

        async def op(c: asyncpg.Connection) -> bool:
            async with c.transaction():
                await self._check_epoch(c)
                row = await c.fetchrow(
                    f"SELECT state, host_id FROM {self._s}.batches WHERE batch_id = $1 FOR UPDATE",
                    batch_id,
                )
                if row is None:
                    raise DatabaseError(f"batch {batch_id}: no ledger row to archive")
                self._own(batch_id, row["host_id"])
                if State(row["state"]) is not State.COMMITTED:
                    # Archived before (this attempt is stale: its tables must not move), or
                    # not committed at all: nothing is written.
                    return False
                for table, (base, new) in commits.items():
                    if not new:
                        continue  # the table already held the batch
                    status = await c.execute(
                        f'UPDATE "{catalog_schema}".iceberg_tables'
                        " SET metadata_location = $5, previous_metadata_location = $4"
                        " WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3"
                        " AND metadata_location = $4",
                        CATALOG_NAME,
                        namespace,
                        table,
                        base,
                        new,
                    )
                    if status != "UPDATE 1":
                        raise _LakeMoved(table)
                hooks.pause("lake_commit")  # tests kill the process here, inside the transaction
                await c.execute(
                    f"UPDATE {self._s}.batches SET state = 'archived', lake_path = $2,"
                    " timings = timings || $3::jsonb, updated_at = now() WHERE batch_id = $1",
                    batch_id,
                    lake_path,
                    json.dumps(_flat_timings(timings)),
                )
            return True

        try:
            return await self._run(op)
        except _LakeMoved as e:
            log.warning("lake table moved meanwhile; preparing again", table=str(e))
            return False

    def _own(self, batch_id: str, host_id: str) -> None:
        """BatchOfAnotherHost unless the ledger row of `batch_id` is this host's."""
        if host_id != self.host_id:
            raise BatchOfAnotherHost(
                f"batch {batch_id} is host {host_id}'s in the shared ledger; host"
                f" {self.host_id} refuses it (batch ids must be unique across hosts)"
            )

    async def open_batches(self) -> list[dict[str, Any]]:
        """Every batch of this host not in a final state, oldest first: what a restarted
        daemon resumes."""
        final = [State.DONE.value, State.DEGRADED.value, State.FAILED.value]
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT * FROM {self._s}.batches WHERE host_id = $2"
                " AND NOT (state = ANY($1::text[])) ORDER BY created_at",
                final,
                self.host_id,
            )
        )
        return [_row(r) for r in rows]

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        """One ledger row of this host with its agreement pairs, or None."""

        async def op(c: asyncpg.Connection) -> dict[str, Any] | None:
            r = await c.fetchrow(
                f"SELECT * FROM {self._s}.batches WHERE batch_id = $1 AND host_id = $2",
                batch_id,
                self.host_id,
            )
            if r is None:
                return None
            out = _row(r)
            pairs = await c.fetch(
                f"SELECT model_a, model_b, agreement, n_common FROM {self._s}.model_agreement"
                " WHERE batch_id = $1 ORDER BY model_a, model_b",
                batch_id,
            )
            out["agreement"] = [dict(p) for p in pairs]
            usage = await c.fetch(
                f"SELECT * FROM {self._s}.node_usage WHERE batch_id = $1 ORDER BY node", batch_id
            )
            out[_USAGE] = {str(u["node"]): {f: u[f] for f in USAGE_FIELDS} for u in usage}
            return out

        return await self._run(op)

    async def list(
        self, *, limit: int = 20, state: str | None = None, host: str | None = None
    ) -> list[dict[str, Any]]:
        """The most recent ledger rows of `host` (default: this host), newest first, optionally
        of one state."""
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT * FROM {self._s}.batches WHERE host_id = $3"
                " AND ($2::text IS NULL OR state = $2) ORDER BY created_at DESC LIMIT $1",
                limit,
                state,
                host or self.host_id,
            )
        )
        return [_row(r) for r in rows]

    async def final_states(self) -> dict[str, int]:
        """How many of this host's batches are in each state."""
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT state, count(*) AS n FROM {self._s}.batches WHERE host_id = $1"
                " GROUP BY state",
                self.host_id,
            )
        )
        return {r["state"]: int(r["n"]) for r in rows}


_USAGE_SQL = (
    "INSERT INTO {s}.node_usage (batch_id, node, "
    + ", ".join(USAGE_FIELDS)
    + ") VALUES ($1, $2, "
    + ", ".join(f"${i + 3}" for i in range(len(USAGE_FIELDS)))
    + ") ON CONFLICT (batch_id, node) DO UPDATE SET updated_at = now(), "
    + ", ".join(f"{f} = GREATEST(node_usage.{f}, EXCLUDED.{f})" for f in USAGE_FIELDS)
)


def _usage_rows(batch_id: str, usage: Mapping[Any, Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """The `node_usage` rows of a state change: ValueError naming a node or column it does
    not know."""
    rows = []
    for node, cols in usage.items():
        unknown = set(cols) - set(USAGE_FIELDS)
        if unknown:
            raise ValueError(f"node_usage of node {node}: unknown column(s) {sorted(unknown)}")
        rows.append((batch_id, int(node), *(cols.get(f) for f in USAGE_FIELDS)))
    return rows


def _row(r: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in r.items():
        if key in _JSON_COLS and isinstance(value, str):
            out[key] = json.loads(value)
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out
