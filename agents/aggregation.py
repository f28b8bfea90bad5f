"""The aggregation step, run by one staging agent for the whole batch.

Copies the batch's cross-check results (the second barrier's files in staging) into the
agent's node-local folder of the batch, reads those copies (only the three columns the vote
needs), aggregates them (`agents.consensus`), and writes the rows there too:
`aggregates.csv` (what the coordinator COPYs into PostgreSQL) and `aggregates.parquet` (what
the archive takes to the lake, with the copies). Each is written under a dot-temp name and
renamed when complete, so a killed agent never leaves a file that looks whole.

The coordinator only gets the summary back (agreement, kappa, a row count), so the two million
items of a batch are decoded, voted on and encoded in one process bound to one node, and the
coordinator's event loop and CPU stay free for coordinating.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from agents.consensus import BatchAggregate, aggregate
from agents.staging import copy_file
from coordinator.core import files
from coordinator.core.errors import NoSpaceError, ParquetError
from coordinator.core.roots import Dir
from coordinator.core.rowsfile import RowsIdent, ident_of
from coordinator.core.summary import PARQUET_NAME, AggregateFiles, AggregateSummary, rows_name

__all__ = ["AGGREGATE_COLUMNS", "aggregate_batch"]

AGGREGATE_COLUMNS = ("item_id", "prediction", "score")


def _write_atomic(folder: Dir, name: str, data: bytes) -> RowsIdent:
    """Write `data` as `folder/name` (a dot-temp renamed into place); return what was written,
    as the coordinator checks it before its COPY."""
    tmp = f".{name}.tmp"
    try:
        fd = folder.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            st = os.fstat(f.fileno())
        folder.rename(tmp, folder, name)
    except BaseException:
        folder.unlink(tmp, missing_ok=True)
        raise
    return ident_of(st, data)


def aggregate_batch(
    staging: Dir,
    local: Dir,
    local_path: Path,
    batch_id: str,
    models: list[str],
    node: int,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    compression: str = "zstd",
    level: int | None = 3,
    rows_via: str = "tmpfs",
) -> AggregateFiles:
    """Aggregate `models`' cross-check files of the batch folder `staging` into `local` (the
    batch's node-local folder, at `local_path`). The rows CSV goes into `local` too, or, with
    `rows_via` "staging" (an agent in another kernel than the coordinator), into the batch's
    staging folder as `.aggregates.csv`.

    Each cross-check file is first copied into `local`, by descriptor, never through a link,
    and checked against `expected` (file name -> the (inode, size, mtime_ns) the second
    barrier counted) where given; the vote reads those copies, and the archive takes the same
    copies to the lake, so what is archived is exactly what was aggregated.

    Raises ParquetError naming the model and column when a result cannot be aggregated
    (a missing column, a duplicate item id) or a file is gone, LinkRefused when a file is a
    link, StagingError when it is not the counted one, NoSpaceError when the node's tmpfs is full.
    """
    files.check_name("batch_id", batch_id)
    for m in models:
        files.check_name("model", m)
    t0 = time.perf_counter()
    names = [f"crosscheck_{m}.parquet" for m in models]
    try:
        for name in names:
            tmp = f".{name}.tmp"
            try:
                copy_file(staging, name, local, tmp, (expected or {}).get(name))
            except FileNotFoundError:
                raise ParquetError(f"{staging.where(name)}: missing") from None
            except BaseException:
                local.unlink(tmp, missing_ok=True)
                raise
            local.rename(tmp, local, name)
        tables = files.read_results(local, models, prefix="crosscheck_", columns=AGGREGATE_COLUMNS)
        agg = aggregate(tables)
        del tables
        rows_dir = staging if rows_via == "staging" else local
        written = _write_atomic(rows_dir, rows_name(rows_via), rows_csv(agg.items, batch_id))
        files.write_parquet_at(local, PARQUET_NAME, agg.items, compression=compression, level=level)
    except BaseException as e:
        for name in names:  # the copies serve the archive of a whole aggregate only
            with contextlib.suppress(OSError):
                local.unlink(name, missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NoSpaceError(f"{local.label}: no space left for the batch's aggregates") from e
        raise
    return AggregateFiles(
        summary=summarise(agg),
        node=node,
        rows_csv=(
            local_path / rows_name(rows_via)
            if rows_via == "tmpfs"
            else Path(staging.where(rows_name(rows_via)))
        ),
        parquet=local_path / PARQUET_NAME,
        seconds=time.perf_counter() - t0,
        rows_ident=written,
    )


def summarise(agg: BatchAggregate) -> AggregateSummary:
    """The summary of a full aggregate."""
    return AggregateSummary(
        rows=agg.items.num_rows,
        agreement=agg.agreement,
        fleiss_kappa=agg.fleiss_kappa,
        consensus_agreement=dict(agg.consensus_agreement),
        models=agg.models,
    )


def rows_csv(items: pa.Table, batch_id: str) -> bytes:
    """A batch's aggregates as CSV for COPY (COPY_COLUMNS, with a header): encoded by Arrow in
    C++, with no Python loop per row."""
    cols = items.select(["item_id", "consensus", "votes", "n_models", "confidence"])
    # An item every model left null has no consensus and confidence 0, not NULL.
    conf = pc.fill_null(cols.column("confidence"), 0.0)
    cols = cols.set_column(4, "confidence", conf)
    cols = cols.add_column(0, "batch_id", pa.repeat(pa.scalar(batch_id, pa.string()), len(cols)))
    buf = io.BytesIO()
    pacsv.write_csv(cols, buf, pacsv.WriteOptions(include_header=True, quoting_style="needed"))
    return buf.getvalue()
