"""The Iceberg lake writer of the aggregating agent (`lake.format = "iceberg"`, docs/lake.md).

The agent prepares a batch's snapshots; it commits nothing. For each table it writes one data
file (the batch's rows with its batch id, day and model columns: docs/lake.md says why the staged
files are rewritten), registers it with pyiceberg's `add_files` (statistics and partition values
read from the file's footer, no second rewrite) and writes the manifests and the new metadata
file through `Preparing`, a catalog whose commit writes the metadata file and stops there. The
reply names, per table, the metadata file it started from and the one it wrote; the coordinator
swaps them in the catalog's rows in the same PostgreSQL transaction that marks the batch
archived (compare-and-set), or not at all. Everything a failed attempt wrote has a name of its
own (a fresh id per attempt), is named by no snapshot, and is listed by `coordinatorctl lake
orphans`.

The agent needs no database: the coordinator sends the current metadata locations.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.catalog import MetastoreCatalog
from pyiceberg.table import CommitTableResponse, StaticTable, Table
from pyiceberg.typedef import Identifier

from coordinator.core import hooks
from coordinator.core.errors import LakeError
from coordinator.core.files import fsync_dir
from coordinator.core.iceberg import BATCH_PROPERTY, TABLES, arrow_schema
from coordinator.core.summary import AggregateSummary

__all__ = ["BatchRows", "Prepared", "Preparing", "TableRows", "prepare_batch", "rows_for"]


class Preparing(MetastoreCatalog):
    """A catalog that loads tables from the metadata locations it is given and whose commit
    writes the new metadata file without swapping it in: `staged` holds (base, new) per
    table for the coordinator's compare-and-set."""

    def __init__(self, bases: Mapping[str, str], properties: Mapping[str, str]) -> None:
        super().__init__("numa-agent", **dict(properties))
        self.bases: dict[Identifier, str] = {tuple(k.split(".")): v for k, v in bases.items()}
        self.staged: dict[Identifier, tuple[str, str]] = {}

    def load_table(self, identifier: str | Identifier) -> Table:
        ident = tuple(identifier.split(".")) if isinstance(identifier, str) else identifier
        location = self.bases[ident]
        static = StaticTable.from_metadata(location, self.properties)
        return Table(ident, static.metadata, location, static.io, self)

    def commit_table(self, table: Table, requirements: Any, updates: Any) -> CommitTableResponse:
        ident = table.name()
        current = self.load_table(ident)
        staged = self._update_and_stage_table(current, ident, requirements, updates)
        self._write_metadata(staged.metadata, staged.io, staged.metadata_location)
        base, _ = self.staged.get(ident, (current.metadata_location, ""))
        self.staged[ident] = (base, staged.metadata_location)
        self.bases[ident] = staged.metadata_location
        return CommitTableResponse(
            metadata=staged.metadata,
            metadata_location=staged.metadata_location,  # type: ignore[call-arg]  # its alias
        )

    def _no(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("the agent's catalog only prepares commits")

    create_table = create_namespace = drop_namespace = drop_table = drop_view = _no
    list_namespaces = list_tables = list_views = load_namespace_properties = _no
    load_view = register_table = register_view = rename_table = _no
    update_namespace_properties = view_exists = _no


def _column(t: pa.Table, name: str, typ: pa.DataType, where: str) -> pa.Array:
    if name not in t.column_names:
        return pa.nulls(t.num_rows, typ)
    try:
        return pc.cast(t.column(name), typ).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise LakeError(f"{where}: column {name!r} cannot be cast to {typ}: {e}") from e


def _shape(table: str, t: pa.Table, fixed: Mapping[str, Any], where: str) -> pa.Table:
    """`t` with the table's columns in order: the `fixed` ones (batch id, day, model) repeated,
    the others cast from `t`'s (null where `t` has none)."""
    schema = arrow_schema(table)
    cols = []
    for f in schema:
        if f.name in fixed:
            cols.append(pa.repeat(pa.scalar(fixed[f.name], f.type), t.num_rows))
        else:
            col = _column(t, f.name, f.type, where)
            if not f.nullable and col.null_count:
                raise LakeError(f"{where}: column {f.name!r} has {col.null_count} null(s)")
            cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


class TableRows:
    """One table's rows of a batch, read when its data file is written, one row group of a
    source file at a time (`parts`): an archive of the seed's 7 x 400 MB holds a row group,
    never the batch. Owns duplicates of the source descriptors until `close`."""

    def __init__(self, table: str, rows: pa.Table | None = None) -> None:
        self.table = table
        self.schema = arrow_schema(table)
        self._rows = rows
        self._sources: list[tuple[int, dict[str, Any], str]] = []

    def add(self, fd: int, fixed: Mapping[str, Any], where: str) -> None:
        """Rows from the open Parquet file `fd` (duplicated here), with the `fixed` columns."""
        self._sources.append((os.dup(fd), dict(fixed), where))

    def parts(self) -> Iterator[pa.Table]:
        """The rows, shaped to the table's schema, part after part."""
        if self._rows is not None:
            yield self._rows
        for fd, fixed, where in self._sources:
            with os.fdopen(os.dup(fd), "rb") as f, pq.ParquetFile(f) as pf:
                for r in range(pf.metadata.num_row_groups):
                    yield _shape(self.table, pf.read_row_group(r), fixed, where)

    def close(self) -> None:
        while self._sources:
            os.close(self._sources.pop()[0])


class BatchRows(dict[str, TableRows]):
    """Each table's rows of a batch (`rows_for`); `prepare_batch` closes them."""

    def close(self) -> None:
        for rows in self.values():
            rows.close()


def rows_for(
    batch_id: str,
    date: str,
    models: Sequence[str],
    sources: Mapping[str, int],
    summary: AggregateSummary,
) -> BatchRows:
    """Each table's rows of the batch, from the open files `sources` (name -> descriptor:
    <model>.parquet, crosscheck_<model>.parquet, aggregates.parquet) and the summary; read
    when written. The descriptors are duplicated: the caller may close its own."""
    import datetime as dt

    day = dt.date.fromisoformat(date)
    key = {"batch_id": batch_id, "day": day}
    out = BatchRows()
    try:
        for table, prefix in (("results", ""), ("crosschecks", "crosscheck_")):
            out[table] = TableRows(table)
            for m in models:
                name = f"{prefix}{m}.parquet"
                out[table].add(sources[name], key | {"model": m}, name)
        out["aggregates"] = TableRows("aggregates")
        out["aggregates"].add(sources["aggregates.parquet"], key, "aggregates.parquet")
        pairs = summary.agreement
        agreement = pa.Table.from_pydict(
            {
                "batch_id": [batch_id] * len(pairs),
                "day": [day] * len(pairs),
                "model_a": [p.model_a for p in pairs],
                "model_b": [p.model_b for p in pairs],
                "agreement": [p.agreement for p in pairs],
                "n_common": [p.n_common for p in pairs],
                "fleiss_kappa": [summary.fleiss_kappa] * len(pairs),
            },
            schema=arrow_schema("agreement"),
        )
        out["agreement"] = TableRows("agreement", agreement)
    except BaseException:
        out.close()
        raise
    return out


class Prepared(dict[str, tuple[str, str]]):
    """table -> (the metadata location it started from, the one written; "" when the table
    already had the batch), plus the bytes of data written."""

    bytes: int = 0


def _write_parts(rows: TableRows, sink: Any) -> None:
    with pq.ParquetWriter(sink, rows.schema, compression="zstd") as writer:
        for part in rows.parts():
            if part.num_rows:
                writer.write_table(part)


def _write_data(path: str, rows: TableRows, properties: Mapping[str, str]) -> int:
    """One data file, whole under its final name: locally through a dot-temp name, fsync and
    rename; on S3 one conditional PUT (If-None-Match: *) of the final key, so no object is
    ever renamed or replaced: a key that exists already is refused by the store. Written
    part by part (the PUT's body from a temporary file), so memory holds one row group."""
    parts = urllib.parse.urlsplit(path)
    if parts.scheme in ("", "file"):
        target = parts.path
        folder, name = target.rsplit("/", 1)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                _write_parts(rows, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return os.stat(target).st_size
    if parts.scheme not in ("s3", "s3a"):
        raise LakeError(f"{path}: the Iceberg lake writes to file:// or s3:// only")
    with tempfile.TemporaryFile() as body:
        _write_parts(rows, body)
        size = body.tell()
        body.seek(0)
        put_once(properties, parts.netloc, parts.path.lstrip("/"), body)
    return size


def put_once(properties: Mapping[str, str], bucket: str, key: str, body: bytes | BinaryIO) -> None:
    """PUT `body` at s3://bucket/key only if no object is there (If-None-Match: *); LakeError
    naming the key when one is. The client is configured as pyiceberg's FileIO is (endpoint,
    region, keys from lake.credentials_file, else the environment's)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=properties.get("s3.endpoint"),
        region_name=properties.get("s3.region"),
        aws_access_key_id=properties.get("s3.access-key-id"),
        aws_secret_access_key=properties.get("s3.secret-access-key"),
        aws_session_token=properties.get("s3.session-token"),
    )
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise LakeError(f"s3://{bucket}/{key} exists already: refused to replace it") from e
        raise LakeError(f"s3://{bucket}/{key}: {e}") from e
    except BotoCoreError as e:
        raise LakeError(f"s3://{bucket}/{key}: {e}") from e


def _fsync_tree(paths: Sequence[str]) -> None:
    """fsync local files written by pyiceberg (metadata, manifest lists, manifests) and
    their folders, before the coordinator makes them current."""
    folders = set()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(os.path.dirname(p))
    for d in sorted(folders):
        fsync_dir(d)


def prepare_batch(
    batch_id: str,
    date: str,
    namespace: str,
    bases: Mapping[str, str],
    rows: BatchRows,
    properties: Mapping[str, str],
) -> Prepared:
    """Write the batch's data files and each table's next metadata file (from `bases`: table
    -> current metadata location); commit nothing. A table whose history already holds the
    batch (BATCH_PROPERTY in a snapshot's summary) gets nothing new. `rows` are closed."""
    missing = [t for t in TABLES if t not in bases]
    if missing:
        rows.close()
        raise LakeError(f"archive of {batch_id}: no metadata location for {', '.join(missing)}")
    catalog = Preparing({f"{namespace}.{t}": bases[t] for t in TABLES}, properties)
    attempt = uuid.uuid4().hex
    out = Prepared()
    written: list[str] = []
    tables: dict[str, Table] = {}
    try:
        for name in TABLES:
            table = catalog.load_table(f"{namespace}.{name}")
            tables[name] = table
            if any(
                s.summary is not None
                and s.summary.additional_properties.get(BATCH_PROPERTY) == batch_id
                for s in table.metadata.snapshots
            ):
                out[name] = (bases[name], "")
                continue
            path = f"{table.metadata.location}/data/day={date}/{batch_id}-{attempt}.parquet"
            out.bytes += _write_data(path, rows[name], properties)
            written.append(path)
            hooks.pause("iceberg_data")  # tests kill the agent here: a data file, no metadata
        register(
            catalog,
            batch_id,
            {n: t for n, t in tables.items() if not out.get(n)},
            {n: next(p for p in written if f"/{n}/data/" in p) for n in tables if not out.get(n)},
            out,
        )
    except LakeError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise LakeError(f"archive of {batch_id} into the Iceberg lake: {e}") from e
    finally:
        rows.close()
    hooks.pause("iceberg_metadata")  # tests kill the agent here: metadata written, unanswered
    return out


def register(
    catalog: Preparing,
    batch_id: str,
    tables: Mapping[str, Table],
    paths: Mapping[str, str],
    out: Prepared,
) -> Prepared:
    """Register each table's data file (`paths`, already whole at its final location) with
    `add_files` (one snapshot per table, BATCH_PROPERTY in its summary) through `catalog`,
    which writes the manifests and the next metadata file and commits nothing; fsync what was
    written on a local warehouse. `out` gets (base, new) per table."""
    for name, table in tables.items():
        tx = table.transaction()
        tx.add_files(
            [paths[name]],
            snapshot_properties={BATCH_PROPERTY: batch_id},
            check_duplicate_files=False,
        )
        tx.commit_transaction()
        out[name] = catalog.staged[table.name()]
    _fsync_tree(
        [p.removeprefix("file://") for p in _new_files(catalog, out) if p.startswith("file:")]
    )
    return out


def _new_files(catalog: Preparing, prepared: Prepared) -> list[str]:
    """The metadata files, manifest lists and manifests the prepared snapshots added."""
    out: list[str] = []
    for _, new in prepared.values():
        if not new:
            continue
        static = StaticTable.from_metadata(new, catalog.properties)
        snap = static.metadata.current_snapshot()
        out.append(new)
        if snap is not None:
            out.append(snap.manifest_list)
            out += [
                m.manifest_path
                for m in snap.manifests(static.io)
                if m.added_snapshot_id == snap.snapshot_id
            ]
    return out
