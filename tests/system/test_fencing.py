"""Several hosts on one schema, and the leader's fence, at the ledger: real PostgreSQL, a Ledger
per coordinator (docs/reliability.md, "Several hosts" and "Fencing").

The daemons themselves, as separate processes, are in tests/system/test_hosts.py."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest

from agents.aggregation import rows_csv, summarise
from agents.consensus import aggregate
from coordinator.core.batch import State
from coordinator.core.errors import BatchOfAnotherHost, FencedError, NotLeaderError
from coordinator.daemon.ledger import MIGRATIONS, Ledger, lock_ids, lock_key
from tests.tables import result

MakeLedger = Callable[..., Awaitable[Ledger]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def make_ledger(
    pg_dsn: str, schema: str, admin: asyncpg.Connection, anyio_backend: str
) -> AsyncIterator[MakeLedger]:
    """Factory for connected ledgers of a given host on this test's schema."""
    made: list[Ledger] = []

    async def make(host: str, *, leader: bool = True, lease_s: float = 10.0) -> Ledger:
        ledger = Ledger(pg_dsn, schema, host_id=host, lease_s=lease_s, retry_max_s=0.5)
        made.append(ledger)
        await ledger.connect()
        if leader:
            assert await ledger.acquire_leadership()
        return ledger

    yield make
    for ledger in made:
        await ledger.close()


async def seen(led: Ledger, batch_id: str) -> State:
    now = datetime.now(UTC)
    return await led.record_seen(
        batch_id,
        models_present=["slm-1", "slm-2", "slm-3"],
        models_missing=[],
        first_seen=now,
        deadline_at=now + timedelta(minutes=10),
    )


async def commit(led: Ledger, batch_id: str) -> State | None:
    agg = aggregate(
        {m: result([(f"i{i}", "cat", 0.5) for i in range(3)]) for m in ("slm-1", "slm-2", "slm-3")}
    )
    path = Path(tempfile.mkdtemp(prefix="nc-fence-")) / "rows.csv"
    path.write_bytes(rows_csv(agg.items, batch_id))
    return await led.commit(batch_id, summarise(agg), path, fields={"timings": {}})


async def rows_of(admin: asyncpg.Connection, schema: str, batch_id: str) -> int:
    n: int = await admin.fetchval(
        f'SELECT count(*) FROM "{schema}".aggregates WHERE batch_id = $1', batch_id
    )
    return n


async def leaders(admin: asyncpg.Connection, schema: str, host: str) -> asyncpg.Record:
    row = await admin.fetchrow(f'SELECT * FROM "{schema}".leaders WHERE host_id = $1', host)
    assert row is not None
    return row


async def expire_lease(admin: asyncpg.Connection, schema: str, host: str, ago_s: float) -> None:
    """Make the host's lease as if its leader had been silent `ago_s` seconds past it."""
    await admin.execute(
        f'UPDATE "{schema}".leaders SET lease_until = now() - make_interval(secs => $2)'
        " WHERE host_id = $1",
        host,
        ago_s,
    )


async def lock_pid(admin: asyncpg.Connection, schema: str, host: str) -> int | None:
    classid, objid = lock_ids(lock_key(schema, host))
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
        classid,
        objid,
    )
    return pid


async def lock_free(admin: asyncpg.Connection, schema: str, host: str) -> bool:
    return await lock_pid(admin, schema, host) is None


async def until(pred: Callable[[], Awaitable[bool]]) -> None:
    """Poll `pred` for up to 10 s: the server releases a dead backend's locks asynchronously."""
    with anyio.fail_after(10):
        while not await pred():  # noqa: ASYNC110 - the change happens in another process
            await anyio.sleep(0.05)


# --- several hosts -------------------------------------------------------------------------


async def test_each_host_has_its_own_leader_and_sees_only_its_own_batches(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a, b = await make_ledger("host-a"), await make_ledger("host-b")
    assert a.health.leader and b.health.leader  # one leader per host, not per schema
    assert await seen(a, "a-1") is State.WAITING
    assert await seen(b, "b-1") is State.WAITING
    assert await commit(a, "a-1") is None
    assert [r["batch_id"] for r in await a.list()] == ["a-1"]
    assert [r["batch_id"] for r in await b.list()] == ["b-1"]
    assert [r["batch_id"] for r in await a.list(host="host-b")] == ["b-1"]
    assert [r["batch_id"] for r in await b.open_batches()] == ["b-1"]
    assert [r["batch_id"] for r in await a.open_batches()] == ["a-1"]
    assert await a.get("b-1") is None and (await b.get("b-1") or {})["host_id"] == "host-b"
    assert await b.final_states() == {"waiting": 1}
    # A state write of one host never moves the other's row, even under the same id.
    await a.set_state("b-1", State.FAILED, error="not mine")
    assert (await b.get("b-1") or {})["state"] == "waiting"


async def test_a_batch_id_of_another_host_is_refused_naming_both_hosts(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a, b = await make_ledger("host-a"), await make_ledger("host-b")
    await seen(a, "shared-id")
    before = dict(await admin.fetchrow(f'SELECT * FROM "{schema}".batches'))
    with pytest.raises(BatchOfAnotherHost) as e:
        await seen(b, "shared-id")
    assert "shared-id" in str(e.value) and "host-a" in str(e.value) and "host-b" in str(e.value)
    with pytest.raises(BatchOfAnotherHost):
        await commit(b, "shared-id")
    assert await rows_of(admin, schema, "shared-id") == 0
    rows = await admin.fetch(f'SELECT * FROM "{schema}".batches')
    assert [dict(r) for r in rows] == [before]  # the other host's row untouched, no second one
    assert await commit(a, "shared-id") is None  # its own host commits it
    assert await rows_of(admin, schema, "shared-id") == 3


async def test_a_batch_adopted_while_the_database_was_down_is_refused_if_another_hosts(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a, b = await make_ledger("host-a"), await make_ledger("host-b")
    await seen(a, "shared-id")
    now = datetime.now(UTC)
    b.insert_seen_soon(
        "shared-id",
        models_present=[],
        models_missing=["slm-1"],
        first_seen=now,
        deadline_at=now + timedelta(minutes=10),
    )
    b.set_state_soon("shared-id", State.READY, models_present=["slm-1"])
    await b.flush("shared-id")  # the queued writes are dropped, nothing raised, nothing written
    assert b.queued == 0
    with pytest.raises(BatchOfAnotherHost, match=r"host-a.*host-b"):
        await commit(b, "shared-id")
    row = await admin.fetchrow(f'SELECT state, host_id FROM "{schema}".batches')
    assert dict(row) == {"state": "waiting", "host_id": "host-a"}
    assert await rows_of(admin, schema, "shared-id") == 0


async def test_a_ledger_from_before_hosts_is_migrated_to_the_current_host(
    pg_dsn: str, schema: str, admin: asyncpg.Connection, make_ledger: MakeLedger
) -> None:
    s = f'"{schema}"'
    await admin.execute(f"CREATE SCHEMA {s}")
    await admin.execute(
        f"CREATE TABLE {s}.schema_version (version integer PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version in range(3):
        await admin.execute(MIGRATIONS[version].format(s=s))
        await admin.execute(f"INSERT INTO {s}.schema_version (version) VALUES ($1)", version + 1)
    await admin.execute(f"INSERT INTO {s}.batches (batch_id, state) VALUES ('old-1', 'ready')")
    led = await make_ledger("host-m")
    assert await led.schema_version() == len(MIGRATIONS)
    assert [r["batch_id"] for r in await led.open_batches()] == ["old-1"]
    assert await admin.fetchval(f"SELECT host_id FROM {s}.batches") == "host-m"
    other = await make_ledger("host-n")
    assert await other.open_batches() == []


# --- the fence -----------------------------------------------------------------------------


async def test_a_standby_waits_while_the_lease_is_renewed(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a = await make_ledger("h", lease_s=2.0)
    standby = await make_ledger("h", leader=False, lease_s=2.0)
    for _ in range(4):  # past two leases, renewed all along
        assert await a.check_leadership()
        assert not await standby.acquire_leadership()
        await anyio.sleep(1.0)
    assert standby.held_elsewhere and a.health.leader
    assert (await leaders(admin, schema, "h"))["epoch"] == 1


async def test_a_leader_silent_past_its_lease_is_taken_over_and_fenced(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a = await make_ledger("h", lease_s=2.0)
    await seen(a, "b1")
    first = await leaders(admin, schema, "h")
    assert first["epoch"] == 1 and first["holder_pid"] == await lock_pid(admin, schema, "h")
    standby = await make_ledger("h", leader=False, lease_s=2.0)
    assert not await standby.acquire_leadership()  # the lease still runs

    await expire_lease(admin, schema, "h", 0.5)  # A stopped: no renewal
    assert await standby.acquire_leadership()
    assert standby.epoch == 2
    row = await leaders(admin, schema, "h")
    assert row["epoch"] == 2 and row["holder_pid"] == await lock_pid(admin, schema, "h")
    assert row["holder_app"] == standby.app_name

    # A wakes up: its commit and its state writes are refused inside their transactions.
    with pytest.raises(FencedError, match="epoch 2, ours 1"):
        await commit(a, "b1")
    assert a.fenced and not a.health.leader
    with pytest.raises(FencedError):
        await a.set_state("b1", State.FAILED, error="from the fenced one")
    assert not await a.check_leadership()
    assert not await a.acquire_leadership()  # it never leads again
    assert await rows_of(admin, schema, "b1") == 0
    assert (await standby.get("b1") or {})["state"] == "waiting"
    assert await commit(standby, "b1") is None
    assert await rows_of(admin, schema, "b1") == 3


async def test_a_commit_open_at_the_takeover_is_ended_and_never_lands(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a = await make_ledger("h", lease_s=2.0)
    await seen(a, "b1")
    # A's open transaction, as a paused commit holds it: the leaders row FOR KEY SHARE; its
    # lease expires meanwhile (the renewal is not held up by it).
    assert a._pool is not None
    held = await a._pool.acquire()
    tx = held.transaction()
    await tx.start()
    await held.fetchval(
        f'SELECT epoch FROM "{schema}".leaders WHERE host_id = $1 FOR KEY SHARE', "h"
    )
    with anyio.fail_after(5):
        assert await a.check_leadership()
    await expire_lease(admin, schema, "h", 0.5)
    standby = await make_ledger("h", leader=False, lease_s=2.0)
    with anyio.fail_after(10):
        assert await standby.acquire_leadership()  # A's sessions were ended, the bump went in
    assert standby.epoch == 2
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await held.execute("SELECT 1")
    await a._pool.release(held)
    with pytest.raises(FencedError):
        await commit(a, "b1")
    assert await commit(standby, "b1") is None
    assert await rows_of(admin, schema, "b1") == 3


async def test_only_a_coordinator_that_never_recorded_itself_is_taken_over_after_a_lease(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, pg_dsn: str
) -> None:
    a = await make_ledger("h", lease_s=2.0)
    await a.close()  # a clean stop: the lock is free, the lease left as it was
    # Anything but a coordinator holding the lock (an operator's psql) is never ended.
    other = await asyncpg.connect(pg_dsn, server_settings={"application_name": "psql"})
    standby = await make_ledger("h", leader=False, lease_s=2.0)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(schema, "h"))
        await expire_lease(admin, schema, "h", 100.0)
        assert not await standby.acquire_leadership()
        assert await _alive(other)
    finally:
        await other.close()
    await until(lambda: lock_free(admin, schema, "h"))
    # A coordinator stuck between taking the lock and recording itself gets one more lease.
    thief = await asyncpg.connect(pg_dsn, server_settings={"application_name": a.lock_app_name})
    try:
        assert await thief.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(schema, "h"))
        await expire_lease(admin, schema, "h", 1.0)  # expired, but less than a lease ago
        assert not await standby.acquire_leadership()
        await expire_lease(admin, schema, "h", 3.0)  # a whole lease more: taken over
        assert await standby.acquire_leadership()
        assert thief.is_closed() or not await _alive(thief)
        assert standby.epoch == 2
    finally:
        thief.terminate()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
        return False
    return True


async def test_a_leader_re_takes_its_lock_with_its_epoch_unless_another_led_meanwhile(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    a = await make_ledger("h", lease_s=2.0)
    pid = await lock_pid(admin, schema, "h")
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    assert not await a.check_leadership()
    await until(a.acquire_leadership)
    assert a.epoch == 1 and not a.fenced  # nobody led in between: the same tenure
    await seen(a, "b1")

    # Now another leader comes and goes while A's lock session is away.
    pid = await lock_pid(admin, schema, "h")
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    assert not await a.check_leadership()
    await until(lambda: lock_free(admin, schema, "h"))
    b = await make_ledger("h", lease_s=2.0)
    assert b.epoch == 2
    await b.close()
    await until(lambda: lock_free(admin, schema, "h"))
    assert not await a.acquire_leadership()
    assert a.fenced
    with pytest.raises(FencedError):
        await seen(a, "b2")


async def test_a_ledger_that_never_led_writes_nothing(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    led = await make_ledger(f"h-{uuid.uuid4().hex[:6]}", leader=False)
    with pytest.raises(NotLeaderError, match="never led"):
        await seen(led, "b1")
    assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0
