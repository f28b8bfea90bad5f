"""The batch-folder scanner and the quarantine: what a look at one batch folder finds, and
where the files that must not count go.

Everything is reached from the staging folder's descriptor (`coordinator.core.roots`): a link at any
level is reported and never followed, and no error about one name escapes: it is that name's
verdict (rejected, unreadable, gone, not moved), never the daemon's end.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from coordinator.core.batch import FileEntry, classify
from coordinator.core.config import NAME_RE
from coordinator.core.errors import ParquetError
from coordinator.core.files import check_parquet
from coordinator.core.roots import Dir, LinkRefused, Root, fd_path, fit_name

log = structlog.get_logger("coordinator.daemon.scanner")

QUARANTINE = ".quarantine"


@dataclass
class Scan:
    """One look at a batch folder."""

    batch_id: str
    exists: bool
    results: dict[str, FileEntry] = field(default_factory=dict)  # model -> entry
    crosschecks: dict[str, FileEntry] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    settled_bad: list[tuple[str, str]] = field(default_factory=list)  # unreadable, unchanged

    def valid_models(self) -> list[str]:
        """Models whose result file counts."""
        return [m for m, e in self.results.items() if e.valid]

    def valid_crosschecks(self) -> list[str]:
        """Models whose cross-check file counts."""
        return [m for m, e in self.crosschecks.items() if e.valid]

    def counted_crosschecks(
        self, models: Iterable[str], counted: Mapping[str, tuple[int, int, int]]
    ) -> list[str]:
        """The second barrier: of `models`, those whose cross-check file is valid and, where
        its agent reported the file it wrote (`counted`), is that very file."""
        return [
            m
            for m in models
            if (e := self.crosschecks.get(m)) is not None
            and e.valid
            and (m not in counted or e.ident == counted[m])
        ]


@dataclass
class Stats:
    """Counters status shows about the barrier."""

    armed: bool = False
    events: int = 0
    last_event: float = 0.0
    reconcile_scans: int = 0  # reconciliation passes begun
    reconciled: int = 0  # reconciliation passes whose every look has completed
    last_reconcile: float = 0.0
    recovered_by_reconcile: int = 0
    watcher_restarts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> count
    quarantine_failed: int = 0  # files that could not be moved (each logged)
    quarantine_refused: str = ""  # why the quarantine folder is unusable now ("" when fine)
    scan_errors: int = 0  # looks at a batch that raised (logged; the batch is looked at again)


class Scanner:
    """Looks at batch folders; remembers which files it already validated (by inode, size and
    mtime) so a rescan does not re-read footers.

    Everything is reached from the staging folder's descriptor (`coordinator.core.roots`): a link
    at any level is reported and never followed, and no error about one name escapes: it is
    that name's verdict (rejected, unreadable, gone), never the daemon's end.
    """

    def __init__(self, staging: Path, settle_s: float = 5.0) -> None:
        self.staging = staging
        self.root = Root(staging)
        self.settle_s = settle_s
        self._checked: dict[tuple[str, str], tuple[tuple[int, int, int], FileEntry]] = {}
        self._bad_since: dict[tuple[str, str, tuple[int, int, int]], float] = {}
        self.stats = Stats()
        self._seen_rejects: set[tuple[str, str]] = set()

    def batch_ids(self) -> list[str]:
        """Batch folders in staging, rejecting bad names and non-folders."""
        out: list[str] = []
        try:
            entries = self.root.dir().entries()
        except FileNotFoundError:
            return out
        except OSError as err:  # staging itself unreadable: said, and tried again next time
            self.stats.scan_errors += 1
            log.error("cannot list staging", staging=str(self.staging), error=str(err))
            return out
        for e in entries:
            if e.name.startswith("."):
                continue
            if not NAME_RE.fullmatch(e.name):
                self._reject("", e.name, "bad batch folder name")
                continue
            try:
                folder = e.is_dir(follow_symlinks=False)
            except OSError:
                continue  # gone while we looked
            if not folder:
                self._reject("", e.name, NOT_A_FOLDER)
                continue
            out.append(e.name)
        return sorted(out)

    def is_folder(self, batch_id: str) -> bool:
        """True if staging holds a real folder (not a link) of that name."""
        try:
            return stat.S_ISDIR(self.root.dir().lstat(batch_id).st_mode)
        except (OSError, ValueError):
            return False

    def _reject(self, batch_id: str, name: str, reason: str) -> None:
        key = (batch_id, name)
        if key in self._seen_rejects:
            return
        self._seen_rejects.add(key)
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        log.warning("ignored in staging", batch_id=batch_id or None, name=name, reason=reason)

    def _open_batch(self, batch_id: str) -> Dir | None:
        """The batch folder, or None (gone, a link, not a folder: each reported once)."""
        try:
            return self.root.sub(batch_id)
        except FileNotFoundError:
            return None
        except LinkRefused:
            self._reject("", batch_id, NOT_A_FOLDER)
        except OSError as e:
            reason = NOT_A_FOLDER if e.errno == errno.ENOTDIR else f"unreadable folder: {e}"
            self._reject("", batch_id, reason)
        return None

    def scan(self, batch_id: str, models: Iterable[str]) -> Scan:
        """Classify and validate every file of one batch folder (blocking: run in a thread)."""
        # The same checks as batch_ids: an event can name any path under staging.
        if not NAME_RE.fullmatch(batch_id):
            self._reject("", batch_id, "bad batch folder name")
            return Scan(batch_id, exists=False)
        folder = self._open_batch(batch_id)
        if folder is None:
            return Scan(batch_id, exists=False)
        with folder:
            try:
                names = folder.names()
            except OSError:
                return Scan(batch_id, exists=False)
            out = Scan(batch_id, exists=True)
            roles, ignored = classify(names, models)
            for name, reason in ignored:
                self._reject(batch_id, name, reason)
                out.rejected.append((name, reason))
            for name, role in roles.items():
                entry = self._check(batch_id, folder, name)
                if entry is None:
                    continue
                self._note(out, batch_id, name, entry)
                model = name.removesuffix(".parquet").removeprefix("crosscheck_")
                if role == "crosscheck":
                    out.crosschecks[model] = entry
                else:
                    out.results[model] = entry
        return out

    def _note(self, out: Scan, batch_id: str, name: str, entry: FileEntry) -> None:
        if entry.valid:
            return
        if entry.reason.startswith("rejected:"):
            self._reject(batch_id, name, entry.reason.removeprefix("rejected: "))
            out.rejected.append((name, entry.reason))
            return
        # Unreadable: perhaps still being written in place. Once unchanged for settle_s it is
        # taken to be corrupt and quarantined.
        key = (batch_id, name, entry.ident)
        first = self._bad_since.setdefault(key, time.monotonic())
        if time.monotonic() - first >= self.settle_s:
            out.settled_bad.append((name, entry.reason))

    def _check(self, batch_id: str, folder: Dir, name: str) -> FileEntry | None:
        try:
            st = folder.lstat(name)
        except FileNotFoundError:
            return None
        except OSError as e:
            return FileEntry(name, False, 0, f"rejected: cannot look at it: {e.strerror}")
        verdict = _kind(st)
        if verdict:
            return FileEntry(name, False, 0, verdict)
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        key = (batch_id, name)
        cached = self._checked.get(key)
        if cached is not None and cached[0] == ident:
            return cached[1]
        try:
            fd = folder.open_file(name)
        except FileNotFoundError:
            return None
        except LinkRefused:  # swapped for a link since the lstat
            return FileEntry(name, False, 0, f"rejected: {LINK}")
        except OSError as e:
            # EACCES and the like: unreadable, like a corrupt file (quarantined once settled).
            return FileEntry(name, False, st.st_size, f"unreadable: {e.strerror}", ident=ident)
        try:
            # What is validated is the open file: its identity is the descriptor's, so a
            # rename between the lstat and the open cannot pass one file off as another.
            try:
                st = os.fstat(fd)
            except OSError as e:
                return FileEntry(name, False, st.st_size, f"unreadable: {e.strerror}", ident=ident)
            verdict = _kind(st)
            if verdict:
                return FileEntry(name, False, 0, verdict)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            try:
                check_parquet(fd_path(fd))
                entry = FileEntry(name, True, st.st_size, ident=ident)
            except ParquetError as e:
                entry = FileEntry(
                    name, False, st.st_size, str(e).replace(fd_path(fd), name), ident=ident
                )
        finally:
            os.close(fd)
        self._checked[key] = (ident, entry)
        return entry

    def forget(self, batch_id: str) -> None:
        """Drop cached checks of a finished batch."""
        for key in [k for k in self._checked if k[0] == batch_id]:
            del self._checked[key]
        self._seen_rejects = {k for k in self._seen_rejects if k[0] != batch_id}
        self._bad_since = {k: v for k, v in self._bad_since.items() if k[0] != batch_id}

    def _quarantine_dir(self, batch_id: str) -> Dir | None:
        """STAGING/.quarantine/<batch>, made if missing; None (said loudly, and shown in
        status) when either is a link or cannot be made."""
        try:
            with self.root.dir().sub(QUARANTINE, create=True, mode=0o750) as q:
                d = q.sub(batch_id, create=True, mode=0o750)
        except OSError as e:
            why = f"cannot use {self.staging / QUARANTINE}: {e.strerror or e}"
            if isinstance(e, LinkRefused):
                why = f"refusing {e.where}: a symbolic link, never followed; remove it"
            if self.stats.quarantine_refused != why:
                log.error("quarantine refused; files stay where they are", reason=why)
            self.stats.quarantine_refused = why
            return None
        if self.stats.quarantine_refused:
            log.info("quarantine usable again", folder=str(self.staging / QUARANTINE))
        self.stats.quarantine_refused = ""
        return d

    def quarantine(self, batch_id: str, name: str, reason: str) -> str | None:
        """Move a file (a link moves as a link) out of the batch into
        STAGING/.quarantine/<batch>/ with a reason file; return its new name, or None when it
        was gone or could not be moved (logged). Never raises for one file."""
        folder = self._open_batch(batch_id)
        if folder is None:
            return None
        with folder:
            return self._quarantine_from(folder, batch_id, name, reason)

    def _quarantine_from(self, folder: Dir, batch_id: str, name: str, reason: str) -> str | None:
        q = self._quarantine_dir(batch_id)
        if q is None:
            return None
        with q:
            try:
                # `<name>.<time_ns>` and `<that>.reason` must fit NAME_MAX: a long name is cut
                # and disambiguated by a hash; the original name is in the reason file.
                dest = fit_name(name, f".{time.time_ns()}", q.name_max() - len(".reason"))
                folder.rename(name, q, dest)
            except FileNotFoundError:
                return None
            except OSError as e:
                self.stats.quarantine_failed += 1
                log.error(
                    "could not quarantine; the file stays",
                    batch_id=batch_id,
                    name=name,
                    reason=reason,
                    error=str(e),
                )
                return None
            self._write_reason(q, dest, name, reason)
            try:
                q.fsync()
                folder.fsync()
            except OSError as e:
                log.warning("fsync after quarantine failed", batch_id=batch_id, error=str(e))
        label = reason.split(":")[0]
        self.stats.quarantined[label] = self.stats.quarantined.get(label, 0) + 1
        self._checked.pop((batch_id, name), None)
        log.warning(
            "quarantined",
            batch_id=batch_id,
            name=name,
            reason=reason,
            to=str(self.staging / QUARANTINE / batch_id / dest),
        )
        return dest

    @staticmethod
    def _write_reason(q: Dir, dest: str, name: str, reason: str) -> None:
        text = f"{reason}\nname: {name}\n".encode(errors="backslashreplace")
        try:
            fd = q.open_file(dest + ".reason", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        except OSError as e:
            log.error("could not write a quarantine reason", file=dest, error=str(e))
            return
        try:
            os.write(fd, text)
            os.fsync(fd)
        except OSError as e:
            log.error("could not write a quarantine reason", file=dest, error=str(e))
        finally:
            os.close(fd)

    def quarantine_batch(self, batch_id: str, reason: str) -> int:
        """Move every file of a batch folder into the quarantine and remove the folder (a
        batch published again after it finished); return how many files moved. A link in the
        folder's place is reported and left alone."""
        folder = self._open_batch(batch_id)
        if folder is None:
            return 0
        moved = 0
        with folder:
            try:
                names = folder.names()
            except OSError:
                return 0
            for name in names:
                if not name.startswith("."):
                    moved += self._quarantine_from(folder, batch_id, name, reason) is not None
        try:
            self.root.dir().rmdir(batch_id)
        except OSError:
            pass  # a temp file is still being written (the next look moves the rest), or gone
        return moved

    def remove_batch(self, batch_id: str) -> None:
        """Remove a finished batch's folder from staging (never through a link) and make that
        durable. A link in its place is reported and left."""
        try:
            root = self.root.dir()
            root.rmtree(batch_id)
            root.fsync()
        except LinkRefused:
            self._reject("", batch_id, NOT_A_FOLDER)
        except OSError as e:
            log.warning("could not remove the batch folder", batch_id=batch_id, error=str(e))


LINK = "symlink (never followed)"
NOT_A_FOLDER = "not a folder (symlinks are never followed)"


def _kind(st: os.stat_result) -> str:
    """Why an entry cannot be a batch file ('' when it can): a link, a non-regular file, a
    file with more than one link (its content could change under another name)."""
    if stat.S_ISLNK(st.st_mode):
        return f"rejected: {LINK}"
    if not stat.S_ISREG(st.st_mode):
        return "rejected: not a regular file"
    if st.st_nlink != 1:
        return "rejected: hard link (more than one link)"
    return ""
