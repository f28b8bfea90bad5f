"""`make demo` on the Iceberg lake (`coordinatorctl demo --lake iceberg`): the batches land in
the four tables, and the two one-line queries it prints are run as a user would paste them:
the pyiceberg line in a shell of its own, the DuckDB query with the iceberg extension (loaded
from its wheel: `INSTALL` needs the network). Both must give each batch's rows and the
confidence PostgreSQL holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.daemon import embedded_pg
from tests.system.test_demo import BATCHES, ROOT, ROWS, coordinatorctl, demo_json, query
from tests.system.test_lake_iceberg import duckdb_con


@pytest.fixture(scope="module")
def iceberg_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str]]:
    state = tmp_path_factory.mktemp("demo-ice") / "state"
    proc, summary = demo_json(state, "--lake", "iceberg")
    assert proc.returncode == 0, proc.stderr
    try:
        dsn, _ = embedded_pg.start(state)
        yield summary, dsn
    finally:
        embedded_pg.stop(state)


def test_the_demo_archives_every_batch_into_the_iceberg_tables(iceberg_demo) -> None:
    summary, _ = iceberg_demo
    assert summary["ok"]
    lake = summary["lake"]
    assert lake["format"] == "iceberg"
    assert sorted(lake["tables"]) == [
        "numa.aggregates",
        "numa.agreement",
        "numa.crosschecks",
        "numa.results",
    ]
    # One data file per table and batch, under the day's partition.
    assert len(lake["files"]) == 4 * BATCHES
    assert all("/data/day=" in f for f in lake["files"])
    for b in summary["batches"]:
        assert b["lake_path"].endswith(".metadata.json")


def test_the_printed_pyiceberg_line_runs_as_pasted_and_counts_every_batch(iceberg_demo) -> None:
    summary, _ = iceberg_demo
    line = summary["lake"]["query_python"]
    assert line.startswith('python -c "')
    code = line.removeprefix('python -c "').removesuffix('"')
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    counts = {d["batch_id"]: d["item_id_count"] for d in ast.literal_eval(r.stdout.strip())}
    assert counts == {b["batch_id"]: ROWS for b in summary["batches"]}


def test_the_printed_duckdb_query_gives_postgresqls_rows_and_confidence(iceberg_demo) -> None:
    summary, dsn = iceberg_demo
    sql = summary["lake"]["query_sql"]
    assert sql.startswith("INSTALL iceberg; LOAD iceberg; ")
    from coordinator.core.iceberg import LakeSpec

    con = duckdb_con(LakeSpec("", "", "numa", "file:///", {}))  # the wheels' extensions
    got = con.execute(sql.removeprefix("INSTALL iceberg; LOAD iceberg; ")).fetchall()
    pg = query(
        dsn,
        "SELECT batch_id, count(*) AS n, avg(confidence) AS c FROM numa_coordinator.aggregates"
        " GROUP BY batch_id ORDER BY 1",
    )
    assert [(b, n) for b, n, _ in got] == [(r["batch_id"], r["n"]) for r in pg]
    for (_, _, c), r in zip(got, pg, strict=True):
        assert c == pytest.approx(r["c"], rel=1e-12)


def test_the_text_summary_prints_both_queries() -> None:
    proc = coordinatorctl("demo", "--lake", "iceberg", "--batches", "1", "--rows", "50")
    assert proc.returncode == 0, proc.stderr
    assert "read it with pyiceberg:  python -c" in proc.stdout
    assert "or in DuckDB:            INSTALL iceberg; LOAD iceberg; SELECT" in proc.stdout
    assert "lake: Iceberg tables numa.results" in proc.stdout
