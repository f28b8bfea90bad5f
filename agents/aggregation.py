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
import hashlib
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from agents import ranges
from agents.consensus import (
    ITEMS_SCHEMA,
    BatchAggregate,
    Totals,
    Workers,
    agreement_of,
    consensus_agreement_of,
    fleiss_of,
    vote,
)
from agents.staging import copy_file
from coordinator.core import files
from coordinator.core.errors import NoSpaceError, ParquetError
from coordinator.core.roots import Dir
from coordinator.core.rowsfile import RowsIdent
from coordinator.core.summary import PARQUET_NAME, AggregateFiles, AggregateSummary, rows_name

__all__ = ["AGGREGATE_COLUMNS", "aggregate_batch", "rows_csv", "summarise", "summary_of"]

AGGREGATE_COLUMNS = ("item_id", "prediction", "score")


class _RowsWriter:
    """The rows CSV written part after part under a dot-temp name, renamed into place by
    `commit`, which returns what was written as the coordinator checks it before its COPY
    (the SHA-256 taken as the parts go out)."""

    def __init__(self, folder: Dir, name: str, batch_id: str) -> None:
        self.folder = folder
        self.name = name
        self.batch_id = batch_id
        self._tmp = f".{name}.tmp"
        self._hash = hashlib.sha256()
        fd = folder.open_file(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        self._file: io.BufferedWriter | None = os.fdopen(fd, "wb")
        self._put(rows_csv(ITEMS_SCHEMA.empty_table(), batch_id))  # the header

    def _put(self, data: bytes) -> None:
        assert self._file is not None, "written after commit or abort"
        self._file.write(data)
        self._hash.update(data)

    def write(self, items: pa.Table) -> None:
        if items.num_rows:
            self._put(rows_csv(items, self.batch_id, header=False))

    def commit(self) -> RowsIdent:
        assert self._file is not None, "committed twice or after abort"
        try:
            self._file.flush()
            st = os.fstat(self._file.fileno())
            self._file.close()
            self._file = None
            self.folder.rename(self._tmp, self.folder, self.name)
        except BaseException:
            self.abort()
            raise
        return RowsIdent(st.st_ino, st.st_size, st.st_mtime_ns, self._hash.hexdigest())

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self.folder.unlink(self._tmp, missing_ok=True)

    def __enter__(self) -> _RowsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self.abort()


def _write_part(items: pa.Table, write: Callable[[pa.Table], None]) -> None:
    write(items)


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
    threads: int = 1,
    memory_budget: int | None = None,
) -> AggregateFiles:
    """Aggregate `models`' cross-check files of the batch folder `staging` into `local` (the
    batch's node-local folder, at `local_path`). The rows CSV goes into `local` too, or, with
    `rows_via` "staging" (an agent in another kernel than the coordinator), into the batch's
    staging folder as `.aggregates.csv`.

    Each cross-check file is first copied into `local`, by descriptor, never through a link,
    and checked against `expected` (file name -> the (inode, size, mtime_ns) the second
    barrier counted) where given; the vote reads those copies, and the archive takes the same
    copies to the lake, so what is archived is exactly what was aggregated.

    The files are read, the vote taken and the two outputs written on `threads` threads;
    with `memory_budget` (bytes), in ranges of item ids when the batch does not fit it
    (`agents.ranges`), each range's rows written as soon as they are voted.

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
        rows_dir = staging if rows_via == "staging" else local
        with (
            ranges.RangedBatch(
                local,
                models,
                prefix="crosscheck_",
                columns=AGGREGATE_COLUMNS,
                read_dictionary=("prediction",),
            ) as batch,
            _RowsWriter(rows_dir, rows_name(rows_via), batch_id) as rows,
            files.PartsWriter(
                local,
                PARQUET_NAME,
                ITEMS_SCHEMA,
                compression=compression,
                level=level,
                sorted_by_id=True,
            ) as parquet,
            Workers(threads) as workers,
        ):
            totals: Totals | None = None
            plan = batch.plan(memory_budget, local, workers)
            for rng in plan:
                tables = batch.read(rng, workers)
                items, part = vote(tables, workers)
                del tables
                totals = part if totals is None else totals + part
                # The rows CSV beside aggregates.parquet.
                workers.map(partial(_write_part, items), [rows.write, parquet.write])
                del items
            batch.check_complete()
            assert totals is not None  # at least one range
            written = rows.commit()
            parquet.commit()
    except BaseException as e:
        for name in names:  # the copies serve the archive of a whole aggregate only
            with contextlib.suppress(OSError):
                local.unlink(name, missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NoSpaceError(f"{local.label}: no space left for the batch's aggregates") from e
        raise
    return AggregateFiles(
        summary=summary_of(totals),
        node=node,
        rows_csv=(
            local_path / rows_name(rows_via)
            if rows_via == "tmpfs"
            else Path(staging.where(rows_name(rows_via)))
        ),
        parquet=local_path / PARQUET_NAME,
        seconds=time.perf_counter() - t0,
        rows_ident=written,
        ranges=len(plan),
    )


def summary_of(t: Totals) -> AggregateSummary:
    """The summary of a whole batch's vote."""
    return AggregateSummary(
        rows=t.rows,
        agreement=agreement_of(t),
        fleiss_kappa=fleiss_of(t),
        consensus_agreement=consensus_agreement_of(t),
        models=t.models,
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


def rows_csv(items: pa.Table, batch_id: str, *, header: bool = True) -> bytes:
    """A batch's aggregates as CSV for COPY (COPY_COLUMNS, with a header unless `header` is
    False): encoded by Arrow in C++, with no Python loop per row."""
    cols = items.select(["item_id", "consensus", "votes", "n_models", "confidence"])
    # An item every model left null has no consensus and confidence 0, not NULL.
    conf = pc.fill_null(cols.column("confidence"), 0.0)
    cols = cols.set_column(4, "confidence", conf)
    cols = cols.add_column(0, "batch_id", pa.repeat(pa.scalar(batch_id, pa.string()), len(cols)))
    buf = io.BytesIO()
    pacsv.write_csv(cols, buf, pacsv.WriteOptions(include_header=header, quoting_style="needed"))
    return buf.getvalue()
