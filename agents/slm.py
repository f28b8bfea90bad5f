"""The SLM publishing SDK: how a model puts its result into staging, and how results are read back.

Publishing is atomic (DESIGN.md, "The staging contract"): the table is written to
`.<name>.tmp` in the batch folder, fsynced, renamed to its final name, and the folder is fsynced,
so the coordinator never sees a half-written file under a final name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from coordinator.config import NAME_RE
from coordinator.errors import ParquetError

RESULT_COLUMNS = ("item_id", "prediction")


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
    table: pa.Table, *, compression: str = "zstd", level: int | None = 3
) -> dict[str, Any]:
    """The `pq.write_table` options the SDK writes `table` with."""
    kwargs: dict[str, Any] = {"compression": None if compression == "none" else compression}
    # A dictionary never pays for item_id (unique by contract) nor for floats (scores hardly
    # repeat): trying one anyway costs a third of the write before Arrow gives up on it.
    kwargs["use_dictionary"] = [
        f.name for f in table.schema if f.name != "item_id" and not pa.types.is_floating(f.type)
    ]
    if level is not None and compression in ("zstd", "gzip", "brotli"):
        kwargs["compression_level"] = level
    return kwargs


def write_parquet_atomic(
    path: Path, table: pa.Table, *, compression: str = "zstd", level: int | None = 3
) -> int:
    """Write `table` to `path` atomically (dot-temp, fsync, rename, fsync folder); return bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    kwargs = write_options(table, compression=compression, level=level)
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size


def publish(
    staging: str | os.PathLike[str],
    batch_id: str,
    model: str,
    table: pa.Table,
    *,
    compression: str = "zstd",
    level: int | None = 3,
) -> Path:
    """Publish one model's result for a batch into staging, atomically; return the final path."""
    check_name("batch_id", batch_id)
    check_name("model", model)
    missing = [c for c in RESULT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"model {model}: result table lacks column(s) {missing}")
    folder = Path(staging) / batch_id
    final = folder / f"{model}.parquet"
    for attempt in range(5):
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            write_parquet_atomic(final, table, compression=compression, level=level)
        except FileNotFoundError:
            # The coordinator removes the folder of a batch it finds already finished (its
            # files go to quarantine); a publish that raced that removal makes it again.
            if folder.exists() or attempt == 4:
                raise
            continue
        if created:  # after the file, so the folder is not left empty for that long
            fsync_dir(folder.parent)
        return final
    raise AssertionError("unreachable")


def publish_crosscheck(
    staging: str | os.PathLike[str],
    batch_id: str,
    model: str,
    table: pa.Table,
    *,
    compression: str = "zstd",
    level: int | None = 3,
) -> Path:
    """Publish a model's cross-check result as `crosscheck_<model>.parquet`, atomically."""
    check_name("batch_id", batch_id)
    check_name("model", model)
    final = Path(staging) / batch_id / f"crosscheck_{model}.parquet"
    write_parquet_atomic(final, table, compression=compression, level=level)
    return final


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
) -> pa.Table:
    """Read one result (or cross-check) file; ParquetError if it lacks the result columns.
    With `columns`, only those of them the file has are read (the others are never decoded)."""
    try:
        with pq.ParquetFile(path, memory_map=memory_map) as pf:
            names = pf.schema_arrow.names
            wanted = None if columns is None else [c for c in columns if c in names]
            table = pf.read(columns=wanted)
    except (OSError, pa.ArrowException) as e:
        raise ParquetError(f"{path}: not a readable Parquet file: {e}") from None
    missing = [c for c in RESULT_COLUMNS if c not in table.column_names]
    if missing:
        raise ParquetError(f"{path}: lacks column(s) {missing}")
    return table


def read_results(
    folder: str | os.PathLike[str],
    models: Iterable[str],
    *,
    prefix: str = "",
    columns: Sequence[str] | None = None,
) -> Mapping[str, pa.Table]:
    """Read `<prefix><model>.parquet` for each model in `folder` into a {model: table} mapping."""
    base = Path(folder)
    return {m: read_result(base / f"{prefix}{m}.parquet", columns=columns) for m in models}
