"""The SLM publishing SDK: how a model puts its result into staging, and how results are read back.

Publishing is atomic (docs/protocol.md, "The staging contract"): the table is written to
`.<name>.tmp` in the batch folder, fsynced, renamed to its final name, and the folder is fsynced,
so the coordinator never sees a half-written file under a final name.

A publish may then be announced to a coordinator that cannot hear the write (staging on another
host's NFS export, a VM guest's shared folder): a PostgreSQL NOTIFY on the schema's channel
(`notify=`, `agents.notifier`; docs/protocol.md, "Announcing a publish"). The announcement
never fails a publish.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pyarrow as pa

from agents.notifier import Announcer, PgNotifier, resolve
from coordinator.core.errors import BatchFinishedError
from coordinator.core.files import (
    RESULT_COLUMNS,
    check_name,
    check_parquet,
    fsync_dir,
    is_sorted_by_id,
    read_result,
    read_result_at,
    read_results,
    write_options,
    write_parquet_at,
    write_parquet_atomic,
)
from coordinator.core.roots import Dir

log = logging.getLogger("agents.slm")

# The SDK: publish and publish_crosscheck, and the readers and writers they are made of.
__all__ = [
    "RESULT_COLUMNS",
    "BatchFinishedError",
    "PgNotifier",
    "check_name",
    "check_parquet",
    "fsync_dir",
    "publish",
    "publish_crosscheck",
    "read_result",
    "read_result_at",
    "read_results",
    "sorted_by_id",
    "write_options",
    "write_parquet_at",
    "write_parquet_atomic",
]


def publish(
    staging: str | os.PathLike[str],
    batch_id: str,
    model: str,
    table: pa.Table,
    *,
    compression: str = "zstd",
    level: int | None = 3,
    notify: str | Announcer | bool | None = None,
) -> Path:
    """Publish one model's result for a batch into staging, atomically; return the final path.

    Raises BatchFinishedError when the coordinator removed the batch's folder while the file
    was written (it does that only to a finished batch), and LinkRefused (an OSError) when the
    batch folder is a symbolic link: nothing is written through a link.

    `notify` announces the publish once the file is in place (`agents.notifier.resolve`):
    None (the default) announces where $NUMA_COORDINATOR_NOTIFY_DSN is set (the schema in
    $NUMA_COORDINATOR_NOTIFY_SCHEMA, default numa_coordinator); False never; a DSN string on
    that database; a `PgNotifier` (reusable: one connection for many publishes) or any callable
    of (batch_id, model, size) is called. A failed announcement is logged, never raised.
    """
    check_name("batch_id", batch_id)
    check_name("model", model)
    missing = [c for c in RESULT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"model {model}: result table lacks column(s) {missing}")
    announcer = resolve(notify)  # a bad argument fails before anything is written
    table = sorted_by_id(table)
    name = f"{model}.parquet"
    with Dir.open(staging, create=True) as root:
        try:
            os.mkdir(batch_id, 0o770, dir_fd=root.fd)
            created = True
        except FileExistsError:
            created = False
        try:
            folder = root.sub(batch_id)
        except FileNotFoundError as e:  # made, and removed at once as a finished batch's
            raise _finished(staging, batch_id, model) from e
        if created:
            # The agents (the service's group) write their cross-check files into it, whatever
            # this producer's umask: group rwx, and the setgid bit staging has, so the group
            # stays the service's.
            os.fchmod(folder.fd, 0o770 | (os.fstat(root.fd).st_mode & stat.S_ISGID))
        with folder:
            try:
                st = write_parquet_at(
                    folder, name, table, compression=compression, level=level, sorted_by_id=True
                )
            except FileNotFoundError as e:
                raise _finished(staging, batch_id, model) from e
            if folder.gone:
                # Renamed into a folder that was being removed: the coordinator took it away
                # with the rest of a finished batch (into its quarantine).
                raise _finished(staging, batch_id, model)
        if created:  # after the file, so the folder is not left empty for that long
            root.fsync()
    if announcer is not None:
        _announce(announcer, batch_id, model, st.st_size)
    return Path(staging) / batch_id / name


def sorted_by_id(table: pa.Table) -> pa.Table:
    """The table in ascending item_id order (as it is, when it already is): the file then says
    so in its sorting metadata, and an agent short of memory reads it range by range of ids,
    each range from its own row groups, rather than passing over the whole file for each."""
    if "item_id" not in table.column_names or is_sorted_by_id(table):
        return table
    # Arrow sorts and takes no string_view column: those are written as plain strings.
    for i, f in enumerate(table.schema):
        if pa.types.is_string_view(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return table.sort_by("item_id")


def _announce(announcer: Announcer, batch_id: str, model: str, size: int) -> None:
    """Announce a publish that is done: whatever goes wrong is logged, never raised (the file
    is published; the coordinator's scan finds it)."""
    try:
        announcer(batch_id, model, size)
    except Exception as e:
        log.warning(
            "announcing %s/%s failed (the file is published; the coordinator's scan finds "
            "it): %s: %s",
            batch_id,
            model,
            type(e).__name__,
            e,
        )


def _finished(staging: str | os.PathLike[str], batch_id: str, model: str) -> BatchFinishedError:
    return BatchFinishedError(
        f"batch {batch_id} is finished: the coordinator removed {Path(staging) / batch_id} "
        f"while {model}'s result was being published, so it was not taken (a finished batch "
        "is never used twice; publish under a new batch id)"
    )


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
    name = f"crosscheck_{model}.parquet"
    table = sorted_by_id(table)
    with Dir.open(staging) as root, root.sub(batch_id) as folder:
        write_parquet_at(
            folder, name, table, compression=compression, level=level, sorted_by_id=True
        )
    return Path(staging) / batch_id / name
