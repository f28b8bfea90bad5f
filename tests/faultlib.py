"""Helpers of the fault-injection suite (tests/system/test_faults.py): publishing with known bytes,
reading PostgreSQL, and the one check every fault ends with — the batch landed exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from agents import slm
from coordinator.core import files
from tests.conftest import MODELS, Env, wait_until

ROWS = 200
HOOKS_ENV = "NUMA_COORDINATOR_TEST_HOOKS"
FINAL = {"done", "degraded", "failed"}


def hooks(**kw: Any) -> dict[str, str]:
    """extra_env for a Daemon that turns on fault-injection hooks (daemon and its agents)."""
    return {HOOKS_ENV: json.dumps(kw)}


def tables(seed: int, rows: int = ROWS) -> dict[str, pa.Table]:
    from coordinator.ctl.demo import synthetic_batch

    return synthetic_batch(rows, seed)[1]


def parquet_bytes(table: pa.Table) -> bytes:
    """The bytes a producer without the SDK writes for `table` (the SDK's options, zstd level
    3, and no `numa_coordinator.encode_cpu_s` entry): the same bytes for the same table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **slm.write_options(table))
    return buf.getvalue()


@contextlib.contextmanager
def sdk_writes() -> Iterator[list[bytes]]:
    """The bytes of every file the SDK writes in this process inside the block, in order.
    (Its footer records the writer's CPU seconds, so two writes of one table differ in those
    bytes: what was published is known only from the write itself.)"""
    real = files.write_table
    written: list[bytes] = []

    def tee(table: pa.Table, where: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real(table, buf, **kwargs)
        written.append(buf.getvalue())
        where.write(written[-1])

    files.write_table = tee
    try:
        yield written
    finally:
        files.write_table = real


def sdk_publish(staging: Path, batch_id: str, model: str, table: pa.Table, **kw: Any) -> bytes:
    """slm.publish; return the bytes it wrote (the file itself may be moved away by the
    daemon at once)."""
    with sdk_writes() as written:
        slm.publish(staging, batch_id, model, table, **kw)
    [data] = written
    return data


def publish(env: Env, batch_id: str, model: str, table: pa.Table) -> bytes:
    """Publish one result with the SDK into the env's staging; return the bytes it wrote."""
    return sdk_publish(env.staging, batch_id, model, table)


def publish_all(
    env: Env, batch_id: str, seed: int, models: list[str] = MODELS, rows: int = ROWS
) -> dict[str, bytes]:
    """Publish `models` of a synthetic batch in a shuffled order; return {model: bytes}."""
    t = tables(seed, rows)
    order = list(models)
    random.Random(seed).shuffle(order)
    return {m: publish(env, batch_id, m, t[m]) for m in order}


def place(path: Path, data: bytes) -> None:
    """Put `data` under its final name atomically (dot-temp + rename), whatever its content."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def db_rows(env: Env, sql: str, *args: object) -> list[dict[str, Any]]:
    """Run one query against the test's PostgreSQL; `{s}` in `sql` is the test's schema."""

    async def q() -> list[dict[str, Any]]:
        conn = await env.db()
        try:
            return [dict(r) for r in await conn.fetch(sql.format(s=f'"{env.schema}"'), *args)]
        finally:
            await conn.close()

    return asyncio.run(q())


def ledger(env: Env, batch_id: str) -> dict[str, Any] | None:
    """The batch's ledger row read straight from PostgreSQL (works with no daemon running)."""
    rows = db_rows(env, "SELECT * FROM {s}.batches WHERE batch_id = $1", batch_id)
    return rows[0] if rows else None


def ledger_ids(env: Env) -> set[str]:
    return {r["batch_id"] for r in db_rows(env, "SELECT batch_id FROM {s}.batches")}


def row_counts(env: Env, batch_id: str) -> tuple[int, int, int, int]:
    """(aggregate rows, distinct item_ids, agreement rows, distinct agreement pairs)."""
    a = db_rows(
        env,
        "SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM {s}.aggregates"
        " WHERE batch_id = $1",
        batch_id,
    )[0]
    p = db_rows(
        env,
        "SELECT count(*) AS n, count(DISTINCT (model_a, model_b)) AS d"
        " FROM {s}.model_agreement WHERE batch_id = $1",
        batch_id,
    )[0]
    return a["n"], a["d"], p["n"], p["d"]


def lake_dirs(env: Env, batch_id: str) -> list[Path]:
    """Every lake folder of a batch (exactly one when it was archived once)."""
    base = env.lake / "batches"
    return sorted(base.glob(f"date=*/batch={batch_id}")) if base.is_dir() else []


def files_under(path: Path) -> list[Path]:
    """Every non-directory entry below `path` (symlinks included), recursively."""
    if not path.exists():
        return []
    return sorted(p for p in path.rglob("*") if p.is_symlink() or not p.is_dir())


def expected_lake(models: list[str]) -> list[str]:
    return sorted(
        [f"{m}.parquet" for m in models]
        + [f"crosscheck_{m}.parquet" for m in models]
        + ["aggregates.parquet"]
    )


def assert_exactly_once(
    env: Env,
    batch_id: str,
    *,
    rows: int = ROWS,
    models: list[str] = MODELS,
    state: str = "done",
    published: dict[str, bytes] | None = None,
    tmpfs: Path | None = None,
) -> Path:
    """The batch is `state` in the ledger, its rows are in PostgreSQL once, its files are in
    the lake once (with the published bytes), and nothing of it is left in staging or tmpfs."""
    row = ledger(env, batch_id)
    assert row is not None, f"{batch_id}: no ledger row"
    assert row["state"] == state, (row["state"], row["error"])
    assert row["rows"] == rows
    n_pairs = len(models) * (len(models) - 1) // 2
    assert row_counts(env, batch_id) == (rows, rows, n_pairs, n_pairs)
    dirs = lake_dirs(env, batch_id)
    assert len(dirs) == 1, f"{batch_id}: lake folders {dirs}"
    [lake] = dirs
    assert str(lake) == row["lake_path"]
    assert sorted(p.name for p in files_under(lake)) == expected_lake(models)
    assert pq.read_table(lake / "aggregates.parquet").num_rows == rows
    for m, data in (published or {}).items():
        assert (lake / f"{m}.parquet").read_bytes() == data, f"{batch_id}: lake {m} differs"
    assert not (env.staging / batch_id).exists(), sorted(os.listdir(env.staging / batch_id))
    assert not ((tmpfs or env.tmpfs) / "node0" / batch_id).exists()
    return lake


def staging_leftovers(env: Env) -> list[str]:
    """Names in staging other than the quarantine folder."""
    return sorted(n for n in os.listdir(env.staging) if n != ".quarantine")


def quarantined(env: Env, batch_id: str) -> dict[str, tuple[bytes, str]]:
    """{quarantined file name: (its bytes, its reason)} for one batch."""
    folder = env.staging / ".quarantine" / batch_id
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.endswith(".reason"):
            continue
        reason_file = p.with_name(p.name + ".reason")
        reason = reason_file.read_text().strip() if reason_file.exists() else ""
        out[p.name] = (p.read_bytes(), reason)
    return out


def looked_again(d: Any, batch_id: str, times: int = 2, timeout: float = 20.0) -> None:
    """Wait until the daemon has looked at the batch's folder `times` more times, each look
    whole: the last of them began after this call, so it saw whatever was done before it."""

    def looks() -> int:
        # Not in flight yet (its folder not adopted): no look has begun, so none before this call.
        b = next((b for b in d.status()["batches"] if b["batch_id"] == batch_id), None)
        return 0 if b is None else int(b["looks"])

    start = looks()
    wait_until(lambda: looks() >= start + times, timeout, f"{times} more looks at {batch_id}")


def reconciled(d: Any, times: int = 2, timeout: float = 20.0) -> None:
    """Wait until `times` more reconciliation passes over all of staging have completed: the
    last one began after this call."""
    start = d.status()["watcher"]["reconciled"]
    wait_until(
        lambda: d.status()["watcher"]["reconciled"] >= start + times,
        timeout,
        f"{times} reconciliation passes",
    )
