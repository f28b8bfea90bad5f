"""The file barrier's I/O edge: the watcher on the staging folder (the scanner that decides what
counts is `coordinator.daemon.scanner`): inotify, watchfiles, or a plain poll (the notify
backend's LISTEN is `coordinator.daemon.listen`).

The watcher is armed (inotify watches in place) *before* the first listing, so a file that lands
between the two is seen by one or the other. Events only say "look at this batch again"; what
counts is decided by scanning the folder, so a lost event costs latency, never a batch, and a
periodic reconciliation scan catches whatever the events missed.
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus
from watchfiles._rust_notify import RustNotify

from coordinator.core.config import BarrierConfig
from coordinator.daemon.scanner import Stats

log = structlog.get_logger("coordinator.daemon.watch")


class Rescan(enum.Enum):
    """Marks that stand for more than one batch id in what the watcher reports."""

    STAGING = "staging"  # look at every folder in staging (start, reload, lost events)
    RECONCILE = "reconcile"  # the periodic reconciliation: the same, and counted as such


RESCAN = Rescan.STAGING


def batch_of(staging: Path, path: str) -> str | None:
    """The batch id an event path belongs to, or None (staging itself, quarantine, temp)."""
    try:
        rel = Path(path).relative_to(staging)
    except ValueError:
        return None
    if not rel.parts:
        return None
    head = rel.parts[0]
    if head.startswith("."):
        return None
    return head


# inotify(7): the events that can change what a scan finds. A batch folder's own files come
# in by rename (IN_MOVED_TO) or are written in place (IN_CLOSE_WRITE); removals and renames
# away matter for rewrites and quarantine.
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
ROOT_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ONLYDIR | IN_DONT_FOLLOW
BATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
)
_EVENT = struct.Struct("iIII")


class Inotify:
    """An inotify instance watching STAGING and each batch folder in it (two levels: batch
    folders are flat). Its fd is non-blocking and is waited on by the event loop itself, so
    an event costs one wake-up and an idle staging folder costs nothing."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.folders: dict[int, str] = {}  # wd -> batch id
        try:
            self.root = self._add(staging, ROOT_MASK)
        except OSError:
            os.close(self.fd)
            raise

    def _add(self, path: Path, mask: int) -> int:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def add_batch(self, name: str) -> None:
        """Watch one batch folder (a folder that vanished or is not a folder is skipped)."""
        try:
            self.folders[self._add(self.staging / name, BATCH_MASK)] = name
        except OSError:
            pass  # gone already, or not a folder: the scan says what it is

    def add_existing(self) -> None:
        """Watch every batch folder already in staging (after arming the root watch)."""
        try:
            entries = list(os.scandir(self.staging))
        except OSError:
            return
        for e in entries:
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
                self.add_batch(e.name)

    def read(self) -> tuple[set[str | Rescan], int]:
        """Drain the pending events: the batch ids they touch (with RESCAN after a queue
        overflow) and how many events there were."""
        ids: set[str | Rescan] = set()
        count = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return ids, count
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, n = _EVENT.unpack_from(data, pos)
                name = (
                    data[pos + _EVENT.size : pos + _EVENT.size + n]
                    .rstrip(b"\0")
                    .decode(errors="surrogateescape")
                )
                pos += _EVENT.size + n
                count += 1
                if mask & IN_Q_OVERFLOW:
                    ids.add(RESCAN)
                elif mask & IN_IGNORED:
                    self.folders.pop(wd, None)
                elif wd == self.root:
                    if name and not name.startswith("."):
                        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                            self.add_batch(name)
                        ids.add(name)
                elif (batch := self.folders.get(wd)) is not None and not name.startswith("."):
                    ids.add(batch)

    def close(self) -> None:
        """Drop every watch."""
        os.close(self.fd)


async def watch(
    staging: Path,
    cfg: BarrierConfig,
    on_batches: Callable[[set[str | Rescan]], None],
    stats: Stats,
    *,
    task_status: TaskStatus[None],
) -> None:
    """Watch staging and report the batch ids whose folders changed.

    Signals started only once the inotify watches are in place. If the watcher fails it is
    re-created (and a full rescan requested by reporting every folder). Temp files (names
    starting with '.') wake nothing.
    """
    started = False
    while True:
        try:
            ino = Inotify(staging)
            ino.add_existing()
        except OSError as e:
            log.error("cannot arm watcher, retrying", staging=str(staging), error=str(e))
            await anyio.sleep(1.0)
            continue
        stats.armed = True
        if not started:
            task_status.started()
            started = True
        else:
            stats.watcher_restarts += 1
            on_batches({RESCAN})
        try:
            while True:
                await anyio.wait_readable(ino.fd)
                ids, count = ino.read()
                stats.events += count
                stats.last_event = time.time()
                if RESCAN in ids:
                    # The kernel's queue overflowed and events were lost: look at everything
                    # now, as the reconciliation scan would at its next turn.
                    log.warning("inotify queue overflowed; rescanning staging")
                    stats.reconcile_scans += 1
                    stats.last_reconcile = stats.last_event
                if ids:
                    on_batches(ids)
        except OSError as e:
            stats.armed = False
            log.error("watcher failed, re-creating it", error=f"{type(e).__name__}: {e}")
            await anyio.sleep(0.2)
        finally:
            ino.close()


async def watch_watchfiles(
    staging: Path,
    cfg: BarrierConfig,
    on_batches: Callable[[set[str | Rescan]], None],
    stats: Stats,
    *,
    task_status: TaskStatus[None],
) -> None:
    """The watchfiles backend (`barrier.backend = "watchfiles"`): the same contract as
    `watch`, through watchfiles' Rust notify thread, which polls its queue every `step_ms` and
    groups events for up to `debounce_ms` — a few ms more latency and a wake-up every step
    even when idle (docs/benchmarks.md)."""
    started = False
    while True:
        stop = threading.Event()
        try:
            notify = RustNotify([str(staging)], False, False, 50, True, False)
        except OSError as e:
            log.error("cannot arm watcher, retrying", staging=str(staging), error=str(e))
            await anyio.sleep(1.0)
            continue
        stats.armed = True
        if not started:
            task_status.started()
            started = True
        else:
            stats.watcher_restarts += 1
            on_batches({RESCAN})
        try:
            while True:
                changes = await anyio.to_thread.run_sync(
                    notify.watch,
                    cfg.debounce_ms,
                    cfg.step_ms,
                    1000,
                    stop,
                    abandon_on_cancel=True,
                )
                if isinstance(changes, str):
                    if changes == "stop":
                        return
                    continue  # timeout or signal: go round
                stats.events += len(changes)
                stats.last_event = time.time()
                ids: set[str | Rescan] = {
                    b for _, p in changes if (b := batch_of(staging, p)) is not None
                }
                if ids:
                    on_batches(ids)
        except Exception as e:  # the Rust side raises its own error types
            stats.armed = False
            log.error("watcher failed, re-creating it", error=f"{type(e).__name__}: {e}")
            await anyio.sleep(0.2)
        finally:
            stop.set()


async def poll(
    config: Callable[[], BarrierConfig],
    on_batches: Callable[[set[str | Rescan]], None],
    stats: Stats,
    *,
    task_status: TaskStatus[None],
) -> None:
    """The poll backend (`barrier.backend = "poll"`): no events at all, a look at every folder
    in staging every `barrier.poll_s` (read at each turn, so a reload changes it), for a folder
    that delivers no events and producers that do not announce. `stats.events` stays 0: a turn
    is not an event."""
    stats.armed = True
    task_status.started()
    while True:
        await anyio.sleep(config().poll_s)
        on_batches({RESCAN})
