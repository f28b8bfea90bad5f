"""The soak: many batches through the real daemon while a chaos loop kills the daemon and its
agents at random moments and restarts PostgreSQL. At the end the database and the lake must
match what the producer published: nothing lost, nothing duplicated, nothing left behind.

It runs on both lakes: the plain Parquet folders, and the Iceberg tables (docs/lake.md), where
every batch must be in each table exactly once, its aggregates equal to PostgreSQL's row for
row, and what killed attempts left behind is listed by `lake orphans` and removable.

`make test` runs SOAK_BATCHES=50 (the default; the Iceberg run half of it, `batches_for`);
`make soak N=1000` runs the same code longer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agents import slm
from coordinator.daemon import embedded_pg
from tests.conftest import MODELS, Env, wait_until
from tests.system.test_database_faults import count_rows
from tests.system.test_flow import tables

BATCHES = int(os.environ.get("SOAK_BATCHES", "50"))
ROWS = 120


def batches_for(lake_format: str, batches: int) -> int:
    """The Iceberg run has half the batches of the plain one: each of its commits swaps four
    tables, so a batch costs it about three times as long, and the suite's time is bounded.
    Its chaos is the same (every kind of fault, until each has happened)."""
    return batches if lake_format == "parquet" else max(batches // 2, 12)


@pytest.mark.parametrize("lake_format", ["parquet", "iceberg"])
def test_soak_under_chaos_loses_nothing_and_duplicates_nothing(env: Env, daemon, lake_format):
    env.write_config(
        database={"dsn": "", "schema": env.schema, "retry_max_s": 1.0},
        barrier={"reconcile_s": 1.0, "settle_s": 5.0},
        lake={"format": lake_format},
    )
    d = daemon().start()
    dsn = d.status()["database"]["dsn"]
    rng = random.Random(int(os.environ.get("SOAK_SEED", "7")))
    n = batches_for(lake_format, BATCHES)
    ids = [f"soak-{i:05d}" for i in range(n)]
    done_publishing = threading.Event()
    chaos_log: dict[str, int] = {"daemon_kill9": 0, "agent_kill9": 0, "postgres_restart": 0}

    def producer() -> None:
        for i, b in enumerate(ids):
            t = tables(5000 + i, ROWS)
            order = list(MODELS)
            rng_p = random.Random(i)
            rng_p.shuffle(order)
            for m in order:
                slm.publish(env.staging, b, m, t[m])
            time.sleep(rng_p.uniform(0.05, 0.3))
        done_publishing.set()

    pub = threading.Thread(target=producer)
    pub.start()
    actions: list[str] = []
    try:
        while not done_publishing.is_set() or min(chaos_log.values()) == 0:
            time.sleep(rng.uniform(0.5, 1.5))
            if not actions:  # every kind of fault in each round, in a random order
                actions = ["daemon_kill9", "agent_kill9", "postgres_restart"]
                rng.shuffle(actions)
            action = actions.pop()
            if action == "daemon_kill9":
                d.kill9()
                d.start()
            elif action == "agent_kill9":
                try:
                    pid = d.status()["agents"][0].get("pid")
                except Exception:
                    pid = None
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
            else:
                embedded_pg.stop(env.state, mode="immediate")
                time.sleep(rng.uniform(0.0, 1.0))
                embedded_pg.start(env.state)
            chaos_log[action] += 1
    finally:
        pub.join()

    # Calm after the storm: everything published must finish, exactly once.
    def all_final() -> bool:
        states = {b: (d.show(b) or {}).get("state") for b in ids}
        return all(s in ("done", "failed", "degraded") for s in states.values())

    wait_until(all_final, 60 + n * 2.0, "every soak batch to finish")
    states = {b: d.show(b)["state"] for b in ids}
    rows = count_rows(dsn, env.schema)
    lost = [b for b in ids if states[b] != "done" or b not in rows]
    duplicated = [b for b, (n, distinct) in rows.items() if n != distinct or n != ROWS]
    if lake_format == "iceberg":
        lake_bad, temp_in_lake = iceberg_mismatches(env, dsn, ids)
    else:
        lake_files: dict[str, int] = {}
        for p in Path(env.lake).rglob("*"):
            if p.is_file():
                batch = p.parent.name.removeprefix("batch=")
                lake_files[batch] = lake_files.get(batch, 0) + 1
        lake_bad = [b for b in ids if lake_files.get(b) != 2 * len(MODELS) + 1]
        temp_in_lake = list(Path(env.lake).rglob(".*"))
    left_staging = [p.name for p in env.staging.iterdir() if not p.name.startswith(".")]
    left_tmpfs = [p for p in env.tmpfs.rglob("*") if p.is_file()]
    print(
        f"\nsoak: {n} batches, {n * ROWS} rows; chaos {chaos_log}; "
        f"lost {len(lost)}, duplicated {len(duplicated)}, lake mismatches {len(lake_bad)}, "
        f"left in staging {len(left_staging)}, left in tmpfs {len(left_tmpfs)}"
    )
    assert sum(chaos_log.values()) > 0
    assert lost == [], lost
    assert duplicated == [], duplicated
    assert lake_bad == [], lake_bad
    assert temp_in_lake == []
    assert left_staging == []
    assert left_tmpfs == []


def iceberg_mismatches(
    env: Env, dsn: str, ids: list[str], rows: int = ROWS
) -> tuple[list[str], list[str]]:
    """The Iceberg lake against PostgreSQL after the storm: each batch has one snapshot in each
    table, and its aggregates (item, consensus) are PostgreSQL's, row for row; the files the
    killed attempts left are orphans, removed here (afterwards none is left, and the tables
    still read whole). Returns (the batches that differ, the orphans left after removal)."""
    import asyncpg
    import pyarrow.compute as pc

    from coordinator.core.config import load_config
    from coordinator.core.iceberg import TABLES, lake_spec
    from coordinator.ctl import lake as ctl_lake

    spec = lake_spec(load_config(env.config), dsn)
    left = ctl_lake.orphans(spec)
    ctl_lake.remove_orphans(spec, left)
    per_table = {
        t: Counter(s["batch_id"] for s in ctl_lake.snapshots(spec, t) if s["batch_id"])
        for t in TABLES
    }
    cat = ctl_lake.open_catalog(spec)
    try:
        lake = cat.load_table(spec.identifier("aggregates")).scan().to_arrow()
        results = cat.load_table(spec.identifier("results")).scan().to_arrow()
    finally:
        cat.engine.dispose()

    async def pg_rows() -> list[tuple[str, str, str | None]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                f'SELECT batch_id, item_id, consensus FROM "{env.schema}".aggregates'
            )
            return [(r["batch_id"], r["item_id"], r["consensus"]) for r in rows]
        finally:
            await conn.close()

    import anyio

    pg = Counter(anyio.run(pg_rows))
    got = Counter(
        zip(
            lake["batch_id"].to_pylist(),
            lake["item_id"].to_pylist(),
            lake["consensus"].to_pylist(),
            strict=True,
        )
    )
    n_results = Counter(results["batch_id"].to_pylist())
    bad = [
        b
        for b in ids
        if any(per_table[t][b] != 1 for t in TABLES) or n_results[b] != rows * len(MODELS)
    ]
    if got != pg:
        bad.append(f"aggregates differ from PostgreSQL in {len(got - pg) + len(pg - got)} rows")
    assert pc.count_distinct(lake["batch_id"]).as_py() == len(ids)
    return bad, [o.path for o in ctl_lake.orphans(spec)]
