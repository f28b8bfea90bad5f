"""The rows CSV an aggregating agent writes and the coordinator COPYs into PostgreSQL, checked.

The file lies in the node's tmpfs, or, for an agent in another kernel (`[[node]] remote`), in
the batch's staging folder, where any writer to staging can swap it (or its folder) for a link,
or rewrite it, between the agent's write and the coordinator's COPY. So:

- the agent reports what it wrote (`RowsIdent`: inode, size, mtime_ns, and the SHA-256 of the
  bytes, hashed from the very buffer it wrote), in its `aggregated` reply;
- the coordinator opens the file from the configured root by descriptor, with O_NOFOLLOW for
  every component below it (`roots.Dir`), checks that it is a single-linked regular file of the
  reported size and mtime_ns (and inode, when the agent shares its kernel), and hashes every
  byte it hands to the COPY as it hands it over. At the end of the file, bytes that are not
  the reported ones raise `RowsRefused` inside the COPY's transaction, so none of them is
  committed.

A refusal names the batch and the file; the pipeline aggregates once more (a fresh file), and
a second refusal fails the batch (docs/reliability.md, "A hostile producer").
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from coordinator.core.errors import LinkRefused, RowsRefused
from coordinator.core.roots import Dir

__all__ = ["RowsFile", "RowsIdent", "RowsReader", "ident_of"]


@dataclass(frozen=True)
class RowsIdent:
    """A rows file as its writer left it."""

    inode: int  # as the writer's kernel numbers it
    size: int
    mtime_ns: int
    sha256: str  # hex digest of the whole content


def ident_of(st: os.stat_result, data: bytes) -> RowsIdent:
    """The identity of a file just written with `data` (its fstat after the write)."""
    return RowsIdent(st.st_ino, st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())


class RowsReader:
    """The open rows file, read for the COPY: `read` (what asyncpg calls, in a worker thread)
    hashes what it returns, and at the end of the file raises RowsRefused unless the bytes
    were exactly the reported ones (so the COPY is aborted and its transaction rolled back)."""

    def __init__(self, fd: int, where: str, batch_id: str, expect: RowsIdent) -> None:
        self.fd = fd
        self.where = where
        self.batch_id = batch_id
        self.expect = expect
        self._hash = hashlib.sha256()
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (the rest of the file when `n` < 0); b"" at its end, once checked."""
        if n < 0:
            n = max(self.expect.size - self._read, 0) + 1
        data = os.read(self.fd, n)
        if data:
            self._read += len(data)
            if self._read > self.expect.size:
                raise self._refused(f"grew past the {self.expect.size} bytes the agent wrote")
            self._hash.update(data)
            return data
        if self._read != self.expect.size:
            raise self._refused(f"shrank to {self._read} of the {self.expect.size} bytes written")
        if self._hash.hexdigest() != self.expect.sha256:
            raise self._refused(
                f"content changed after the agent wrote it (sha256 {self._hash.hexdigest()[:16]}…"
                f" != {self.expect.sha256[:16]}… reported)"
            )
        return b""

    def _refused(self, why: str) -> RowsRefused:
        return RowsRefused(f"batch {self.batch_id}: rows file {self.where}: {why}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class RowsFile:
    """Where a batch's rows file is (`root`/`batch_id`/`name`) and what its writer reported.
    `check_inode` is False for an agent in another kernel, whose inodes are its own."""

    root: Path  # a configured root: the node's tmpfs, or staging
    batch_id: str
    name: str
    expect: RowsIdent
    check_inode: bool = True

    @property
    def where(self) -> str:
        return f"{self.root}/{self.batch_id}/{self.name}"

    def open(self) -> RowsReader:
        """Open the file by descriptor (a link at the batch folder or the file is refused) and
        check what fstat can tell; RowsRefused naming the batch and the file otherwise, and
        FileNotFoundError when it is gone. (Blocking: run in a thread.)"""
        try:
            with Dir.open(self.root) as root, root.sub(self.batch_id) as folder:
                fd = folder.open_file(self.name)
        except LinkRefused as e:
            raise RowsRefused(f"batch {self.batch_id}: rows file {self.where}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            problem = self._problem(st)
            if problem:
                raise RowsRefused(f"batch {self.batch_id}: rows file {self.where}: {problem}")
        except BaseException:
            os.close(fd)
            raise
        return RowsReader(fd, self.where, self.batch_id, self.expect)

    def _problem(self, st: os.stat_result) -> str:
        e = self.expect
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_nlink != 1:
            return f"has {st.st_nlink} hard links"
        found = (st.st_ino if self.check_inode else e.inode, st.st_size, st.st_mtime_ns)
        if found != (e.inode, e.size, e.mtime_ns):
            seen = f"inode {found[0]}, size {found[1]}, mtime_ns {found[2]}"
            return (
                f"not the file the agent wrote ({seen} != inode {e.inode}, size {e.size},"
                f" mtime_ns {e.mtime_ns} reported)"
            )
        return ""
