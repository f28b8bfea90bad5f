"""The aggregation step, run by one staging agent for the whole batch.

Reads the batch's cross-check results (the second barrier's files in staging: only the three
columns the vote needs), aggregates them (`coordinator.aggregate`), and writes the rows into the
agent's node-local folder of the batch: `aggregates.csv` (what the coordinator COPYs into
PostgreSQL) and `aggregates.parquet` (what it archives). Both are written under a dot-temp name
and renamed when complete, so a killed agent never leaves a file that looks whole.

The coordinator only gets the summary back (agreement, kappa, a row count), so the two million
items of a batch are decoded, voted on and encoded in one process bound to one node, and the
coordinator's event loop and CPU stay free for coordinating.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from agents import slm
from coordinator.aggregate import aggregate
from coordinator.errors import NoSpaceError
from coordinator.summary import CSV_NAME, PARQUET_NAME, AggregateFiles, rows_csv, summarise

__all__ = ["AGGREGATE_COLUMNS", "aggregate_batch"]

AGGREGATE_COLUMNS = ("item_id", "prediction", "score")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def aggregate_batch(
    staging: Path,
    local: Path,
    batch_id: str,
    models: list[str],
    node: int,
    *,
    compression: str = "zstd",
    level: int | None = 3,
) -> AggregateFiles:
    """Aggregate `models`' cross-check files in `staging/<batch_id>` into `local`.

    Raises ParquetError naming the model and column when a result cannot be aggregated
    (a missing column, a duplicate item id), NoSpaceError when the node's tmpfs is full.
    """
    slm.check_name("batch_id", batch_id)
    for m in models:
        slm.check_name("model", m)
    t0 = time.perf_counter()
    tables = slm.read_results(
        staging / batch_id, models, prefix="crosscheck_", columns=AGGREGATE_COLUMNS
    )
    agg = aggregate(tables)
    del tables
    local.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = local / CSV_NAME, local / PARQUET_NAME
    try:
        _write_atomic(csv_path, rows_csv(agg.items, batch_id))
        slm.write_parquet_atomic(parquet_path, agg.items, compression=compression, level=level)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpaceError(f"{local}: no space left for the batch's aggregates") from e
        raise
    return AggregateFiles(
        summary=summarise(agg),
        node=node,
        rows_csv=csv_path,
        parquet=parquet_path,
        seconds=time.perf_counter() - t0,
    )
