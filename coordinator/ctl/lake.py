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


# -- coordinatorctl lake ------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """'45s', '30m', '12h', '7d' as a timedelta; ValueError naming the value otherwise."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit():
        raise ValueError(f"--older-than {text!r}: expected a number and s, m, h or d (e.g. 7d)")
    return dt.timedelta(seconds=int(number) * _UNITS[unit])


def spec_from_config(path: str, dsn: str = "") -> LakeSpec:
    """The Iceberg lake of a config file; the database from `dsn`, database.dsn, or the
    embedded server running under state_dir. ConfigError when the lake is not Iceberg."""
    from coordinator.core.config import load_config
    from coordinator.core.errors import ConfigError
    from coordinator.core.iceberg import lake_spec

    cfg = load_config(path)
    if cfg.lake.format != "iceberg":
        raise ConfigError(f"{path}: lake.format is {cfg.lake.format!r}; lake commands need iceberg")
    password = ""
    if cfg.database.password_file:
        try:
            with open(cfg.database.password_file) as f:
                password = f.read().strip()
        except OSError as e:
            raise ConfigError(
                f"database.password_file {cfg.database.password_file}: {e.strerror}"
            ) from None
    dsn = dsn or cfg.database.dsn
    if not dsn:
        from pgserver.utils import PostmasterInfo

        pgdata = cfg.paths.state_dir / "pgdata"
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not info.is_running():
            raise ConfigError(
                f"the embedded PostgreSQL under {pgdata} is not running (start coordinatord,"
                " or give --dsn)"
            )
        dsn = info.get_uri()
    return lake_spec(cfg, dsn, password)


def _cli(args: Any) -> int:
    import json
    import sys

    from coordinator.core.errors import ConfigError

    try:
        spec = spec_from_config(args.config, args.dsn or "")
        if args.lake_command == "tables":
            out: Any = tables(spec)
            lines = [
                f"{t['table']:<20} snapshots {t['snapshots']:>4}  files {t['data_files']:>5}"
                f"  rows {t['rows']:>10}  bytes {t['bytes']:>12}  {t['metadata']}"
                for t in out
            ]
        elif args.lake_command == "snapshots":
            out = snapshots(spec, args.table)
            lines = [
                f"{s['snapshot_id']:>20}  {s['at']}  {s['operation']:<9} "
                f"batch {s['batch_id'] or '-'}  +{s['added_rows']} rows"
                for s in out
            ]
        elif args.lake_command == "expire":
            cutoff = dt.datetime.now(dt.UTC) - parse_duration(args.older_than)
            out = expire(spec, cutoff)
            lines = [f"{spec.identifier(t)}: {n} snapshot(s) expired" for t, n in out.items()]
        elif args.lake_command == "compact":
            out = compact(spec, dt.date.fromisoformat(args.day))
            lines = [f"{spec.identifier(t)}: {a} file(s) -> {b}" for t, (a, b) in out.items()]
        else:
            found = orphans(spec, args.min_age_s)
            removed = remove_orphans(spec, found) if args.delete else 0
            out = {
                "orphans": [{"table": o.table, "path": o.path, "size": o.size} for o in found],
                "deleted": removed,
            }
            lines = [f"{o.table}  {o.size:>10}  {o.path}" for o in found]
            lines.append(
                f"{len(found)} orphan(s)" + (f", {removed} deleted" if args.delete else "")
            )
    except (ConfigError, ValueError) as e:
        print(f"coordinatorctl: lake: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str) if args.json else "\n".join(lines))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `lake tables|snapshots|expire|compact|orphans` to coordinatorctl."""
    p = subparsers.add_parser("lake", help="the Iceberg lake: tables, snapshots, maintenance")
    p.add_argument("--config", default="/etc/numa-coordinator/coordinator.toml")
    p.add_argument("--dsn", help="the ledger's PostgreSQL (default: database.dsn, or embedded)")
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="lake_command", required=True)
    sub.add_parser("tables", help="each table: snapshots, files, rows, bytes")
    s = sub.add_parser("snapshots", help="a table's snapshots and the batch each appended")
    s.add_argument("table", choices=TABLES)
    s = sub.add_parser("expire", help="expire snapshots older than a duration")
    s.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 30m")
    s = sub.add_parser("compact", help="rewrite a day's small files into larger ones")
    s.add_argument("--day", required=True, help="YYYY-MM-DD")
    s = sub.add_parser("orphans", help="files no snapshot names; --delete removes them")
    s.add_argument("--min-age-s", type=float, default=3600.0)
    s.add_argument("--delete", action="store_true")
    p.set_defaults(func=_cli)
