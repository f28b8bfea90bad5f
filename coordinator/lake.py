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

from coordinator.errors import LakeError

CHUNK = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
_FALLBACK = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


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


def copy_fd(src: Path, fd_out: int) -> int:
    """Copy `src` into the open file `fd_out` in the kernel; return the bytes copied."""
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd_in).st_size
        done = 0
        use_cfr = True
        while done < size:
            if use_cfr:
                try:
                    n = os.copy_file_range(fd_in, fd_out, size - done)
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
    finally:
        os.close(fd_in)


class Lake:
    """Writes archived batches into the lake."""

    def __init__(self, uri: str) -> None:
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).resolve())
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def batch_path(self, batch_id: str, date: str) -> str:
        """Where a batch lives in the lake."""
        return f"{self.root}/batches/date={date}/batch={batch_id}"

    def archive(self, batch_id: str, date: str, files: Sequence[Path]) -> tuple[str, int]:
        """Copy `files` into the batch's lake folder; return the folder and bytes written. Each
        file appears whole (temp name, fsync, rename) and in the given order, so the last one
        (aggregates.parquet) says the folder is complete. Re-running it rewrites the same
        files (it is idempotent)."""
        folder = self.batch_path(batch_id, date)
        try:
            if self.local:
                return folder, self._archive_local(folder, files)
            return folder, self._archive_fs(folder, files)
        except (OSError, pa.ArrowException) as e:
            raise LakeError(f"lake {folder}: {e}") from e

    def _archive_local(self, folder: str, files: Sequence[Path]) -> int:
        os.makedirs(folder, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        pending: list[tuple[int, str, str]] = []  # (fd, temp, final) of the copies, in order
        total = 0
        try:
            # The copies are the kernel's (copy_file_range); each one's writeback starts at
            # once, so the fsyncs below mostly find the data on its way to the disk.
            for src in files:
                tmp, final = f"{folder}/.{src.name}.tmp", f"{folder}/{src.name}"
                fd = os.open(tmp, flags, 0o644)
                pending.append((fd, tmp, final))
                total += copy_fd(src, fd)
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

    def _archive_fs(self, folder: str, files: Sequence[Path]) -> int:
        """The same through pyarrow.fs (an object store: no fsync, the move is the store's)."""
        total = 0
        self.fs.create_dir(folder, recursive=True)
        for src in files:

            def copy(out: pa.NativeFile, src: Path = src) -> int:
                n = 0
                with open(src, "rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        n += len(chunk)
                return n

            total += self._put(folder, src.name, copy)
        return total

    def list_batch(self, batch_id: str, date: str) -> list[str]:
        """The file names archived for a batch (temp files excluded)."""
        sel = pafs.FileSelector(self.batch_path(batch_id, date), allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(sel) if not i.base_name.startswith(".")
        )
