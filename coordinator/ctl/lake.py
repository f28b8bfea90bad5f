"""`coordinatorctl lake`: the Iceberg lake's tables, snapshots, expiry, compaction and orphans
(docs/lake.md, "Maintenance"). Works on the catalog and the warehouse directly (pyiceberg's SQL
catalog in the ledger's PostgreSQL); the coordinator need not run. Every change is a catalog
compare-and-set like the coordinator's own commits: one that loses to a concurrent batch commit
fails and can be run again, and the coordinator's commit that loses prepares again.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from coordinator.core.iceberg import BATCH_PROPERTY, TABLES, LakeSpec, open_catalog

__all__ = ["compact", "expire", "orphans", "remove_orphans", "snapshots", "tables"]


@contextmanager
def _catalog(spec: LakeSpec) -> Iterator[Any]:
    catalog = open_catalog(spec)
    try:
        yield catalog
    finally:
        catalog.engine.dispose()


def tables(spec: LakeSpec) -> list[dict[str, Any]]:
    """Each table: name, metadata location, snapshots, data files, rows, bytes."""
    out = []
    with _catalog(spec) as catalog:
        for name in TABLES:
            t = catalog.load_table(spec.identifier(name))
            snap = t.current_snapshot()
            summary = snap.summary.additional_properties if snap and snap.summary else {}
            out.append(
                {
                    "table": spec.identifier(name),
                    "location": t.metadata.location,
                    "metadata": t.metadata_location,
                    "snapshots": len(t.metadata.snapshots),
                    "data_files": int(summary.get("total-data-files", 0)),
                    "rows": int(summary.get("total-records", 0)),
                    "bytes": int(summary.get("total-files-size", 0)),
                }
            )
    return out


def snapshots(spec: LakeSpec, table: str) -> list[dict[str, Any]]:
    """A table's snapshots, oldest first: id, time, operation, the batch it appended."""
    if table not in TABLES:
        raise ValueError(f"lake snapshots: no table {table!r} (tables: {', '.join(TABLES)})")
    with _catalog(spec) as catalog:
        t = catalog.load_table(spec.identifier(table))
        out = []
        for s in t.metadata.snapshots:
            props = s.summary.additional_properties if s.summary else {}
            out.append(
                {
                    "snapshot_id": s.snapshot_id,
                    "at": dt.datetime.fromtimestamp(s.timestamp_ms / 1000, dt.UTC).isoformat(),
                    "operation": s.summary.operation.value if s.summary else "",
                    "batch_id": props.get(BATCH_PROPERTY, ""),
                    "added_rows": int(props.get("added-records", 0)),
                }
            )
        return out


def expire(spec: LakeSpec, older_than: dt.datetime) -> dict[str, int]:
    """Expire every table's snapshots older than `older_than` (never the current one); their
    files that no snapshot names any more are then orphans. Return table -> expired."""
    out: dict[str, int] = {}
    with _catalog(spec) as catalog:
        for name in TABLES:
            t = catalog.load_table(spec.identifier(name))
            current = t.current_snapshot()
            old = [
                s.snapshot_id
                for s in t.metadata.snapshots
                if s.timestamp_ms < older_than.timestamp() * 1000
                and (current is None or s.snapshot_id != current.snapshot_id)
            ]
            if old:
                t.maintenance.expire_snapshots().by_ids(old).commit()
            out[name] = len(old)
    return out


def compact(spec: LakeSpec, day: dt.date) -> dict[str, tuple[int, int]]:
    """Rewrite each table's files of `day` into as few files as pyiceberg's writer makes
    (one per 512 MB): an overwrite of that day's partition with the same rows, in one snapshot
    per table. Return table -> (files before, files after)."""
    out: dict[str, tuple[int, int]] = {}
    with _catalog(spec) as catalog:
        for name in TABLES:
            t = catalog.load_table(spec.identifier(name))
            where = f"day == '{day.isoformat()}'"
            before = len(list(t.scan(row_filter=where).plan_files()))
            if before <= 1:
                out[name] = (before, before)
                continue
            rows = t.scan(row_filter=where).to_arrow()
            t.overwrite(
                rows,
                overwrite_filter=where,
                snapshot_properties={"numa.compacted-day": day.isoformat()},
            )
            t = catalog.load_table(spec.identifier(name))
            out[name] = (before, len(list(t.scan(row_filter=where).plan_files())))
    return out


@dataclass(frozen=True)
class Orphan:
    """A file under a table's location that no snapshot or metadata entry names."""

    table: str
    path: str
    size: int


def _fs(location: str, spec: LakeSpec) -> tuple[pafs.FileSystem, str]:
    parts = urllib.parse.urlsplit(location)
    if parts.scheme in ("", "file"):
        return pafs.LocalFileSystem(), parts.path
    props = spec.io_properties
    endpoint = urllib.parse.urlsplit(props.get("s3.endpoint", ""))
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint.netloc or None,
        scheme=endpoint.scheme or "https",
        region=props.get("s3.region"),
        access_key=props.get("s3.access-key-id"),
        secret_key=props.get("s3.secret-access-key"),
        session_token=props.get("s3.session-token"),
    )
    return fs, f"{parts.netloc}{parts.path}"


def _strip(path: str) -> str:
    parts = urllib.parse.urlsplit(path)
    return parts.path if parts.scheme in ("", "file") else f"{parts.netloc}{parts.path}"


def orphans(spec: LakeSpec, min_age_s: float = 0.0) -> list[Orphan]:
    """Files under the tables' locations that neither the current metadata, nor a metadata
    file it lists, nor a snapshot's manifest list, manifests and data files name: what a
    crashed or lost attempt left, and what expired snapshots left behind. Only files older
    than `min_age_s`: a batch being archived has written files that no snapshot names yet."""
    now = dt.datetime.now(dt.UTC)
    out: list[Orphan] = []
    with _catalog(spec) as catalog:
        for name in TABLES:
            t = catalog.load_table(spec.identifier(name))
            named = {_strip(str(t.metadata_location))}
            named |= {_strip(e.metadata_file) for e in t.metadata.metadata_log}
            for s in t.metadata.snapshots:
                named.add(_strip(s.manifest_list))
                for m in s.manifests(t.io):
                    named.add(_strip(m.manifest_path))
                    for entry in m.fetch_manifest_entry(t.io, discard_deleted=False):
                        named.add(_strip(entry.data_file.file_path))
            fs, root = _fs(t.metadata.location, spec)
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
            for info in infos:
                if info.type != pafs.FileType.File or info.path in named:
                    continue
                mtime = info.mtime
                if mtime is not None and mtime.tzinfo is None:
                    mtime = mtime.replace(tzinfo=dt.UTC)
                if min_age_s and mtime is not None and (now - mtime).total_seconds() < min_age_s:
                    continue
                out.append(Orphan(spec.identifier(name), info.path, int(info.size or 0)))
    return sorted(out, key=lambda o: (o.table, o.path))


def remove_orphans(spec: LakeSpec, found: list[Orphan]) -> int:
    """Delete the given orphans (listed by `orphans` just before); return how many."""
    n = 0
    for o in found:
        fs, _ = _fs(spec.warehouse, spec)
        fs.delete_file(o.path)
        n += 1
    return n
