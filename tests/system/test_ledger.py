"""The ledger against a real PostgreSQL: migrations, state, the commit and the leader lock."""

from __future__ import annotations

import os
import socket
import tempfile
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
from coordinator.core.batch import State, may_move
from coordinator.core.errors import AgentError, DatabaseError, NotLeaderError, RowsRefused
from coordinator.core.rowsfile import RowsFile, ident_of
from coordinator.daemon.ledger import MIGRATIONS, Ledger, lock_ids, lock_key
from tests.opens import Opens
from tests.tables import result

pytestmark = pytest.mark.anyio

MakeLedger = Callable[..., Awaitable[Ledger]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def make_ledger(
    pg_dsn: str, schema: str, admin: asyncpg.Connection, anyio_backend: str
) -> AsyncIterator[MakeLedger]:
    """Factory for connected ledgers on this test's schema; all are closed afterwards."""
    made: list[Ledger] = []

    async def make(*, leader: bool = False, on_schema: str | None = None) -> Ledger:
        ledger = Ledger(pg_dsn, on_schema or schema, retry_max_s=0.5)
        made.append(ledger)
        await ledger.connect()
        if leader:
            assert await ledger.acquire_leadership()
        return ledger

    yield make
    for ledger in made:
        await ledger.close()


def small_aggregate() -> BatchAggregate:
    """Three models over three items; the item ids and labels need CSV quoting."""
    return aggregate(
        {
            "slm-1": result([("i1", "cat", 0.9), ("i,2", 'say "hi"', 0.5), ("i3", "", 0.7)]),
            "slm-2": result([("i1", "cat", 0.8), ("i,2", "dog", 0.6), ("i3", "", 0.2)]),
            "slm-3": result([("i1", "dog", 0.4), ("i,2", 'say "hi"', 0.3), ("i3", "x", 0.1)]),
        }
    )


async def commit(
    ledger: Ledger, batch_id: str, agg: BatchAggregate, *, fields: dict[str, Any]
) -> State | None:
    """Ledger.commit as the pipeline calls it: the summary, and the agent's CSV as a file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "aggregates.csv"
        path.write_bytes(rows_csv(agg.items, batch_id))
        return await ledger.commit(batch_id, summarise(agg), path, fields=fields)


async def seen(ledger: Ledger, batch_id: str, *, present: list[str] | None = None) -> State:
    now = datetime.now(UTC)
    return await ledger.record_seen(
        batch_id,
        models_present=present if present is not None else ["slm-1"],
        models_missing=["slm-2"],
        first_seen=now,
        deadline_at=now + timedelta(minutes=10),
    )


async def force(admin: asyncpg.Connection, schema: str, batch_id: str, state: State) -> None:
    """Put a batch in `state` whatever the rule says (the test's setup, not a move)."""
    await admin.execute(
        f'UPDATE "{schema}".batches SET state = $2 WHERE batch_id = $1', batch_id, state.value
    )


async def count(admin: asyncpg.Connection, schema: str, table: str, batch_id: str) -> int:
    return int(
        await admin.fetchval(
            f'SELECT count(*) FROM "{schema}".{table} WHERE batch_id = $1', batch_id
        )
    )


# --- migrations ----------------------------------------------------------------------------


async def test_connect_migrates_to_the_latest_schema_version(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger()
    assert await ledger.schema_version() == len(MIGRATIONS)
    tables = await admin.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
    )
    assert {r["table_name"] for r in tables} == {
        "schema_version",
        "batches",
        "aggregates",
        "model_agreement",
        "leaders",
        "node_usage",
    }
    assert ledger.health.connected


async def test_migrating_twice_is_a_no_op(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    first = await make_ledger(leader=True)
    await seen(first, "b1")
    second = await make_ledger()  # connect() migrates again on the same schema
    assert await second.schema_version() == len(MIGRATIONS)
    versions = await admin.fetch(f'SELECT version FROM "{schema}".schema_version')
    assert [r["version"] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
    assert (await second.get("b1") or {}).get("state") == "waiting"  # nothing was recreated


async def test_an_unreachable_database_is_a_database_error(schema: str) -> None:
    ledger = Ledger("postgresql://nobody@127.0.0.1:1/none", schema)
    with pytest.raises(DatabaseError, match="unreachable"):
        await ledger.connect()
    assert not ledger.health.connected
    assert ledger.health.last_error


# --- the ledger ----------------------------------------------------------------------------


async def test_record_seen_creates_the_row_once(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger(leader=True)
    assert await seen(ledger, "b1", present=["slm-1"]) is State.WAITING
    assert await seen(ledger, "b1", present=["slm-1", "slm-2"]) is State.WAITING
    assert await count(admin, schema, "batches", "b1") == 1
    row = await ledger.get("b1")
    assert row is not None
    assert row["models_present"] == ["slm-1"]  # the first sighting is kept


async def test_record_seen_returns_the_state_a_batch_already_has(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await ledger.set_state("b1", State.STAGED)
    assert await seen(ledger, "b1") is State.STAGED


async def test_set_state_sets_plain_columns_and_merges_json_columns(
    make_ledger: MakeLedger,
) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await ledger.set_state(
        "b1", State.STAGING, timings={"barrier_s": 1.5}, placement={"0": ["slm-1"]}
    )
    await ledger.set_state(
        "b1",
        State.STAGED,
        timings={"stage_s": 0.25, "barrier_s": 2.0},
        staged_bytes={"0": 1234},
        models_missing=[],
        error="none so far",
    )
    row = await ledger.get("b1")
    assert row is not None
    assert row["state"] == "staged"
    assert row["timings"] == {"barrier_s": 2.0, "stage_s": 0.25}
    assert row["placement"] == {"0": ["slm-1"]}
    assert row["staged_bytes"] == {"0": 1234}
    assert row["models_missing"] == []
    assert row["error"] == "none so far"


async def test_a_schema_at_version_4_migrates_to_the_last_keeping_its_batches(
    pg_dsn: str, admin: asyncpg.Connection, schema: str, make_ledger: MakeLedger
) -> None:
    """A ledger written before the per-node accounting: its batches stay, with no figures."""
    s = f'"{schema}"'
    async with admin.transaction():
        await admin.execute("SELECT set_config('numa_coordinator.host_id', $1, true)", "old-host")
        await admin.execute(f"CREATE SCHEMA {s}")
        await admin.execute(
            f"CREATE TABLE {s}.schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in enumerate(MIGRATIONS[:4], start=1):
            await admin.execute(sql.format(s=s))
            await admin.execute(f"INSERT INTO {s}.schema_version (version) VALUES ($1)", version)
        await admin.execute(
            f"INSERT INTO {s}.batches (batch_id, state, host_id) VALUES ('old', 'done', $1)",
            socket.gethostname(),
        )
    ledger = await make_ledger()
    assert await ledger.schema_version() == len(MIGRATIONS) == 6
    row = await ledger.get("old")
    assert row is not None
    assert row["state"] == "done"
    assert (row["compressed_bytes"], row["decoded_bytes"], row["encode_cpu_s"]) == (None,) * 3
    assert row["node_usage"] == {}


async def test_a_state_change_writes_each_nodes_usage_keeping_the_larger_figures(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await ledger.set_state(
        "b1",
        State.STAGED,
        compressed_bytes=100,
        decoded_bytes=350,
        encode_cpu_s=0.5,
        node_usage={
            "0": {"stage_copied_bytes": 10, "stage_remote_bytes": 0, "peak_rss_bytes": 900},
            "1": {"stage_copied_bytes": 10, "stage_remote_bytes": 10},
        },
    )
    # The running totals of a later step (a resumed batch's smaller peak among them).
    await ledger.set_state(
        "b1",
        State.CROSSCHECKED,
        node_usage={
            "0": {
                "stage_copied_bytes": 10,
                "stage_remote_bytes": 0,
                "crosscheck_read_bytes": 10,
                "peak_rss_bytes": 500,
            }
        },
    )
    row = await ledger.get("b1")
    assert row is not None
    assert (row["compressed_bytes"], row["decoded_bytes"], row["encode_cpu_s"]) == (100, 350, 0.5)
    usage = row["node_usage"]
    assert set(usage) == {"0", "1"}
    assert usage["0"]["stage_copied_bytes"] == 10
    assert usage["0"]["crosscheck_read_bytes"] == 10
    assert usage["0"]["peak_rss_bytes"] == 900  # the larger stays
    assert usage["1"]["stage_remote_bytes"] == 10
    assert usage["1"]["crosscheck_read_bytes"] is None  # never reported: unknown, not 0
    # A move the rule refuses writes no figure either.
    await force(admin, schema, "b1", State.DONE)
    await ledger.set_state("b1", State.STAGED, node_usage={"2": {"stage_copied_bytes": 1}})
    assert set((await ledger.get("b1") or {})["node_usage"]) == {"0", "1"}
    with pytest.raises(ValueError, match=r"node_usage of node 0: unknown column\(s\) \['bogus'\]"):
        await ledger.set_state("b1", State.DONE, node_usage={"0": {"bogus": 1}})


async def test_set_state_refuses_an_unknown_column(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    with pytest.raises(ValueError, match="bogus"):
        await ledger.set_state("b1", State.READY, bogus=1)
    assert (await ledger.get("b1") or {})["state"] == "waiting"


async def test_set_state_never_moves_a_finished_batch(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await force(admin, schema, "b1", State.DONE)
    await ledger.set_state("b1", State.STAGING)
    await ledger.set_state("b1", State.FAILED, error="late")
    row = await ledger.get("b1")
    assert row is not None
    assert (row["state"], row["error"]) == ("done", None)


async def test_set_state_never_moves_a_committed_batch_back(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    assert await commit(ledger, "b1", small_aggregate(), fields={}) is None
    await ledger.set_state("b1", State.AGGREGATING)
    assert (await ledger.get("b1") or {})["state"] == "committed"
    await ledger.set_state("b1", State.ARCHIVED, lake_path="/lake/b1")
    assert (await ledger.get("b1") or {})["state"] == "archived"


@pytest.mark.parametrize("current", list(State))
async def test_set_state_makes_exactly_the_moves_the_rule_allows(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, current: State
) -> None:
    """The ledger's guard is batch.may_move, pair by pair: an allowed move happens (with its
    fields), any other leaves the row as it was."""
    ledger = await make_ledger(leader=True)
    for new in State:
        bid = f"b-{current.value}-{new.value}"
        await seen(ledger, bid)
        await force(admin, schema, bid, current)
        await ledger.set_state(bid, new, error="moved")
        row = await ledger.get(bid)
        assert row is not None
        want = (new.value, "moved") if may_move(current, new) else (current.value, None)
        assert (row["state"], row["error"]) == want, (current, new)


async def test_queued_state_changes_are_written_in_order_by_flush(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    ledger.set_state_soon("b1", State.STAGING, timings={"a": 1})
    ledger.set_state_soon("b1", State.STAGED, timings={"b": 2})
    assert ledger.queued == 2
    assert (await ledger.get("b1") or {})["state"] == "waiting"  # nothing written yet
    await ledger.flush("b1")
    assert ledger.queued == 0
    row = await ledger.get("b1")
    assert row is not None
    assert (row["state"], row["timings"]) == ("staged", {"a": 1, "b": 2})


async def test_commit_writes_queued_state_changes_first(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    ledger.set_state_soon("b1", State.AGGREGATING, timings={"stage_s": 3.0})
    assert await commit(ledger, "b1", small_aggregate(), fields={"timings": {"agg_s": 1.0}}) is None
    row = await ledger.get("b1")
    assert row is not None
    assert (row["state"], row["timings"]) == ("committed", {"stage_s": 3.0, "agg_s": 1.0})
    assert ledger.queued == 0


async def test_open_batches_leaves_out_final_states(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger(leader=True)
    for b, state in [("b1", State.STAGED), ("b2", State.DONE), ("b3", State.FAILED)]:
        await seen(ledger, b)
        await force(admin, schema, b, state)
    await seen(ledger, "b4")
    assert sorted(r["batch_id"] for r in await ledger.open_batches()) == ["b1", "b4"]
    assert await ledger.final_states() == {"staged": 1, "done": 1, "failed": 1, "waiting": 1}


# --- the commit ----------------------------------------------------------------------------


async def test_commit_writes_the_rows_and_moves_the_ledger_to_committed(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    ledger = await make_ledger(leader=True)
    agg = small_aggregate()
    await seen(ledger, "b1")
    await ledger.set_state("b1", State.AGGREGATING, timings={"stage_s": 1.0})
    assert await commit(ledger, "b1", agg, fields={"timings": {"aggregate_s": 0.5}}) is None

    rows = await admin.fetch(
        f'SELECT item_id, consensus, votes, n_models, confidence FROM "{schema}".aggregates'
        " WHERE batch_id = $1 ORDER BY item_id",
        "b1",
    )
    assert [dict(r) for r in rows] == sorted(agg.items.to_pylist(), key=lambda r: r["item_id"])
    pairs = await admin.fetch(
        f'SELECT model_a, model_b, agreement, n_common FROM "{schema}".model_agreement'
        " WHERE batch_id = $1 ORDER BY model_a, model_b",
        "b1",
    )
    assert [tuple(p) for p in pairs] == [
        (p.model_a, p.model_b, p.agreement, p.n_common) for p in agg.agreement
    ]
    row = await ledger.get("b1")
    assert row is not None
    assert row["state"] == "committed"
    assert row["rows"] == 3
    assert row["fleiss_kappa"] == pytest.approx(agg.fleiss_kappa)
    assert row["consensus_agreement"] == pytest.approx(agg.consensus_agreement)
    assert row["timings"] == {"stage_s": 1.0, "aggregate_s": 0.5}


async def test_a_second_commit_reports_committed_and_writes_no_duplicate(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    """commit() returns None when it wrote, else the state it found and wrote nothing."""
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    assert await commit(ledger, "b1", small_aggregate(), fields={}) is None
    bigger = aggregate({"slm-1": result([(f"j{k}", "a", 0.5) for k in range(10)])})
    assert await commit(ledger, "b1", bigger, fields={}) is State.COMMITTED
    assert await count(admin, schema, "aggregates", "b1") == 3
    assert await count(admin, schema, "model_agreement", "b1") == 3
    assert (await ledger.get("b1") or {})["rows"] == 3


@pytest.mark.parametrize("state", [State.ARCHIVED, State.DONE, State.DEGRADED])
async def test_commit_after_committed_states_writes_nothing(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, state: State
) -> None:
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await force(admin, schema, "b1", state)
    assert await commit(ledger, "b1", small_aggregate(), fields={}) is state
    assert await count(admin, schema, "aggregates", "b1") == 0
    assert (await ledger.get("b1") or {})["state"] == state.value


async def test_commit_is_one_transaction(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    """When the last insert fails, the aggregates already inserted are rolled back too."""
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    await ledger.set_state("b1", State.AGGREGATING)
    await admin.execute(
        f'CREATE FUNCTION "{schema}".boom() RETURNS trigger LANGUAGE plpgsql AS'
        " $$ BEGIN RAISE EXCEPTION 'agreement insert refused'; END $$;"
        f' CREATE TRIGGER boom BEFORE INSERT ON "{schema}".model_agreement'
        f' FOR EACH ROW EXECUTE FUNCTION "{schema}".boom()'
    )
    with pytest.raises(asyncpg.PostgresError, match="agreement insert refused"):
        await commit(ledger, "b1", small_aggregate(), fields={})
    assert await count(admin, schema, "aggregates", "b1") == 0
    assert (await ledger.get("b1") or {})["state"] == "aggregating"

    await admin.execute(f'DROP TRIGGER boom ON "{schema}".model_agreement')
    assert await commit(ledger, "b1", small_aggregate(), fields={}) is None
    assert await count(admin, schema, "aggregates", "b1") == 3


async def test_commit_without_a_ledger_row_is_a_database_error(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(leader=True)
    with pytest.raises(DatabaseError, match="no ledger row"):
        await commit(ledger, "ghost", small_aggregate(), fields={})


async def test_commit_refuses_when_not_the_leader(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    leader = await make_ledger(leader=True)
    await seen(leader, "b1")
    ledger = await make_ledger()
    with pytest.raises(NotLeaderError):
        await seen(ledger, "b2")  # nothing is written by a ledger that never led
    with pytest.raises(NotLeaderError):
        await commit(ledger, "b1", small_aggregate(), fields={})
    assert await count(admin, schema, "aggregates", "b1") == 0
    assert (await ledger.get("b1") or {})["state"] == "waiting"
    assert await ledger.get("b2") is None


async def test_an_item_every_model_abstained_on_commits_with_confidence_0(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    """aggregate() gives such an item a null confidence; the NOT NULL column stores 0."""
    ledger = await make_ledger(leader=True)
    agg = aggregate(
        {
            "slm-1": result([("i1", "cat", 0.9), ("i2", None, None)]),
            "slm-2": result([("i1", "cat", 0.8), ("i2", None, None)]),
        }
    )
    await seen(ledger, "b1")
    assert await commit(ledger, "b1", agg, fields={}) is None
    row = await admin.fetchrow(
        f'SELECT consensus, votes, n_models, confidence FROM "{schema}".aggregates'
        " WHERE batch_id = 'b1' AND item_id = 'i2'"
    )
    assert dict(row) == {"consensus": None, "votes": 0, "n_models": 0, "confidence": 0.0}


async def test_a_rows_file_short_of_the_summary_rolls_the_whole_commit_back(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    """The agent's summary counts the rows; a CSV holding fewer (truncated, or another
    batch's) writes nothing at all and leaves the batch uncommitted."""
    ledger = await make_ledger(leader=True)
    agg = small_aggregate()
    await seen(ledger, "b1")
    lines = rows_csv(agg.items, "b1").splitlines(keepends=True)
    short = tmp_path / "aggregates.csv"
    short.write_bytes(b"".join(lines[:-1]))  # header and two of the three rows
    with pytest.raises(DatabaseError, match="held 2 rows, the aggregate counted 3"):
        await ledger.commit("b1", summarise(agg), short, fields={})
    assert await count(admin, schema, "aggregates", "b1") == 0
    assert await count(admin, schema, "model_agreement", "b1") == 0
    assert (await ledger.get("b1") or {})["state"] != State.COMMITTED.value
    assert await commit(ledger, "b1", agg, fields={}) is None  # the whole file then commits
    assert await count(admin, schema, "aggregates", "b1") == 3


async def test_a_vanished_rows_file_is_an_agent_error_not_a_database_outage(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    """OSErrors count as the database being down (retried forever); a missing rows file must
    not: it comes back at once as AgentError, with nothing written and the database up."""
    ledger = await make_ledger(leader=True)
    await seen(ledger, "b1")
    with anyio.fail_after(10):
        with pytest.raises(AgentError, match="rows file gone"):
            await ledger.commit(
                "b1", summarise(small_aggregate()), tmp_path / "gone.csv", fields={}
            )
    assert ledger.health.connected
    assert await count(admin, schema, "aggregates", "b1") == 0


def agents_rows(folder: Path, batch_id: str, data: bytes) -> RowsFile:
    """`data` written as an agent writes its rows (folder/batch_id/.aggregates.csv), and the
    RowsFile the pipeline COPYs from it: what the agent reported."""
    (folder / batch_id).mkdir(parents=True, exist_ok=True)
    path = folder / batch_id / ".aggregates.csv"
    path.write_bytes(data)
    return RowsFile(folder, batch_id, path.name, ident_of(path.stat(), data))


async def test_an_agents_rows_file_is_copied_when_it_is_the_one_reported(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    ledger = await make_ledger(leader=True)
    agg = small_aggregate()
    await seen(ledger, "b1")
    rows = agents_rows(tmp_path, "b1", rows_csv(agg.items, "b1"))
    assert await ledger.commit("b1", summarise(agg), rows, fields={}) is None
    assert await count(admin, schema, "aggregates", "b1") == 3


async def test_a_rows_file_rewritten_with_the_same_size_and_mtime_commits_nothing(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    """Only the content hash can tell: the bytes were sent to the COPY before the mismatch
    shows at the end of the file, so the COPY must be aborted and its transaction undone."""
    ledger = await make_ledger(leader=True)
    agg = small_aggregate()
    await seen(ledger, "b1")
    data = rows_csv(agg.items, "b1")
    rows = agents_rows(tmp_path, "b1", data)
    path = tmp_path / "b1" / ".aggregates.csv"
    st = path.stat()
    forged = data.replace(b"cat", b"dog")
    assert forged != data and len(forged) == len(data)
    with path.open("r+b") as f:  # in place: same inode, same size
        f.write(forged)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with anyio.fail_after(20):
        with pytest.raises(
            RowsRefused, match=r"batch b1: rows file .*b1/\.aggregates\.csv: content"
        ):
            await ledger.commit("b1", summarise(agg), rows, fields={})
    assert await count(admin, schema, "aggregates", "b1") == 0
    assert await count(admin, schema, "model_agreement", "b1") == 0
    assert (await ledger.get("b1") or {})["state"] != State.COMMITTED.value
    assert ledger.health.connected  # a refusal is no database outage
    # The connection the COPY was aborted on serves the next commit.
    good = agents_rows(tmp_path, "b1", data)
    assert await ledger.commit("b1", summarise(agg), good, fields={}) is None
    assert await count(admin, schema, "aggregates", "b1") == 3


async def test_a_rows_file_swapped_for_a_link_is_never_opened(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str, tmp_path: Path
) -> None:
    ledger = await make_ledger(leader=True)
    agg = small_aggregate()
    await seen(ledger, "b1")
    data = rows_csv(agg.items, "b1")
    rows = agents_rows(tmp_path / "staging", "b1", data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "rows.csv").write_bytes(data)  # the very bytes: only the link gives it away
    os.utime(outside / "rows.csv", ns=(0, rows.expect.mtime_ns))
    path = tmp_path / "staging" / "b1" / ".aggregates.csv"
    path.unlink()
    os.symlink(outside / "rows.csv", path)
    with Opens(outside) as opens:
        with pytest.raises(RowsRefused, match="symbolic link"):
            await ledger.commit("b1", summarise(agg), rows, fields={})
        assert opens.files() == []  # never opened through the link
    assert await count(admin, schema, "aggregates", "b1") == 0


# --- the leader lock -----------------------------------------------------------------------


async def until(pred: Callable[[], Awaitable[bool]]) -> None:
    """Poll `pred` for up to 10 s: the server releases a dead backend's locks asynchronously."""
    with anyio.fail_after(10):
        while not await pred():  # noqa: ASYNC110 - the change happens in another process
            await anyio.sleep(0.05)


async def lock_holder(
    admin: asyncpg.Connection, schema: str, host: str = socket.gethostname()
) -> int | None:
    """The backend pid holding the leader lock of `host` on the schema, read from pg_locks."""
    classid, objid = lock_ids(lock_key(schema, host))
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
        classid,
        objid,
    )
    return pid


async def test_a_second_ledger_is_not_leader_until_the_first_closes(
    make_ledger: MakeLedger,
) -> None:
    first = await make_ledger(leader=True)
    second = await make_ledger()
    assert not await second.acquire_leadership()
    assert not second.health.leader
    with pytest.raises(NotLeaderError):
        await commit(second, "b1", small_aggregate(), fields={})
    assert await first.acquire_leadership()  # asking again while holding it stays leader

    await first.close()
    assert not first.health.leader
    await until(second.acquire_leadership)
    assert second.health.leader


async def test_the_lock_is_per_schema(make_ledger: MakeLedger, admin: asyncpg.Connection) -> None:
    other = f"t_{uuid.uuid4().hex[:12]}"
    try:
        await make_ledger(leader=True)
        elsewhere = await make_ledger(on_schema=other)
        assert await elsewhere.acquire_leadership()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


async def test_leadership_is_lost_when_the_lock_connection_is_terminated(
    make_ledger: MakeLedger, admin: asyncpg.Connection, schema: str
) -> None:
    leader = await make_ledger(leader=True)
    assert await leader.check_leadership()
    pid = await lock_holder(admin, schema)
    assert pid is not None
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

    assert not await leader.check_leadership()
    assert not leader.health.leader
    await seen(leader, "b1")
    with pytest.raises(NotLeaderError):
        await commit(leader, "b1", small_aggregate(), fields={})

    async def released() -> bool:
        return await lock_holder(admin, schema) is None

    await until(released)
    successor = await make_ledger(leader=True)
    assert successor.health.leader


async def test_check_leadership_is_false_for_a_ledger_that_never_led(
    make_ledger: MakeLedger,
) -> None:
    ledger = await make_ledger()
    assert not await ledger.check_leadership()
