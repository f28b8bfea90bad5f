"""PostgreSQL: the schema and its migrations, the batch ledger, the commit, and the leader lock.

Every write is idempotent so a retry after a lost connection (or a lost COMMIT acknowledgement)
never writes a row twice: the commit reads the ledger row FOR UPDATE and does nothing if the
batch is already committed (or finished, or failed); otherwise no row of the batch can exist, so
its rows are COPYed straight into `aggregates`, where the primary key turns any duplicate into a
failed transaction rather than a second row.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import structlog

from coordinator.core.batch import COMMITTED_OR_LATER, State, may_move, moves_into
from coordinator.core.errors import AgentError, DatabaseError, NotLeaderError
from coordinator.core.summary import COPY_COLUMNS, AggregateSummary

log = structlog.get_logger("coordinator.daemon.ledger")
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
)

# Ledger columns a state change may set, with how each is encoded.
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
    }
)

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


def lock_key(schema: str) -> int:
    """The advisory-lock key for one schema: a stable signed 64-bit number."""
    return zlib.crc32(f"numa-coordinator:{schema}".encode()) - 2**31


@dataclass
class DbHealth:
    """What status shows about the database."""

    connected: bool = False
    leader: bool = False
    last_error: str = ""
    since: float = field(default_factory=time.time)


class Ledger:
    """The daemon's one door to PostgreSQL."""

    def __init__(
        self, dsn: str, schema: str, *, retry_max_s: float = 30.0, password: str | None = None
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.schema = schema
        self.retry_max_s = retry_max_s
        self.health = DbHealth()
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
                self.dsn, min_size=1, max_size=4, command_timeout=120, password=self.password
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

    async def acquire_leadership(self) -> bool:
        """Try to take the leader lock on a dedicated connection (not pooled: a pool's reset
        would release it). Return True when this process is the leader."""
        if self._leader_conn is not None and not self._leader_conn.is_closed():
            return self.health.leader
        try:
            self._leader_conn = await asyncpg.connect(
                self.dsn,
                password=self.password,
                server_settings={"application_name": f"numa-coordinator-leader:{self.schema}"},
            )
            got = await self._leader_conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", lock_key(self.schema)
            )
        except TRANSIENT as e:
            self._mark_down(e)
            self.held_elsewhere = False
            return False
        self.health.leader = bool(got)
        self.held_elsewhere = not got
        if not got:
            await self._leader_conn.close()
            self._leader_conn = None
        return self.health.leader

    async def check_leadership(self) -> bool:
        """Verify the lock connection is alive; losing it means losing leadership."""
        conn = self._leader_conn
        if conn is None or conn.is_closed():
            self.health.leader = False
            return False
        try:
            with anyio.fail_after(5):
                await conn.fetchval("SELECT 1")
        except Exception as e:
            # Any failure on the lock's connection (a terminated session can also surface as
            # asyncpg's InternalClientError) means the lock can no longer be vouched for.
            self.health.leader = False
            self._mark_down(e)
            conn.terminate()
            self._leader_conn = None
            return False
        return True

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
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(self.schema) + 1)
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
            try:
                async with self._pool.acquire() as conn:
                    result = await fn(conn)
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

        Return the batch's state in the ledger."""

        async def op(c: asyncpg.Connection) -> State:
            await c.execute(
                f"INSERT INTO {self._s}.batches (batch_id, state, models_present, models_missing,"
                " first_seen, deadline_at) VALUES ($1, 'waiting', $2, $3, $4, $5)"
                " ON CONFLICT (batch_id) DO NOTHING",
                batch_id,
                list(models_present),
                list(models_missing),
                first_seen,
                deadline_at,
            )
            state = await c.fetchval(
                f"SELECT state FROM {self._s}.batches WHERE batch_id = $1", batch_id
            )
            return State(state)

        return await self._run(op)

    async def set_state(self, batch_id: str, state: State, **fields: Any) -> None:
        """Move a batch to `state`, setting the given ledger columns; JSON columns merge."""
        sets = ["state = $2", "updated_at = now()"]
        args: list[Any] = [batch_id, state.value]
        for key, value in fields.items():
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
        sql = f"UPDATE {self._s}.batches SET {', '.join(sets)} WHERE batch_id = $1 AND {guard}"

        async def op(c: asyncpg.Connection) -> None:
            await c.execute(sql, *args)

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
                await self.record_seen(batch_id, **fields["_insert"])
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
        rows: Path,
        *,
        fields: Mapping[str, Any],
    ) -> State | None:
        """Write a batch's aggregates and agreement and move its ledger row to `committed`,
        all in one transaction. `rows` is the batch's COPY CSV file (streamed as it is read) and
        must hold exactly `agg.rows` rows. Return None when written;
        otherwise write nothing and return the state found (the batch was already committed,
        or finished before). AgentError when the file is gone (nothing written)."""
        if not self.health.leader:
            raise NotLeaderError("not the leader: refusing to write batch " + batch_id)
        await self.flush(batch_id)
        pairs = [(batch_id, p.model_a, p.model_b, p.agreement, p.n_common) for p in agg.agreement]

        async def op(c: asyncpg.Connection) -> State | None:
            async with c.transaction():
                state = await c.fetchval(
                    f"SELECT state FROM {self._s}.batches WHERE batch_id = $1 FOR UPDATE",
                    batch_id,
                )
                if state is None:
                    raise DatabaseError(f"batch {batch_id}: no ledger row to commit")
                found = State(state)
                if found in COMMITTED_OR_LATER or not may_move(found, State.COMMITTED):
                    return found  # committed before, finished, failed, or never counted
                # The row lock and the state check above mean no row of this batch is in
                # `aggregates`: COPY straight into it (a temp table and INSERT ... ON CONFLICT
                # would read every row twice and make a speculative insert of each).
                # A path is read in chunks by asyncpg (in a worker thread) and sent as read:
                # the rows pass through this process without being decoded or held whole.
                try:
                    status = await c.copy_to_table(
                        "aggregates",
                        schema_name=self.schema,
                        source=rows,
                        columns=list(COPY_COLUMNS),
                        format="csv",
                        header=True,
                    )
                except FileNotFoundError as e:
                    # Not the database's fault (an OSError would be retried as one): the
                    # agent's file is gone; asyncpg opens it before it sends the COPY.
                    raise AgentError(f"batch {batch_id}: rows file gone: {e}") from e
                inserted = int(status.split()[-1])
                if inserted != agg.rows:
                    # Raising inside the transaction rolls the COPY back.
                    raise DatabaseError(
                        f"batch {batch_id}: {rows} "
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
                    json.dumps(dict(fields.get("timings", {}))),
                )
            return None

        return await self._run(op)

    async def open_batches(self) -> list[dict[str, Any]]:
        """Every batch not in a final state, oldest first: what a restarted daemon resumes."""
        final = [State.DONE.value, State.DEGRADED.value, State.FAILED.value]
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT * FROM {self._s}.batches WHERE NOT (state = ANY($1::text[]))"
                " ORDER BY created_at",
                final,
            )
        )
        return [_row(r) for r in rows]

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        """One ledger row with its agreement pairs, or None."""

        async def op(c: asyncpg.Connection) -> dict[str, Any] | None:
            r = await c.fetchrow(f"SELECT * FROM {self._s}.batches WHERE batch_id = $1", batch_id)
            if r is None:
                return None
            out = _row(r)
            pairs = await c.fetch(
                f"SELECT model_a, model_b, agreement, n_common FROM {self._s}.model_agreement"
                " WHERE batch_id = $1 ORDER BY model_a, model_b",
                batch_id,
            )
            out["agreement"] = [dict(p) for p in pairs]
            return out

        return await self._run(op)

    async def list(self, *, limit: int = 20, state: str | None = None) -> list[dict[str, Any]]:
        """The most recent ledger rows, newest first, optionally of one state."""
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT * FROM {self._s}.batches WHERE ($2::text IS NULL OR state = $2)"
                " ORDER BY created_at DESC LIMIT $1",
                limit,
                state,
            )
        )
        return [_row(r) for r in rows]

    async def final_states(self) -> dict[str, int]:
        """How many batches ended in each final state."""
        rows = await self._run(
            lambda c: c.fetch(f"SELECT state, count(*) AS n FROM {self._s}.batches GROUP BY state")
        )
        return {r["state"]: int(r["n"]) for r in rows}


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
