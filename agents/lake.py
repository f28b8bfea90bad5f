"""The data lake (cold tier), through pyarrow.fs so an object-store URI works like a local path.

Layout: LAKE/batches/date=YYYY-MM-DD/batch=<batch_id>/ holding the models' files, the cross-check
files and aggregates.parquet. Each file is written under a dot-temp name and moved into place;
on a local filesystem it is fsynced before the rename and the folder after it.

On a local filesystem the copies are made by the kernel (copy_file_range, sendfile as a
fallback), so no byte passes through Python and the worker thread holds the GIL for none of the
copy; each copy's writeback is started as soon as it is written, and the fsyncs come after the
last one, so the disk writes one file while the next is copied. That is what lets the archive
keep up with `cp` + `sync` (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import pyarrow as pa
import pyarrow.fs as pafs

from coordinator.core.errors import LakeError
from coordinator.core.lake_paths import batch_path, lake_root

CHUNK = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
_FALLBACK = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: the fsync at the end does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return cast("Callable[[int, int, int, int], int]", fn)


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting for them."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def copy_fd(fd_in: int, fd_out: int) -> int:
    """Copy the open file `fd_in`, from its start, into `fd_out` in the kernel; return the
    bytes copied (explicit offsets: the source descriptor's position is left alone)."""
    size = os.fstat(fd_in).st_size
    done = 0
    use_cfr = True
    while done < size:
        if use_cfr:
            try:
                n = os.copy_file_range(fd_in, fd_out, size - done, done)
            except OSError as e:
                if e.errno not in _FALLBACK:
                    raise
                use_cfr = False
                continue
        else:
            n = os.sendfile(fd_out, fd_in, done, size - done)
        if n == 0:
            break  # the source shrank: what was there is copied
        done += n
    return done


class Lake:
    """Writes archived batches into the lake."""

    def __init__(self, uri: str) -> None:
        self.fs, self.root = lake_root(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def batch_path(self, batch_id: str, date: str) -> str:
        """Where a batch lives in the lake."""
        return batch_path(self.root, batch_id, date)

    def archive(self, batch_id: str, date: str, files: Sequence[Path]) -> tuple[str, int]:
        """`archive_fds` of the files at these paths (each opened once, never through a link
        in its last component)."""
        fds: list[tuple[str, int]] = []
        try:
            for src in files:
                try:
                    fds.append((src.name, os.open(src, _READ)))
                except OSError as e:
                    raise LakeError(f"lake: cannot read {src}: {e.strerror}") from e
            return self.archive_fds(batch_id, date, fds)
        finally:
            for _, fd in fds:
                os.close(fd)

    def archive_fds(
        self, batch_id: str, date: str, sources: Sequence[tuple[str, int]]
    ) -> tuple[str, int]:
        """Copy the open files `sources` ((name, descriptor) pairs: what the caller verified)
        into the batch's lake folder; return the folder and bytes written. Each file appears
        whole (temp name, fsync, rename) and in the given order, so the last one
        (aggregates.parquet) says the folder is complete. Re-running it rewrites the same
        files (it is idempotent)."""
        folder = self.batch_path(batch_id, date)
        try:
            if self.local:
                return folder, self._archive_local(folder, sources)
            return folder, self._archive_fs(folder, sources)
        except (OSError, pa.ArrowException) as e:
            raise LakeError(f"lake {folder}: {e}") from e

    def _archive_local(self, folder: str, sources: Sequence[tuple[str, int]]) -> int:
        os.makedirs(folder, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        pending: list[tuple[int, str, str]] = []  # (fd, temp, final) of the copies, in order
        total = 0
        try:
            # The copies are the kernel's (copy_file_range); each one's writeback starts at
            # once, so the fsyncs below mostly find the data on its way to the disk.
            for name, fd_in in sources:
                tmp, final = f"{folder}/.{name}.tmp", f"{folder}/{name}"
                fd = os.open(tmp, flags, 0o644)
                pending.append((fd, tmp, final))
                total += copy_fd(fd_in, fd)
                start_writeback(fd)
            for fd, _, _ in pending:
                os.fsync(fd)
        except BaseException:
            for fd, tmp, _ in pending:
                os.close(fd)
                Path(tmp).unlink(missing_ok=True)
            raise
        for fd, tmp, final in pending:
            os.close(fd)
            os.rename(tmp, final)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return total

    def _put(self, folder: str, name: str, write: Callable[[pa.NativeFile], int]) -> int:
        final = f"{folder}/{name}"
        tmp = f"{folder}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as out:
                n = write(out)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass  # never created
            raise
        self.fs.move(tmp, final)
        return n

    def _archive_fs(self, folder: str, sources: Sequence[tuple[str, int]]) -> int:
        """The same through pyarrow.fs (an object store: no fsync, the move is the store's)."""
        total = 0
        self.fs.create_dir(folder, recursive=True)
        for name, fd_in in sources:

            def copy(out: pa.NativeFile, fd_in: int = fd_in) -> int:
                n = 0
                while chunk := os.pread(fd_in, CHUNK, n):
                    out.write(chunk)
                    n += len(chunk)
                return n

            total += self._put(folder, name, copy)
        return total

    def list_batch(self, batch_id: str, date: str) -> list[str]:
        """The file names archived for a batch (temp files excluded)."""
        sel = pafs.FileSelector(self.batch_path(batch_id, date), allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(sel) if not i.base_name.startswith(".")
        )
