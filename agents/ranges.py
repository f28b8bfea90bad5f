"""A batch read in ranges of item ids, so an agent's memory follows its budget, not the batch.

The cross-check and the aggregation work item by item: an item's row of the vote matrix needs
only that item's rows of every model. So a batch too large for the agent's memory budget
(`agents.memory_budget`) is worked on in K ranges of item ids, [lo, hi), one after the other;
each range holds every model's rows for its items, and the work on it is the work on a small
batch. K is 1 (the whole batch at once, as before) unless the decoded columns, times the
measured working factor, exceed what the budget leaves.

Which rows a range needs is found from each row group's item_id statistics (min and max): a row
group whose bounds miss the range is never read. The SDK writes results sorted by item_id and
says so in the Parquet sorting metadata, so each range reads only its own row groups (and one
on either side). An unsorted file, or one without statistics, is the fallback: every range reads
each of its row groups in turn and keeps the range's rows, one row group in memory at a time
(K passes over the file, bounded memory).

Statistics are the file's word, not the truth. Every row of every file is kept by exactly one
range, so the rows kept, counted per file, must add up to the file's row count; `check_complete`
raises ParquetError naming the file when they do not (a row group whose bounds lied), before
anything is published.

The range boundaries are quantiles of the item ids: from the row groups' minimums of a sorted
file with enough row groups, otherwise from a sample of its item_id column (read one row group
at a time).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from agents.consensus import Workers
from coordinator.core.errors import ParquetError
from coordinator.core.files import RESULT_COLUMNS
from coordinator.core.roots import Dir, fd_path

__all__ = [
    "ID",
    "WORK_FACTOR",
    "Range",
    "RangedBatch",
    "count_ranges",
    "rss_now",
]

ID = "item_id"

# Peak memory of the cross-check or aggregation of a range, above what the agent held before,
# over the range's share of the decoded size (the Parquet pages, uncompressed) of the columns
# it reads. Measured (docs/benchmarks.md, "Memory"): 2.9 for a whole batch; 4.0-5.4 for
# ranges, which also hold unfiltered row groups and up to 1.5 times their share.
WORK_FACTOR = 5.0

# Points sampled per range from an item_id column that is read for its quantiles.
SAMPLES_PER_RANGE = 64


@dataclass(frozen=True)
class Range:
    """The item ids lo <= id < hi; None: no bound on that side."""

    lo: str | None = None
    hi: str | None = None

    @property
    def whole(self) -> bool:
        return self.lo is None and self.hi is None

    def overlaps(self, low: str | None, high: str | None) -> bool:
        """Whether ids within [low, high] (None: unknown) can fall in the range."""
        if self.hi is not None and low is not None and low >= self.hi:
            return False
        return not (self.lo is not None and high is not None and high < self.lo)

    def holds(self, low: str | None, high: str | None) -> bool:
        """Whether every id within [low, high] (None: unknown) is in the range."""
        if self.lo is not None and (low is None or low < self.lo):
            return False
        return not (self.hi is not None and (high is None or high >= self.hi))

    def mask(self, ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
        """Per id: whether it is in the range."""
        if not pa.types.is_string(ids.type):
            ids = ids.cast(pa.string())  # string_view, large_string: compared as strings
        keep: Any = None
        if self.lo is not None:
            keep = pc.greater_equal(ids, pa.scalar(self.lo, pa.string()))
        if self.hi is not None:
            below = pc.less(ids, pa.scalar(self.hi, pa.string()))
            keep = below if keep is None else pc.and_(keep, below)
        return keep


def rss_now() -> int:
    """This process's resident set now, in bytes (0 where /proc cannot say), once Arrow's
    memory pool has handed back what it keeps for reuse (what the last step freed)."""
    pa.default_memory_pool().release_unused()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def count_ranges(decoded: int, budget: int, held: int) -> int:
    """How many ranges make the work on each fit: `decoded` bytes of columns to read, a budget
    of `budget` bytes for the process, of which it already holds `held`. A budget the agent
    already fills (or nearly) leaves a quarter of itself for the work: many small ranges, not
    an endless number."""
    room = max(budget - held, budget // 4, 1)
    return max(1, math.ceil(decoded * WORK_FACTOR / room))


@dataclass
class _File:
    """One model's file, open for reads by row group."""

    model: str
    name: str  # in its folder
    where: str
    fd: int
    pf: pq.ParquetFile
    bounds: list[tuple[str | None, str | None]]  # per row group: item_id min, max (None: unknown)
    sorted: bool  # the sorting metadata says ascending item_id, and the bounds say it too
    kept: int = 0  # rows kept by the ranges read so far
    # The file opened again to read the columns in read_dictionary as dictionaries.
    dictionary: pq.ParquetFile | None = field(default=None, repr=False)
    # After `partition`: per range, the spill file holding the file's rows of that range.
    spilled: list[str] | None = None


def _bounds(md: pq.FileMetaData, column: int) -> list[tuple[str | None, str | None]]:
    out: list[tuple[str | None, str | None]] = []
    for r in range(md.num_row_groups):
        stats = md.row_group(r).column(column).statistics
        if stats is None or not stats.has_min_max or stats.null_count:
            out.append((None, None))
            continue
        lo, hi = stats.min, stats.max
        if isinstance(lo, bytes):
            lo, hi = lo.decode("utf-8", "replace"), hi.decode("utf-8", "replace")
        if not isinstance(lo, str) or not isinstance(hi, str):
            out.append((None, None))
            continue
        out.append((lo, hi))
    return out


def _is_sorted(
    md: pq.FileMetaData, column: int, bounds: list[tuple[str | None, str | None]]
) -> bool:
    """Whether every row group says it is sorted ascending by item_id, and the row groups'
    bounds follow each other."""
    for r in range(md.num_row_groups):
        order = md.row_group(r).sorting_columns
        if not order or order[0].column_index != column or order[0].descending:
            return False
    prev: str | None = None
    for lo, hi in bounds:
        if lo is None or hi is None or (prev is not None and lo <= prev):
            return False
        prev = hi
    return True


def _takeable(table: pa.Table) -> pa.Table:
    """The table with its string_view columns as plain strings (Arrow filters none of them)."""
    views = [i for i, f in enumerate(table.schema) if pa.types.is_string_view(f.type)]
    for i in views:
        table = table.set_column(i, table.field(i).name, table.column(i).cast(pa.string()))
    return table


def _within(rng: Range, ids: pa.ChunkedArray) -> bool:
    """Whether every id is in the range (a null one is not)."""
    if ids.null_count:
        return False
    if not len(ids):
        return True
    if not pa.types.is_string(ids.type):
        ids = ids.cast(pa.string())
    bounds = pc.min_max(ids)
    return rng.holds(bounds["min"].as_py(), bounds["max"].as_py())


class RangedBatch:
    """Every model's file of a batch folder, read range by range (`ranges`, `read`)."""

    def __init__(
        self,
        folder: Dir,
        models: Sequence[str],
        *,
        prefix: str = "",
        columns: Sequence[str] | None = None,
        read_dictionary: Sequence[str] = (),
    ) -> None:
        self.models = list(models)
        self.columns = columns
        self.read_dictionary = read_dictionary
        self._files: dict[str, _File] = {}
        self._plan: list[Range] = []  # the ranges `partition` split files by
        self._spill: Dir | None = None
        self._stack = contextlib.ExitStack()
        try:
            for m in self.models:
                self._files[m] = self._open(folder, f"{prefix}{m}.parquet", m)
        except BaseException:
            self.close()
            raise

    def _open(self, folder: Dir, name: str, model: str) -> _File:
        where = folder.where(name)
        try:
            fd = folder.open_file(name)
        except OSError as e:
            raise ParquetError(f"{where}: not a readable Parquet file: {e}") from None
        self._stack.callback(os.close, fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ParquetError(f"{where}: not a regular file")
        try:
            pf = pq.ParquetFile(fd_path(fd), memory_map=False)
        except (OSError, pa.ArrowException) as e:
            raise ParquetError(f"{where}: not a readable Parquet file: {e}") from None
        self._stack.callback(pf.close)
        names = pf.schema_arrow.names
        missing = [c for c in RESULT_COLUMNS if c not in names]
        if missing:
            raise ParquetError(f"{where}: lacks column(s) {missing}")
        md = pf.metadata
        # Statistics and sorting metadata index the leaf columns of the Parquet schema.
        leaves = [md.schema.column(i).path for i in range(md.num_columns)]
        if ID not in leaves:
            raise ParquetError(
                f"{where}: column {ID!r} should be string, found {pf.schema_arrow.field(ID).type}"
            )
        column = leaves.index(ID)
        bounds = _bounds(md, column)
        return _File(model, name, where, fd, pf, bounds, _is_sorted(md, column, bounds))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> RangedBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wanted(self, f: _File) -> list[str] | None:
        if self.columns is None:
            return None
        names = f.pf.schema_arrow.names
        return [c for c in self.columns if c in names]

    def decoded_bytes(self) -> int:
        """The decoded (uncompressed page) bytes of the columns to read, over every file."""
        total = 0
        for f in self._files.values():
            md = f.pf.metadata
            wanted = self._wanted(f)
            for r in range(md.num_row_groups):
                rg = md.row_group(r)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    if wanted is None or col.path_in_schema in wanted:
                        total += col.total_uncompressed_size
        return total

    def plan(self, budget: int | None, spill: Dir, workers: Workers | None = None) -> list[Range]:
        """The ranges to work the batch in under a memory `budget` (bytes; None: the whole
        batch at once), with the files they would each read whole split under `spill`
        (`partition`): what a step calls before reading."""
        if budget is None:
            return [Range()]
        plan = self.ranges(count_ranges(self.decoded_bytes(), budget, rss_now()))
        self.partition(plan, spill, workers)
        return plan

    def ranges(self, k: int) -> list[Range]:
        """About `k` ranges of item ids over the batch, with about as many rows each: the
        boundaries are quantiles of the ids of every file (weighted by their rows)."""
        if k <= 1:
            return [Range()]
        points: list[tuple[str, int]] = []
        for f in self._files.values():
            points.extend(self._points(f, k))
        if not points:
            return [Range()]
        points.sort()
        weights = np.cumsum([w for _, w in points]).tolist()
        total = weights[-1]
        cuts: list[str] = []
        for i in range(1, k):
            at = bisect.bisect_left(weights, total * i / k)
            value = points[min(at, len(points) - 1)][0]
            if (not cuts or value > cuts[-1]) and value > points[0][0]:
                cuts.append(value)
        edges: list[str | None] = [None, *cuts, None]
        return [Range(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def _points(self, f: _File, k: int) -> list[tuple[str, int]]:
        """Points of the file's item-id distribution, each with the rows it stands for."""
        md = f.pf.metadata
        if f.sorted and md.num_row_groups >= 2 * k:
            # Cuts at row-group boundaries: a range then reads whole row groups of the files
            # written alike (the SDK's), with no row decoded for another range, and holds at
            # most 1.5 times its share (at least two row groups a range).
            return [
                (lo, md.row_group(r).num_rows)
                for r, (lo, _) in enumerate(f.bounds)
                if lo is not None
            ]
        step = max(1, md.num_rows // (SAMPLES_PER_RANGE * k))
        points: list[tuple[str, int]] = []
        for r in range(md.num_row_groups):
            try:
                ids = f.pf.read_row_group(r, columns=[ID], use_threads=False).column(0)
                ids = ids.cast(pa.string())  # (a string_view column too)
            except (OSError, pa.ArrowException) as e:
                raise ParquetError(f"{f.where}: not a readable Parquet file: {e}") from None
            sample = ids.take(pa.array(np.arange(0, len(ids), step, dtype=np.int64)))
            points.extend((v, step) for v in sample.to_pylist() if v is not None)
        return points

    def read(self, rng: Range, workers: Workers | None = None) -> dict[str, pa.Table]:
        """Every model's rows of the range, by model (ParquetError names an unreadable file).
        With `workers` of more than one thread, the files are read side by side on them, each
        in one (else one after the other, each with Arrow's threads)."""
        if workers is None or workers.threads <= 1:
            return {m: self._read(self._files[m], rng, workers is None) for m in self.models}
        tables = workers.map(lambda m: self._read(self._files[m], rng, False), self.models)
        return dict(zip(self.models, tables, strict=True))

    def _reader(self, f: _File) -> pq.ParquetFile:
        as_dictionary = [c for c in self.read_dictionary if c in f.pf.schema_arrow.names]
        if not as_dictionary:
            return f.pf
        if f.dictionary is None:
            f.dictionary = pq.ParquetFile(
                fd_path(f.fd),
                memory_map=False,
                metadata=f.pf.metadata,
                read_dictionary=as_dictionary,
            )
            self._stack.callback(f.dictionary.close)
        return f.dictionary

    def _read_spilled(self, f: _File, rng: Range, use_threads: bool) -> pa.Table:
        assert f.spilled is not None and self._spill is not None
        name = f.spilled[self._plan.index(rng)]
        fd = self._spill.open_file(name)
        try:
            as_dictionary = [c for c in self.read_dictionary if c in f.pf.schema_arrow.names]
            with pq.ParquetFile(
                fd_path(fd), memory_map=False, read_dictionary=as_dictionary
            ) as spilled:
                return spilled.read(use_threads=use_threads)
        finally:
            os.close(fd)

    def _read(self, f: _File, rng: Range, use_threads: bool) -> pa.Table:
        pf = self._reader(f)
        wanted = self._wanted(f)
        try:
            if f.spilled is not None:
                table = self._read_spilled(f, rng, use_threads)
            elif rng.whole:
                table = pf.read(columns=wanted, use_threads=use_threads)
            else:
                parts = []
                for r, (lo, hi) in enumerate(f.bounds):
                    if not rng.overlaps(lo, hi):
                        continue
                    whole = rng.holds(lo, hi)
                    part = _takeable(pf.read_row_group(r, columns=wanted, use_threads=use_threads))
                    if part.column(ID).null_count:  # (said as a whole read says it)
                        raise ParquetError(
                            f"model {f.model!r}: column 'item_id' has "
                            f"{part.column(ID).null_count} null(s) ({f.where})"
                        )
                    # A row group its statistics put wholly in the range is kept as read
                    # once its ids are seen to be (statistics can lie: then it is filtered,
                    # and the rows it hid are missed and reported by check_complete).
                    if not (whole and _within(rng, part.column(ID))):
                        part = part.filter(rng.mask(part.column(ID)))
                    parts.append(part)
                table = (
                    pa.concat_tables(parts)
                    if parts
                    else pf.read_row_groups([], columns=wanted, use_threads=False)
                )
        except (OSError, pa.ArrowException) as e:
            raise ParquetError(f"{f.where}: not a readable Parquet file: {e}") from None
        f.kept += table.num_rows
        return table

    def partition(self, plan: Sequence[Range], spill: Dir, workers: Workers | None = None) -> int:
        """Split once, into one spill file per range under `spill` (dot names, removed at
        `close`), every file that the ranges would otherwise each read whole: one not sorted
        by item_id, or with fewer than two row groups a range. Each of its row groups is read
        once and its rows appended to their range's file (zstd 1), so the batch is decoded
        twice rather than once per range; a range then reads its spill files. Returns the
        files split. (The spill is in the node's tmpfs: about the files' compressed size.)

        A sorted file is split only when there are more than twice as many ranges as its row
        groups: read by their statistics, its row groups are read about (groups + ranges)
        times in all, which costs more than the split's read, write and read back only then."""
        self._plan = list(plan)
        if len(self._plan) < 2:
            return 0
        todo = [
            f
            for f in self._files.values()
            if f.pf.metadata.num_rows
            and (not f.sorted or len(self._plan) > 2 * f.pf.metadata.num_row_groups)
        ]
        self._spill = spill
        cuts = [r.lo for r in self._plan[1:]]
        if workers is None or workers.threads <= 1:
            for f in todo:
                self._split(f, cuts, spill)
        else:
            workers.map(lambda f: self._split(f, cuts, spill), todo)
        return len(todo)

    def _split(self, f: _File, cuts: list[str | None], spill: Dir) -> None:
        pf = self._reader(f)
        wanted = self._wanted(f)
        names = [f".range-{i}.{f.name}" for i in range(len(cuts) + 1)]
        f.spilled = names
        for name in names:
            self._stack.callback(spill.unlink, name, missing_ok=True)
        writers: list[pq.ParquetWriter] = []
        sinks: list[Any] = []
        try:
            for r in range(pf.metadata.num_row_groups):
                part = _takeable(pf.read_row_group(r, columns=wanted, use_threads=False))
                ids = part.column(ID)
                if ids.null_count:
                    raise ParquetError(
                        f"model {f.model!r}: column 'item_id' has {ids.null_count} null(s) "
                        f"({f.where})"
                    )
                if not pa.types.is_string(ids.type):
                    ids = ids.cast(pa.string())
                which = np.zeros(len(ids), dtype=np.int32)
                for cut in cuts:
                    which += np.asarray(
                        pc.greater_equal(ids, pa.scalar(cut, pa.string())).to_numpy(
                            zero_copy_only=False
                        ),
                        dtype=np.int32,
                    )
                if not writers:
                    for n in names:
                        fd = spill.open_file(n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                        sinks.append(os.fdopen(fd, "wb"))
                        writers.append(
                            pq.ParquetWriter(
                                sinks[-1], part.schema, compression="zstd", compression_level=1
                            )
                        )
                for i, w in enumerate(writers):
                    rows = part.filter(pa.array(which == i))
                    if rows.num_rows:
                        w.write_table(rows)
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise
            raise ParquetError(f"{f.where}: not a readable Parquet file: {e}") from None
        finally:
            for w in writers:
                w.close()
            for sink in sinks:
                sink.close()

    def check_complete(self) -> None:
        """After every range was read once: each file's rows were each kept by one range.
        Raises ParquetError naming the file whose rows the ranges missed (statistics that do
        not bound the row group's ids)."""
        for f in self._files.values():
            if f.kept != f.pf.metadata.num_rows:
                raise ParquetError(
                    f"{f.where}: the ranges read {f.kept} of its {f.pf.metadata.num_rows} rows: "
                    "its row groups' item_id statistics do not bound their ids"
                )
