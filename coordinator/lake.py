"""The data lake (cold tier), through pyarrow.fs so an object-store URI works like a local path.

Layout: LAKE/batches/date=YYYY-MM-DD/batch=<batch_id>/ holding the models' files, the cross-check
files and aggregates.parquet. Each file is written under a dot-temp name and moved into place;
on a local filesystem it is fsynced before the rename and the folder after it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from coordinator.errors import LakeError

CHUNK = 8 << 20


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

    def _put(self, folder: str, name: str, write: object) -> int:
        final = f"{folder}/{name}"
        tmp = f"{folder}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as out:
                n = write(out)  # type: ignore[operator]
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass  # never created
            raise
        if self.local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.fs.move(tmp, final)
        return int(n)

    def archive(
        self, batch_id: str, date: str, files: Sequence[Path], aggregates: pa.Table
    ) -> tuple[str, int]:
        """Copy `files` and write `aggregates.parquet` into the batch's lake folder; return the
        folder and bytes written. Re-running it rewrites the same files (it is idempotent)."""
        folder = self.batch_path(batch_id, date)
        total = 0
        try:
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

            def write_agg(out: pa.NativeFile) -> int:
                buf = io.BytesIO()
                pq.write_table(aggregates, buf, compression="zstd", compression_level=3)
                out.write(buf.getvalue())
                return buf.tell()

            total += self._put(folder, "aggregates.parquet", write_agg)
            if self.local:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (OSError, pa.ArrowException) as e:
            raise LakeError(f"lake {folder}: {e}") from e
        return folder, total

    def list_batch(self, batch_id: str, date: str) -> list[str]:
        """The file names archived for a batch (temp files excluded)."""
        sel = pafs.FileSelector(self.batch_path(batch_id, date), allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(sel) if not i.base_name.startswith(".")
        )
