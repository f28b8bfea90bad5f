"""The Iceberg lake's commit against a real PostgreSQL, step by step: the agent's prepare
(`agents.iceberg.prepare_batch`) and the ledger's `commit_archive`, which swaps the four
tables' catalog rows and marks the batch archived in one transaction (docs/lake.md). What the
daemon-level crash tests cannot reach directly: a table moved by another writer between the
prepare and the commit, a retry against tables that already hold the batch, a commit of a
batch that is archived already."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.iceberg import BatchRows, prepare_batch, rows_for
from coordinator.core.batch import State
from coordinator.core.iceberg import (
    TABLES,
    LakeSpec,
    catalog_schema,
    ensure_tables,
    open_catalog,
    sqlalchemy_url,
)
from coordinator.core.summary import AggregateSummary, PairAgreement
from coordinator.daemon.ledger import Ledger

pytestmark = pytest.mark.anyio

DAY = "2024-05-01"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def lake(
    pg_dsn: str, schema: str, admin: asyncpg.Connection, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[tuple[Ledger, LakeSpec]]:
    """A leader ledger on the test's schema and an Iceberg lake next to it (its tables made)."""
    spec = LakeSpec(
        sqlalchemy_url(pg_dsn, catalog_schema(schema)),
        catalog_schema(schema),
        "numa",
        f"file://{tmp_path / 'lake'}",
        {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"},
    )
    ledger = Ledger(pg_dsn, schema, retry_max_s=0.5)
    await ledger.connect()
    assert await ledger.acquire_leadership()
    await anyio.to_thread.run_sync(ensure_tables, spec)
    try:
        yield ledger, spec
    finally:
        await ledger.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{spec.schema}" CASCADE')


async def committed(ledger: Ledger, admin: asyncpg.Connection, schema: str, batch: str) -> None:
    now = dt.datetime.now(dt.UTC)
    await ledger.record_seen(
        batch, models_present=["m1"], models_missing=[], first_seen=now, deadline_at=now
    )
    await admin.execute(
        f"UPDATE \"{schema}\".batches SET state = 'committed' WHERE batch_id = $1", batch
    )


def batch_rows(tmp_path: Path, batch: str, attempt: int = 0) -> BatchRows:
    """The four tables' rows of a one-model batch of two items, from files like the agent's."""
    d = tmp_path / f"src-{batch}-{attempt}"
    d.mkdir()
    pq.write_table(
        pa.table({"item_id": ["a", "b"], "prediction": ["x", "y"], "score": [0.1, 0.2]}),
        d / "m1.parquet",
    )
    pq.write_table(
        pa.table({"item_id": ["a", "b"], "prediction": ["x", "y"], "n_agree": [1, 0]}),
        d / "crosscheck_m1.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_id": ["a", "b"],
                "consensus": ["x", None],
                "votes": pa.array([1, 0], pa.int32()),
                "n_models": pa.array([1, 1], pa.int32()),
                "confidence": [1.0, 0.0],
            }
        ),
        d / "aggregates.parquet",
    )
    fds = {p.name: os.open(p, os.O_RDONLY) for p in d.iterdir()}
    try:
        summary = AggregateSummary(
            rows=2,
            agreement=(PairAgreement("m1", "m2", 0.5, 2),),
            fleiss_kappa=0.25,
            consensus_agreement={},
            models=("m1",),
        )
        return rows_for(batch, DAY, ["m1"], fds, summary)
    finally:
        for fd in fds.values():
            os.close(fd)


def catalog_rows(spec: LakeSpec) -> dict[str, str]:
    cat = open_catalog(spec)
    try:
        return {t: str(cat.load_table(spec.identifier(t)).metadata_location) for t in TABLES}
    finally:
        cat.engine.dispose()


def lake_counts(spec: LakeSpec) -> dict[str, dict[str, int]]:
    """table -> batch -> rows, read with pyiceberg from the catalog."""
    cat = open_catalog(spec)
    try:
        out: dict[str, dict[str, int]] = {}
        for t in TABLES:
            ids = cat.load_table(spec.identifier(t)).scan().to_arrow()["batch_id"].to_pylist()
            out[t] = {b: ids.count(b) for b in set(ids)}
        return out
    finally:
        cat.engine.dispose()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


async def archive(ledger: Ledger, spec: LakeSpec, batch: str, commits: Any) -> bool:
    return await ledger.commit_archive(
        batch,
        catalog_schema=spec.schema,
        namespace=spec.namespace,
        commits=dict(commits),
        lake_path=commits["aggregates"][1],
        timings={"archive_ms": 1.0},
    )


async def test_the_swap_of_every_table_and_the_ledgers_archived_are_one_step(
    lake, admin, schema, tmp_path
) -> None:
    ledger, spec = lake
    await committed(ledger, admin, schema, "b1")
    bases = await ledger.lake_locations(spec.schema, spec.namespace)
    assert bases == catalog_rows(spec)
    prepared = prepare_batch("b1", DAY, "numa", bases, batch_rows(tmp_path, "b1"), {})
    # Prepared, not committed: the catalog still names the old metadata, nobody sees the batch.
    assert catalog_rows(spec) == bases
    assert lake_counts(spec) == {t: {} for t in TABLES}
    assert await archive(ledger, spec, "b1", prepared)
    assert catalog_rows(spec) == {t: new for t, (_, new) in prepared.items()}
    row = await ledger.get("b1")
    assert row is not None and row["state"] == State.ARCHIVED.value
    assert row["lake_path"] == prepared["aggregates"][1]
    assert lake_counts(spec) == {
        "results": {"b1": 2},
        "crosschecks": {"b1": 2},
        "aggregates": {"b1": 2},
        "agreement": {"b1": 1},
    }


async def test_a_table_moved_by_another_writer_commits_nothing_and_a_new_prepare_lands_once(
    lake, admin, schema, tmp_path
) -> None:
    ledger, spec = lake
    await committed(ledger, admin, schema, "b1")
    await committed(ledger, admin, schema, "b2")
    bases = await ledger.lake_locations(spec.schema, spec.namespace)
    first = prepare_batch("b1", DAY, "numa", bases, batch_rows(tmp_path, "b1"), {})
    # Another writer commits b2 from the same bases first: every table moves.
    other = prepare_batch("b2", DAY, "numa", bases, batch_rows(tmp_path, "b2"), {})
    assert await archive(ledger, spec, "b2", other)
    before = catalog_rows(spec)
    assert not await archive(ledger, spec, "b1", first)  # the compare-and-set fails
    assert catalog_rows(spec) == before
    row = await ledger.get("b1")
    assert row is not None and row["state"] == State.COMMITTED.value and row["lake_path"] is None
    # The retry prepares from where the tables are now, and lands once.
    now = await ledger.lake_locations(spec.schema, spec.namespace)
    again = prepare_batch("b1", DAY, "numa", now, batch_rows(tmp_path, "b1", 1), {})
    assert await archive(ledger, spec, "b1", again)
    counts = lake_counts(spec)
    assert counts["aggregates"] == {"b1": 2, "b2": 2}
    assert counts["results"] == {"b1": 2, "b2": 2}


async def test_a_prepare_against_tables_that_hold_the_batch_writes_nothing(
    lake, admin, schema, tmp_path
) -> None:
    ledger, spec = lake
    await committed(ledger, admin, schema, "b1")
    bases = await ledger.lake_locations(spec.schema, spec.namespace)
    assert await archive(
        ledger, spec, "b1", prepare_batch("b1", DAY, "numa", bases, batch_rows(tmp_path, "b1"), {})
    )
    now = await ledger.lake_locations(spec.schema, spec.namespace)
    written = files_under(tmp_path / "lake")
    again = prepare_batch("b1", DAY, "numa", now, batch_rows(tmp_path, "b1", 1), {})
    assert dict(again) == {t: (now[t], "") for t in TABLES}
    assert again.bytes == 0
    assert files_under(tmp_path / "lake") == written


async def test_a_commit_of_an_archived_batch_touches_no_table(
    lake, admin, schema, tmp_path
) -> None:
    ledger, spec = lake
    await committed(ledger, admin, schema, "b1")
    bases = await ledger.lake_locations(spec.schema, spec.namespace)
    assert await archive(
        ledger, spec, "b1", prepare_batch("b1", DAY, "numa", bases, batch_rows(tmp_path, "b1"), {})
    )
    now = await ledger.lake_locations(spec.schema, spec.namespace)
    # A stale second attempt (as if prepared again from these tables): the batch is archived,
    # so its commit must move no table.
    stale = {t: (now[t], now[t].replace(".metadata.json", "-stale.metadata.json")) for t in TABLES}
    assert not await archive(ledger, spec, "b1", stale)
    assert catalog_rows(spec) == now
