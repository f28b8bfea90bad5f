"""Files every process reads and writes the same way: Parquet written atomically (dot-temp, fsync,
rename, fsync the folder) and read back with its columns checked, and the names a batch and a
model may have.

Under staging and the node tmpfs everything is opened through a folder's descriptor
(`coordinator.core.roots`), never through a link. The SDK (`agents.slm`) publishes with these
functions; the daemon's scanner checks files with `check_parquet`; the agents read with
`read_results`.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coordinator.core.config import NAME_RE
from coordinator.core.errors import ParquetError
from coordinator.core.roots import Dir, fd_path

__all__ = [
    "ENCODE_CPU_KEY",
    "RESULT_COLUMNS",
    "Compression",
    "PartsWriter",
    "check_name",
    "check_parquet",
    "compression_of",
    "fsync_dir",
    "is_sorted_by_id",
    "read_result",
    "read_result_at",
    "read_results",
    "write_options",
    "write_parquet_at",
    "write_parquet_atomic",
    "write_table",
]

# The columns every result (and cross-check) file has.
RESULT_COLUMNS = ("item_id", "prediction")
# The key-value metadata entry in which `write_parquet_at` records the CPU seconds its writer
# thread spent encoding and compressing the file's row groups.
ENCODE_CPU_KEY = "numa_coordinator.encode_cpu_s"


@dataclass(frozen=True)
class Compression:
    """What a Parquet file's footer says of its compression: the column chunks' bytes as
    stored (`compressed`) and once decompressed (`decoded`: Parquet-encoded, before the
    codec), and the writer's CPU seconds when it recorded them (ENCODE_CPU_KEY), else None."""

    compressed: int
    decoded: int
    encode_cpu_s: float | None

    @property
    def ratio(self) -> float | None:
        """decoded / compressed; None for a file without data."""
        return self.decoded / self.compressed if self.compressed else None


def compression_of(md: pq.FileMetaData, where: str = "") -> Compression:
    """The compression figures of a file from its footer (pure; no data page is read).
    ValueError naming `where` when the recorded CPU seconds are not a number >= 0."""
    compressed = decoded = 0
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        for c in range(rg.num_columns):
            col = rg.column(c)
            compressed += col.total_compressed_size
            decoded += col.total_uncompressed_size
    cpu: float | None = None
    raw = (md.metadata or {}).get(ENCODE_CPU_KEY.encode())
    if raw is not None:
        try:
            cpu = float(raw)
        except ValueError:
            cpu = math.nan
        if not math.isfinite(cpu) or cpu < 0:
            raise ValueError(f"{where}: metadata {ENCODE_CPU_KEY} is {raw!r}, not CPU seconds")
    return Compression(compressed, decoded, cpu)


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid batch id or model name, else raise ValueError naming it."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} does not match {NAME_RE.pattern}")
    return value


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_options(
    table: pa.Table | pa.Schema,
    *,
    compression: str = "zstd",
    level: int | None = 3,
    sorted_by_id: bool = False,
) -> dict[str, Any]:
    """The `pq.write_table` options the SDK writes `table` (or a table of that schema) with.
    With `sorted_by_id` (the rows are in ascending item_id order), the row groups say so in
    their sorting metadata, which lets a reader take a batch in ranges of ids
    (`agents.ranges`)."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    kwargs: dict[str, Any] = {"compression": None if compression == "none" else compression}
    # A dictionary never pays for item_id (unique by contract) nor for floats (scores hardly
    # repeat): trying one anyway costs a third of the write before Arrow gives up on it.
    kwargs["use_dictionary"] = [
        f.name for f in schema if f.name != "item_id" and not pa.types.is_floating(f.type)
    ]
    if level is not None and compression in ("zstd", "gzip", "brotli"):
        kwargs["compression_level"] = level
    if sorted_by_id and "item_id" in schema.names:
        kwargs["sorting_columns"] = [pq.SortingColumn(schema.get_field_index("item_id"))]
    return kwargs


def is_sorted_by_id(table: pa.Table) -> bool:
    """Whether the table's item ids never decrease from one row to the next (False without an
    item_id column)."""
    if "item_id" not in table.column_names:
        return False
    ids = table.column("item_id")
    if len(ids) < 2:
        return True
    if pa.types.is_string_view(ids.type):
        ids = ids.cast(pa.string())  # compared as strings
    return bool(pc.all(pc.less_equal(ids[:-1], ids[1:])).as_py())


def write_table(table: pa.Table, where: Any, **kwargs: Any) -> None:
    """`pq.write_table(table, where, **kwargs)`, the footer recording the CPU seconds the row
    groups took to encode and compress in the key-value entry ENCODE_CPU_KEY. pyarrow writes
    a file in the calling thread, so that thread's CPU clock is the writer's alone."""
    row_group_size = kwargs.pop("row_group_size", None)
    with pq.ParquetWriter(where, table.schema, **kwargs) as writer:
        cpu0 = time.thread_time()
        writer.write_table(table, row_group_size=row_group_size)
        writer.add_key_value_metadata({ENCODE_CPU_KEY: f"{time.thread_time() - cpu0:.6f}"})


def write_parquet_atomic(
    path: Path, table: pa.Table, *, compression: str = "zstd", level: int | None = 3
) -> int:
    """Write `table` to `path` atomically (dot-temp, fsync, rename, fsync folder); return bytes."""
    with Dir.open(path.parent) as folder:
        st = write_parquet_at(folder, path.name, table, compression=compression, level=level)
    return st.st_size


def write_parquet_at(
    folder: Dir,
    name: str,
    table: pa.Table,
    *,
    compression: str = "zstd",
    level: int | None = 3,
    sorted_by_id: bool = False,
) -> os.stat_result:
    """Write `table` as `folder/name` atomically: to `.<name>.tmp` opened in the folder (never
    through a link), fsync, rename in the folder, fsync the folder; return the written file's
    stat (its inode, size and mtime are what a reader can check it by). The footer records
    the writer's CPU seconds (`write_table`); with `sorted_by_id`, that its rows are in item_id
    order (`write_options`)."""
    tmp = f".{name}.tmp"
    kwargs = write_options(table, compression=compression, level=level, sorted_by_id=sorted_by_id)
    fd = folder.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write_table(table, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        folder.rename(tmp, folder, name)
    except BaseException:
        with contextlib.suppress(OSError):
            folder.unlink(tmp, missing_ok=True)
        raise
    folder.fsync()
    return st


class PartsWriter:
    """A Parquet file written part after part (`write`), atomically as `write_parquet_at`
    writes a table: under `.<name>.tmp` until `commit` renames it into place and returns its
    stat. Leaving the `with` block without `commit` (an error) removes the temp file. The footer
    records the CPU seconds the parts took to encode, whichever threads wrote them."""

    def __init__(
        self,
        folder: Dir,
        name: str,
        schema: pa.Schema,
        *,
        compression: str = "zstd",
        level: int | None = 3,
        sorted_by_id: bool = False,
    ) -> None:
        self.folder = folder
        self.name = name
        self.rows = 0
        self._tmp = f".{name}.tmp"
        self._cpu = 0.0
        kwargs = write_options(
            schema, compression=compression, level=level, sorted_by_id=sorted_by_id
        )
        fd = folder.open_file(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._file = os.fdopen(fd, "wb")
        try:
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._file, schema, **kwargs)
        except BaseException:
            self.abort()
            raise

    def write(self, table: pa.Table) -> None:
        """Append the rows of `table` (of the writer's schema)."""
        assert self._writer is not None, "written after commit or abort"
        if table.num_rows == 0:
            return
        cpu0 = time.thread_time()
        self._writer.write_table(table)
        self._cpu += time.thread_time() - cpu0
        self.rows += table.num_rows

    def commit(self, into: Dir | None = None) -> os.stat_result:
        """Close the file, fsync it, rename it into place, fsync the folder; its stat. With
        `into`, the place is in that folder (one opened anew, so a folder swapped for a link
        while the parts were written is refused when it is opened, not written through)."""
        target = into or self.folder
        assert self._writer is not None, "committed twice or after abort"
        try:
            self._writer.add_key_value_metadata({ENCODE_CPU_KEY: f"{self._cpu:.6f}"})
            self._writer.close()
            self._writer = None
            self._file.flush()
            os.fsync(self._file.fileno())
            st = os.fstat(self._file.fileno())
            self._file.close()
            self.folder.rename(self._tmp, target, self.name)
        except BaseException:
            self.abort()
            raise
        target.fsync()
        return st

    def abort(self) -> None:
        """Drop what was written (the temp file); nothing is renamed into place."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.folder.unlink(self._tmp, missing_ok=True)

    def __enter__(self) -> PartsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self.abort()


def check_parquet(path: str | os.PathLike[str]) -> pq.FileMetaData:
    """Return the file's Parquet metadata, or raise ParquetError saying why it is not readable."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 12:
                raise ParquetError(f"{path}: {size} bytes is too short for a Parquet file")
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise ParquetError(
                f"{path}: missing PAR1 magic at the {'head' if head != b'PAR1' else 'footer'}"
            )
        return pq.read_metadata(path)
    except ParquetError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ParquetError(f"{path}: not a readable Parquet file: {e}") from None


def read_result(
    path: str | os.PathLike[str],
    *,
    memory_map: bool = True,
    columns: Sequence[str] | None = None,
    read_dictionary: Sequence[str] = (),
    use_threads: bool = True,
) -> pa.Table:
    """Read one result (or cross-check) file; ParquetError if it lacks the result columns.
    With `columns`, only those of them the file has are read (the others are never decoded);
    the columns in `read_dictionary` come as dictionary arrays (the file's own dictionary
    pages, no string decoded). `use_threads=False` reads in the caller's thread alone (for a
    caller that reads several files on threads of its own)."""
    try:
        with pq.ParquetFile(path, memory_map=memory_map) as pf:
            names = pf.schema_arrow.names
            wanted = None if columns is None else [c for c in columns if c in names]
            as_dictionary = [c for c in read_dictionary if c in names]
            if not as_dictionary:
                table = pf.read(columns=wanted, use_threads=use_threads)
        if as_dictionary:  # (a column the file lacks is reported below, not as a KeyError)
            with pq.ParquetFile(
                path, memory_map=memory_map, metadata=pf.metadata, read_dictionary=as_dictionary
            ) as pf:
                table = pf.read(columns=wanted, use_threads=use_threads)
    except (OSError, pa.ArrowException) as e:
        raise ParquetError(f"{path}: not a readable Parquet file: {e}") from None
    missing = [c for c in RESULT_COLUMNS if c not in table.column_names]
    if missing:
        raise ParquetError(f"{path}: lacks column(s) {missing}")
    return table


def read_result_at(
    folder: Dir,
    name: str,
    *,
    columns: Sequence[str] | None = None,
    read_dictionary: Sequence[str] = (),
    use_threads: bool = True,
) -> pa.Table:
    """`read_result` of `folder/name`, opened in the folder (never through a link)."""
    try:
        fd = folder.open_file(name)
    except OSError as e:
        raise ParquetError(f"{folder.where(name)}: not a readable Parquet file: {e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ParquetError(f"{folder.where(name)}: not a regular file")
        return read_result(
            fd_path(fd), columns=columns, read_dictionary=read_dictionary, use_threads=use_threads
        )
    except ParquetError as e:
        raise ParquetError(str(e).replace(fd_path(fd), folder.where(name))) from None
    finally:
        os.close(fd)


def read_results(
    folder: str | os.PathLike[str] | Dir,
    models: Iterable[str],
    *,
    prefix: str = "",
    columns: Sequence[str] | None = None,
    read_dictionary: Sequence[str] = (),
    threads: int = 0,
) -> Mapping[str, pa.Table]:
    """Read `<prefix><model>.parquet` for each model in `folder` into a {model: table} mapping.

    With `threads` >= 1, the files are read side by side on that many threads, each file in
    one thread (0: one file after the other, each with Arrow's own threads)."""
    models = list(models)

    def one(m: str) -> pa.Table:
        name = f"{prefix}{m}.parquet"
        opts: dict[str, Any] = {
            "columns": columns,
            "read_dictionary": read_dictionary,
            "use_threads": threads == 0,
        }
        if isinstance(folder, Dir):
            return read_result_at(folder, name, **opts)
        return read_result(Path(folder) / name, **opts)

    if threads <= 1:
        return {m: one(m) for m in models}
    with ThreadPoolExecutor(threads, thread_name_prefix="read") as pool:
        return dict(zip(models, pool.map(one, models), strict=True))
