"""The lake as Apache Iceberg tables (docs/lake.md), with a real daemon, real agents and the
embedded PostgreSQL: every batch is in every table exactly once, committed in the same
transaction that marks it archived, whatever process is killed -9 wherever between the data
files, the metadata files and that commit. Read back by two readers independent of the writer:
pyiceberg's scan and DuckDB's iceberg_scan (the avro and iceberg extensions loaded from their
wheels), both against PostgreSQL's own rows."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pytest

from coordinator.core.config import load_config
from coordinator.core.iceberg import TABLES, LakeSpec, lake_spec
from coordinator.ctl import lake as ctl_lake
from tests.conftest import MODELS, Env, wait_until
from tests.faultlib import FINAL, ROWS, db_rows, hooks, ledger, publish_all
from tests.system.test_lake_s3 import HOST, REGION, Moto, bucket, moto

__all__ = ["bucket", "moto"]  # the moto server's fixtures, used here by name

N_PAIRS = len(MODELS) * (len(MODELS) - 1) // 2


def spec_of(env: Env) -> LakeSpec:
    return lake_spec(load_config(env.config), env.dsn)


@pytest.fixture(params=["local", "s3"])
def iceberg(request: pytest.FixtureRequest, env: Env) -> Env:
    """The test's config with an Iceberg lake: a local warehouse, or s3:// on a moto server
    (the file runs on both, but for the coordinator's crash points: COORDINATOR_SIDE)."""
    if request.param == "s3":
        server: Moto = request.getfixturevalue("moto")
        name = request.getfixturevalue("bucket")
        uri = f"s3://{name}/lake?endpoint_override={HOST}:{server.port}&scheme=http&region={REGION}"
        # The keys from the file the config names, none in the environment: every writer and
        # reader (daemon, agents, coordinatorctl) must take them from there.
        keys = env.root / "s3.keys"
        keys.write_text("access_key_id = testing\nsecret_access_key = testing\n")
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        env.write_config(
            paths={"lake": uri}, lake={"format": "iceberg", "credentials_file": str(keys)}
        )
    else:
        env.write_config(lake={"format": "iceberg"})
    return env


def duckdb_con(spec: LakeSpec) -> Any:
    """DuckDB with its avro and iceberg extensions (httpfs too, and an S3 secret for the
    moto server, on an s3:// lake), loaded from their wheels: no download."""
    import duckdb
    import duckdb_ext  # type: ignore[import-not-found]  # the extension wheels' folder

    root = Path(next(iter(duckdb_ext.__path__))) / "extensions" / f"v{duckdb.__version__}"
    [base] = [p.parent for p in root.glob("*/iceberg.duckdb_extension")]  # this platform's
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{base / 'avro.duckdb_extension'}'")
    con.execute(f"LOAD '{base / 'iceberg.duckdb_extension'}'")
    if spec.warehouse.startswith("s3://"):
        con.execute(f"LOAD '{base / 'httpfs.duckdb_extension'}'")
        endpoint = spec.io_properties["s3.endpoint"].removeprefix("http://")
        con.execute(
            "CREATE SECRET moto (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION "
            f"'{REGION}', ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false)"
        )
    return con


def pyiceberg_rows(spec: LakeSpec, table: str, batch_id: str) -> pa.Table:
    from pyiceberg.expressions import EqualTo

    cat = ctl_lake.open_catalog(spec)
    try:
        t = cat.load_table(spec.identifier(table))
        return t.scan(row_filter=EqualTo("batch_id", batch_id)).to_arrow()
    finally:
        cat.engine.dispose()


def metadata_of(spec: LakeSpec, table: str) -> str:
    cat = ctl_lake.open_catalog(spec)
    try:
        return str(cat.load_table(spec.identifier(table)).metadata_location)
    finally:
        cat.engine.dispose()


def snapshots_of(spec: LakeSpec, table: str, batch_id: str) -> int:
    return sum(1 for s in ctl_lake.snapshots(spec, table) if s["batch_id"] == batch_id)


def assert_in_lake_once(env: Env, batch_id: str, *, rows: int = ROWS) -> None:
    """The batch is done; each table holds one snapshot of it and its rows once; pyiceberg and
    DuckDB read the same counts, and the consensus of every item equals PostgreSQL's."""
    row = ledger(env, batch_id)
    assert row is not None and row["state"] == "done", row
    spec = spec_of(env)
    expected = {
        "results": rows * len(MODELS),
        "crosschecks": rows * len(MODELS),
        "aggregates": rows,
        "agreement": N_PAIRS,
    }
    con = duckdb_con(spec)
    for table in TABLES:
        assert snapshots_of(spec, table, batch_id) == 1, (table, batch_id)
        got = pyiceberg_rows(spec, table, batch_id)
        assert got.num_rows == expected[table], (table, batch_id, got.num_rows)
        n = con.execute(
            f"SELECT count(*) FROM iceberg_scan('{metadata_of(spec, table)}') WHERE batch_id = ?",
            [batch_id],
        ).fetchone()[0]
        assert n == expected[table], ("duckdb", table, batch_id, n)
    pg = {
        r["item_id"]: r["consensus"]
        for r in db_rows(
            env, "SELECT item_id, consensus FROM {s}.aggregates WHERE batch_id = $1", batch_id
        )
    }
    assert len(pg) == rows
    lake = pyiceberg_rows(spec, "aggregates", batch_id)
    assert dict(zip(lake["item_id"].to_pylist(), lake["consensus"].to_pylist(), strict=True)) == pg
    duck = con.execute(
        f"SELECT item_id, consensus FROM iceberg_scan('{metadata_of(spec, 'aggregates')}')"
        " WHERE batch_id = ?",
        [batch_id],
    ).fetchall()
    assert dict(duck) == pg
    assert row["lake_path"].endswith(".metadata.json")
    assert not (env.staging / batch_id).exists()


def test_batches_are_committed_into_the_tables_once_and_read_back_alike(iceberg, daemon, request):
    d = daemon().start()
    # An all-numeric batch id stays a string in every reader.
    ids = ["20240501", "ice-b"]
    for i, bid in enumerate(ids):
        publish_all(iceberg, bid, seed=3100 + i)
    for bid in ids:
        assert d.wait_state(bid, FINAL)["state"] == "done"
    for bid in ids:
        assert_in_lake_once(iceberg, bid)
    spec = spec_of(iceberg)
    con = duckdb_con(spec)
    typ = con.execute(
        f"SELECT DISTINCT typeof(batch_id) FROM iceberg_scan('{metadata_of(spec, 'aggregates')}')"
    ).fetchall()
    assert typ == [("VARCHAR",)]
    assert ctl_lake.orphans(spec) == []
    if spec.warehouse.startswith("s3://"):
        # Object storage without rename: every data file was one conditional PUT of its
        # final key (If-None-Match: *), and nothing was copied (pyarrow's move) anywhere.
        server: Moto = request.getfixturevalue("moto")
        recording = server.recording()
        data_puts = [
            r
            for r in recording
            if r["method"] == "PUT" and "/data/day=" in unquote(r["url"]) and ".parquet" in r["url"]
        ]
        assert len(data_puts) == len(ids) * len(TABLES)
        for r in data_puts:
            headers = {k.lower(): v for k, v in r["headers"].items()}
            assert headers.get("if-none-match") == "*", r["url"]
            assert "x-amz-copy-source" not in headers
        assert not any("x-amz-copy-source" in {k.lower() for k in r["headers"]} for r in recording)


# -- kill -9 at every point between the files and the commit -----------------------------------

# The coordinator's crash points run on the local warehouse only. The coordinator writes nothing
# to the warehouse: its commit is the catalog rows' compare-and-set and the ledger row, one
# PostgreSQL transaction, whatever the warehouse. What an s3:// warehouse holds after a crash
# there is what the agent-side crash points below leave on s3 (they run on both): after
# `lake_prepared` or inside the transaction, one attempt's data and metadata files in every
# table, nothing committed, as after `iceberg_metadata`; after `archived`, the committed batch,
# as in the s3 round trip above (a resume from `archived` only cleans up staging). The retry
# that prepares again beside the stale files, and the orphans' listing and removal on s3, are
# proven there.
COORDINATOR_SIDE = pytest.mark.parametrize("iceberg", ["local"], indirect=True)


@pytest.mark.parametrize("point", ["lake_prepared", "archived"])
@COORDINATOR_SIDE
def test_coordinator_killed_around_the_lake_commit_lands_the_batch_once(iceberg, daemon, point):
    d = daemon(extra_env=hooks(crash_at=point)).start()
    bid = f"ice-{point.replace('_', '-')}"
    publish_all(iceberg, bid, seed=3200 + len(point))
    assert d.proc.wait(60) == -signal.SIGKILL, d.tail()
    state = ledger(iceberg, bid)["state"]
    spec = spec_of(iceberg)
    if point == "lake_prepared":
        # Files written, nothing committed: neither the ledger nor any table has the batch.
        assert state == "committed"
        assert all(snapshots_of(spec, t, bid) == 0 for t in TABLES)
        left = ctl_lake.orphans(spec)
        assert {o.table.split(".")[1] for o in left} == set(TABLES)
    else:
        assert state == "archived"
        assert all(snapshots_of(spec, t, bid) == 1 for t in TABLES)
    d2 = daemon().start()
    assert d2.wait_state(bid, FINAL)["state"] == "done"
    assert_in_lake_once(iceberg, bid)
    left = ctl_lake.orphans(spec)
    if point == "lake_prepared":
        assert left, "the first attempt's files are orphans"
        assert ctl_lake.remove_orphans(spec, left) == len(left)
    assert ctl_lake.orphans(spec) == []
    assert_in_lake_once(iceberg, bid)


@COORDINATOR_SIDE
def test_coordinator_killed_inside_the_commit_transaction_commits_neither(iceberg, daemon):
    d = daemon(extra_env=hooks(lake_commit_pause_s=30)).start()
    bid = "ice-in-tx"
    publish_all(iceberg, bid, seed=3301)
    wait_until(lambda: "pausing at lake_commit" in d.log.read_text(), 60, "the commit's pause")
    # The catalog rows are updated, uncommitted, the ledger row not yet: kill -9 here.
    d.kill9()
    spec = spec_of(iceberg)
    wait_until(lambda: ledger(iceberg, bid)["state"] == "committed", 30, "the rollback")
    assert all(snapshots_of(spec, t, bid) == 0 for t in TABLES)
    d2 = daemon().start()
    assert d2.wait_state(bid, FINAL)["state"] == "done"
    assert_in_lake_once(iceberg, bid)


@pytest.mark.parametrize("point", ["iceberg_data", "iceberg_metadata"])
def test_agent_killed_between_its_files_is_restarted_and_the_batch_lands_once(
    iceberg, daemon, point
):
    # The agent holds at the point until the gate file appears; the restarted agent inherits
    # the hooks and finds the gate there, so it passes at once (a plain delay would hold it
    # at every table's data file again).
    gate = iceberg.root / "gate"
    pause = {f"{point}_pause_s": 60, f"{point}_pause_until": str(gate)}
    d = daemon(extra_env=hooks(**pause)).start()
    bid = f"ice-{point.replace('_', '-')}"
    publish_all(iceberg, bid, seed=3400 + len(point))
    [agent] = d.status()["agents"]
    wait_until(lambda: f"pausing at {point}" in d.log.read_text(), 60, f"the agent at {point}")
    os.kill(agent["pid"], signal.SIGKILL)
    gate.touch()
    assert d.wait_state(bid, FINAL, timeout=120)["state"] == "done"
    assert d.status()["agents"][0]["restarts"] >= 1  # the supervisor restarted it
    assert_in_lake_once(iceberg, bid)
    spec = spec_of(iceberg)
    left = ctl_lake.orphans(spec)
    # Killed at the first table's data file, or with every table's files written (what a
    # coordinator killed before its commit leaves too).
    killed_in = {TABLES[0]} if point == "iceberg_data" else set(TABLES)
    assert {o.table.split(".")[1] for o in left} == killed_in, left
    assert ctl_lake.remove_orphans(spec, left) == len(left)
    assert ctl_lake.orphans(spec) == []
    assert_in_lake_once(iceberg, bid)


def lake_ctl(env: Env, *argv: str) -> Any:
    """`coordinatorctl lake --json ...` as a user runs it (a process of its own); its JSON."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.ctl",
            "lake",
            "--config",
            str(env.config),
            "--dsn",
            env.dsn,
            "--json",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lake_commands_list_expire_compact_and_clean_and_every_batch_stays_once(iceberg, daemon):
    d = daemon().start()
    ids = ["ice-m1", "ice-m2", "ice-m3"]
    for i, bid in enumerate(ids):
        publish_all(iceberg, bid, seed=3500 + i)
        assert d.wait_state(bid, FINAL)["state"] == "done"
    spec = spec_of(iceberg)
    day = ledger(iceberg, ids[0])["first_seen"].astimezone(dt.UTC).date().isoformat()
    before = lake_ctl(iceberg, "tables")
    assert {t["table"]: t["data_files"] for t in before} == {spec.identifier(t): 3 for t in TABLES}
    assert {t["table"]: t["rows"] for t in before}[spec.identifier("aggregates")] == 3 * ROWS
    snaps = lake_ctl(iceberg, "snapshots", "aggregates")
    assert [s["batch_id"] for s in snaps] == ids
    assert lake_ctl(iceberg, "compact", "--day", day) == {t: [3, 1] for t in TABLES}
    for bid in ids:
        for table in TABLES:
            assert pyiceberg_rows(spec, table, bid).num_rows > 0
    # Nothing is older than an hour: nothing expires, and the superseded files are too young
    # for the default --min-age-s.
    assert lake_ctl(iceberg, "expire", "--older-than", "1h") == dict.fromkeys(TABLES, 0)
    assert lake_ctl(iceberg, "orphans")["orphans"] == []
    time.sleep(1.1)  # the snapshots' times are in milliseconds: make them all older than 1 s
    # Three appends, and the compaction's overwrite (a delete and an append): all but the
    # current one expire.
    assert lake_ctl(iceberg, "expire", "--older-than", "1s") == dict.fromkeys(TABLES, 4)
    left = lake_ctl(iceberg, "orphans", "--min-age-s", "0", "--delete")
    assert left["orphans"] and left["deleted"] == len(left["orphans"])
    assert lake_ctl(iceberg, "orphans", "--min-age-s", "0")["orphans"] == []
    for bid in ids:
        assert pyiceberg_rows(spec, "aggregates", bid).num_rows == ROWS
        assert pyiceberg_rows(spec, "results", bid).num_rows == ROWS * len(MODELS)
    con = duckdb_con(spec)
    n = con.execute(
        f"SELECT count(*) FROM iceberg_scan('{metadata_of(spec, 'aggregates')}')"
    ).fetchone()[0]
    assert n == 3 * ROWS


def test_lake_commands_refuse_a_parquet_lake_naming_the_key(env):
    r = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "lake", "--config", str(env.config), "tables"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 1
    assert "lake.format is 'parquet'" in r.stderr
