"""The exactly-once core under real concurrency (issue 18, item 2): two committers racing on one
batch, a batch failed while its commit runs, and a finished batch published again while
PostgreSQL is down.

The races are made deterministic, not lucky: a third connection holds the batch's ledger row
`FOR UPDATE`, every contender is started and seen *waiting on that lock* in `pg_stat_activity`
(in the order the test wants), and only then is the row released. PostgreSQL grants a row lock
to its waiters in the order they queued, so each test runs one interleaving, every time.

What each test kills (see the issue's mutation run):
- `Ledger.commit` reading the state without `FOR UPDATE`: both racers read `aggregating` and
  both write (or the second dies on the primary key instead of finding the batch committed);
- a commit that goes ahead on a `failed` batch: the failed batch is written and moved to
  `committed`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from agents.aggregation import rows_csv, summarise
from agents.consensus import BatchAggregate, aggregate
from coordinator.core.batch import State
from coordinator.daemon import embedded_pg
from coordinator.daemon.ledger import Ledger
from tests.conftest import MODELS, wait_until
from tests.faultlib import (
    FINAL,
    assert_exactly_once,
    ledger,
    publish_all,
    quarantined,
    staging_leftovers,
)
from tests.tables import result

MakeLedger = Callable[..., Awaitable[Ledger]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def holder(pg_dsn: str, anyio_backend: str) -> AsyncIterator[asyncpg.Connection]:
    """The third connection, which holds the batch's row (or an advisory lock) while the
    contenders line up behind it. (Not `admin`: pg_stat_activity is read as one snapshot per
    transaction, so the lock holder cannot watch the queue form.)"""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def make_ledger(
    pg_dsn: str, schema: str, admin: asyncpg.Connection, anyio_backend: str
) -> AsyncIterator[MakeLedger]:
    """Connected ledgers on this test's schema, each with its own pool; closed afterwards."""
    made: list[Ledger] = []

    async def make() -> Ledger:
        led = Ledger(pg_dsn, schema, retry_max_s=0.5)
        made.append(led)
        await led.connect()
        # The leader lock and the epoch fence are separate guards (one writer per host); these
        # tests check what the ledger row lock alone guarantees, so every racer is allowed to
        # write: they all lead with the host's one epoch.
        await admin.execute(
            f'INSERT INTO "{schema}".leaders'
            " (host_id, epoch, holder, holder_pid, holder_app, lease_until)"
            " VALUES ($1, 1, 'racers', 0, 'racers', now() + interval '1 hour')"
            " ON CONFLICT (host_id) DO NOTHING",
            led.host_id,
        )
        led.health.leader = True
        led.health.epoch = 1
        return led

    yield make
    for led in made:
        await led.close()


def agg_of(items: list[str], label: str) -> BatchAggregate:
    """Three models agreeing on `label` for each item."""
    return aggregate(
        {m: result([(i, label, 0.5) for i in items]) for m in ("slm-1", "slm-2", "slm-3")}
    )


async def commit(led: Ledger, batch_id: str, agg: BatchAggregate, folder: Path) -> State | None:
    """Ledger.commit as the pipeline calls it, from a rows file of its own."""
    path = folder / f"aggregates-{uuid.uuid4().hex[:8]}.csv"
    path.write_bytes(rows_csv(agg.items, batch_id))
    return await led.commit(batch_id, summarise(agg), path, fields={"timings": {"x_ms": 1.0}})


async def seen(led: Ledger, batch_id: str) -> None:
    now = datetime.now(UTC)
    await led.record_seen(
        batch_id,
        models_present=["slm-1", "slm-2", "slm-3"],
        models_missing=[],
        first_seen=now,
        deadline_at=now + timedelta(minutes=10),
    )


async def lock_waiters(admin: asyncpg.Connection, schema: str) -> list[str]:
    """The queries of this schema that wait on a lock right now."""
    rows = await admin.fetch(
        "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND pid <> pg_backend_pid() AND strpos(query, $1) > 0 ORDER BY query_start",
        f'"{schema}"',
    )
    return [r["query"] for r in rows]


async def until_waiting(admin: asyncpg.Connection, schema: str, n: int, what: str) -> list[str]:
    """Wait (10 s at most) until `n` statements of this schema wait on a lock."""
    for _ in range(500):  # polled: the waiting is the database's, no event tells us
        if len(found := await lock_waiters(admin, schema)) >= n:
            return found
        await anyio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}: waiting now {await lock_waiters(admin, schema)}")


async def state_rows(admin: asyncpg.Connection, schema: str, batch_id: str) -> dict[str, Any]:
    row = await admin.fetchrow(
        f'SELECT state, rows, error FROM "{schema}".batches WHERE batch_id = $1', batch_id
    )
    n = await admin.fetchval(
        f'SELECT count(*) FROM "{schema}".aggregates WHERE batch_id = $1', batch_id
    )
    items = await admin.fetch(
        f'SELECT item_id FROM "{schema}".aggregates WHERE batch_id = $1 ORDER BY item_id',
        batch_id,
    )
    pairs = await admin.fetchval(
        f'SELECT count(*) FROM "{schema}".model_agreement WHERE batch_id = $1', batch_id
    )
    assert row is not None
    return {**dict(row), "n": n, "items": [r["item_id"] for r in items], "pairs": pairs}


pytestmark = pytest.mark.anyio


# -- two committers on one batch ------------------------------------------------------------


@pytest.mark.parametrize("rows_b", ["same", "other"])
async def test_two_committers_racing_on_one_batch_write_it_once(
    make_ledger: MakeLedger,
    admin: asyncpg.Connection,
    holder: asyncpg.Connection,
    schema: str,
    tmp_path: Path,
    rows_b: str,
) -> None:
    """Two ledgers (two pools, two connections) commit the same batch at the same moment: the
    one that gets the row lock second must find the batch `committed` and write nothing. With
    the same rows the primary key would only turn the loser into an error; with other rows (an
    aggregate made again from other files) nothing but the row lock stops a second write."""
    a, b = await make_ledger(), await make_ledger()
    await seen(a, "race")
    await a.set_state("race", State.AGGREGATING)
    agg_a = agg_of([f"i{k:02d}" for k in range(10)], "x")
    agg_b = agg_a if rows_b == "same" else agg_of([f"j{k:02d}" for k in range(7)], "y")
    results: dict[str, State | BaseException | None] = {}

    async def run(name: str, led: Ledger, agg: BatchAggregate) -> None:
        try:
            results[name] = await commit(led, "race", agg, tmp_path)
        except Exception as e:  # the outcome is what the test checks
            results[name] = e

    async with anyio.create_task_group() as tg:
        tr = holder.transaction()
        await tr.start()
        await holder.execute(
            f'SELECT 1 FROM "{schema}".batches WHERE batch_id = $1 FOR UPDATE', "race"
        )
        tg.start_soon(run, "a", a, agg_a)
        await until_waiting(admin, schema, 1, "the first commit to wait on the row")
        tg.start_soon(run, "b", b, agg_b)
        await until_waiting(admin, schema, 2, "both commits to wait on the row")
        await tr.rollback()  # release: a gets the row first, b right after
    assert results == {"a": None, "b": State.COMMITTED}, results
    out = await state_rows(admin, schema, "race")
    assert out["state"] == "committed" and out["rows"] == 10
    assert out["n"] == 10 and out["items"] == [f"i{k:02d}" for k in range(10)]
    assert out["pairs"] == 3


# -- failed while the commit runs ------------------------------------------------------------


async def test_a_batch_failed_while_its_commit_waits_is_never_written(
    make_ledger: MakeLedger,
    admin: asyncpg.Connection,
    holder: asyncpg.Connection,
    schema: str,
    tmp_path: Path,
) -> None:
    """The deadline (or a failing step) marks the batch `failed` on one connection while its
    commit is under way on another, the failure reaching the row first: the commit must find
    `failed` under the row lock, write no row and leave the batch failed."""
    daemon_side, committer = await make_ledger(), await make_ledger()
    await seen(daemon_side, "late")
    await daemon_side.set_state("late", State.AGGREGATING)
    found: list[State | None] = []
    failed = anyio.Event()

    async def fail() -> None:
        await daemon_side.set_state("late", State.FAILED, error="deadline passed")
        failed.set()

    async def run_commit() -> None:
        found.append(await commit(committer, "late", agg_of(["i1", "i2"], "x"), tmp_path))

    async with anyio.create_task_group() as tg:
        tr = holder.transaction()
        await tr.start()
        await holder.execute(
            f'SELECT 1 FROM "{schema}".batches WHERE batch_id = $1 FOR UPDATE', "late"
        )
        tg.start_soon(fail)
        await until_waiting(admin, schema, 1, "the failure to wait on the row")
        tg.start_soon(run_commit)
        await until_waiting(admin, schema, 2, "the commit to wait on the row behind it")
        await tr.rollback()
    assert failed.is_set()
    assert found == [State.FAILED]
    out = await state_rows(admin, schema, "late")
    assert (out["state"], out["rows"], out["n"], out["pairs"]) == ("failed", None, 0, 0)
    assert out["error"] == "deadline passed"


async def test_a_commit_of_a_batch_already_failed_writes_nothing(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    """The same without a race: the failure is in before the commit starts."""
    led = await make_ledger()
    await seen(led, "gone")
    await led.set_state("gone", State.FAILED, error="a step failed for good")
    assert await commit(led, "gone", agg_of(["i1", "i2", "i3"], "x"), tmp_path) is State.FAILED
    out = await state_rows(admin, schema, "gone")
    assert (out["state"], out["rows"], out["n"], out["pairs"]) == ("failed", None, 0, 0)


async def test_a_commit_holding_the_row_makes_a_concurrent_failure_wait_for_it(
    make_ledger: MakeLedger,
    admin: asyncpg.Connection,
    holder: asyncpg.Connection,
    schema: str,
    tmp_path: Path,
) -> None:
    """The other order: the commit has the row (it is COPYing) when the failure comes. The
    failure's UPDATE waits for the commit's transaction, so the rows and `committed` land
    together, never rows under a batch whose ledger row said `aggregating` or `failed` while
    they were written. (Seen from a third connection while the commit is held mid-COPY by a
    trigger that waits on an advisory lock.)"""
    led, daemon_side = await make_ledger(), await make_ledger()
    await seen(led, "held")
    await led.set_state("held", State.AGGREGATING)
    key = uuid.uuid4().int % (2**31)
    await admin.execute(
        f'CREATE FUNCTION "{schema}".hold() RETURNS trigger LANGUAGE plpgsql AS'
        f" $$ BEGIN PERFORM pg_advisory_lock_shared({key});"
        f" PERFORM pg_advisory_unlock_shared({key});"
        " RETURN NEW; END $$;"
        f' CREATE TRIGGER hold BEFORE INSERT ON "{schema}".model_agreement'
        f' FOR EACH ROW EXECUTE FUNCTION "{schema}".hold()'
    )
    found: list[State | None] = []
    failure_done = anyio.Event()

    async def run_commit() -> None:
        found.append(await commit(led, "held", agg_of(["i1", "i2"], "x"), tmp_path))

    async def fail() -> None:
        await daemon_side.set_state("held", State.FAILED, error="late failure")
        failure_done.set()

    async with anyio.create_task_group() as tg:
        await holder.execute("SELECT pg_advisory_lock($1)", key)
        tg.start_soon(run_commit)
        await until_waiting(admin, schema, 1, "the commit to hold the row, mid-write")
        tg.start_soon(fail)
        for _ in range(500):
            if failure_done.is_set() or len(await lock_waiters(admin, schema)) >= 2:
                break
            await anyio.sleep(0.02)
        # The failure must queue behind the commit's row lock, not slip in under it.
        assert not failure_done.is_set(), "the failure was written while the commit held the row"
        assert len(await lock_waiters(admin, schema)) == 2
        # Mid-commit, nothing of it is visible: no rows, the ledger still says aggregating.
        out = await state_rows(admin, schema, "held")
        assert (out["state"], out["n"]) == ("aggregating", 0)
        await holder.execute("SELECT pg_advisory_unlock($1)", key)
    assert found == [None] and failure_done.is_set()
    out = await state_rows(admin, schema, "held")
    # The rows landed once, with the `committed` they were written under. (What the ledger
    # does with a failure that comes after the commit is its transition rule's business.)
    assert (out["n"], out["rows"], out["pairs"]) == (2, 2, 3)


# -- a finished batch published again while PostgreSQL is down --------------------------------


def test_finished_batch_republished_while_the_database_is_down_is_never_written_twice(
    env, daemon
) -> None:
    """The daemon adopts a batch it cannot look up (PostgreSQL down) optimistically and runs it
    up to the commit; the commit then re-checks the ledger under the row lock, finds the batch
    `done`, writes nothing and quarantines the republished files as `finished`."""
    env.write_config(database={"dsn": "", "schema": env.schema, "retry_max_s": 1.0})
    d1 = daemon().start()
    env.dsn = d1.status()["database"]["dsn"]  # the daemon's own server, for the checks below
    first = publish_all(env, "dbdown", seed=1801)
    assert d1.wait_state("dbdown", FINAL)["state"] == "done"
    assert d1.stop() == 0
    # A new daemon run that never finished the batch itself (so only the ledger knows).
    d2 = daemon().start()
    embedded_pg.stop(env.state, mode="fast")
    wait_until(
        lambda: d2.status()["database"]["connected"] is False,
        30,
        "the daemon to see the database gone",
    )
    again = publish_all(env, "dbdown", seed=1899)
    wait_until(
        lambda: any(
            b["batch_id"] == "dbdown" and b["state"] == "aggregating"
            for b in d2.status()["batches"]
        ),
        60,
        "the republished batch to run up to its commit with the database down",
    )
    assert not quarantined(env, "dbdown")  # nothing decided without the ledger
    embedded_pg.start(env.state)

    def results_quarantined() -> dict[str, tuple[bytes, str]]:
        q = quarantined(env, "dbdown")
        return {n: v for n, v in q.items() if n.startswith("slm-")}

    wait_until(
        lambda: len(results_quarantined()) == len(MODELS) and not (env.staging / "dbdown").exists(),
        60,
        "the republished files to be quarantined at the commit",
    )
    # The republished results, and the cross-checks this run made of them, all as finished.
    q = quarantined(env, "dbdown")
    assert sorted(data for data, _ in results_quarantined().values()) == sorted(again.values())
    assert len(q) == 2 * len(MODELS), sorted(q)
    assert all(r.startswith("finished: batch dbdown is already done") for _, r in q.values())
    assert "batch had already finished; its files are quarantined" in d2.log.read_text()
    row = ledger(env, "dbdown")
    assert row is not None and row["state"] == "done"
    wait_until(lambda: not any(env.tmpfs.rglob("*.parquet")), 15, "node copies to be purged")
    assert_exactly_once(env, "dbdown", published=first)
    assert staging_leftovers(env) == []
