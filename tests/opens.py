"""Which files below a folder some process opened or read, heard from the kernel (inotify).

inotify reports an open on the file itself, whatever path reached it: a process that opens
`staging/b1/x` when `staging/b1` is a link to this folder is heard here. So a test can show
that nothing outside the configured roots was read, not only that nothing there changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path
from types import TracebackType

IN_ACCESS = 0x00000001
IN_OPEN = 0x00000020
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Opens:
    """Watch `folder` and its sub-folders (as they are now) for opens and reads of files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd = -1
        self._wd: dict[int, Path] = {}
        self._seen: list[str] = []

    def __enter__(self) -> Opens:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for d in [self.folder, *(p for p in self.folder.rglob("*") if p.is_dir())]:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(d), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", str(d))
            self._wd[wd] = d
        return self

    def files(self) -> list[str]:
        """The files opened or read so far (relative to the folder), in order, repeats kept."""
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return list(self._seen)
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size : off + _EVENT.size + size].rstrip(b"\0")
                off += _EVENT.size + size
                if mask & IN_ISDIR or not name:
                    continue
                where = self._wd[wd] / os.fsdecode(name)
                self._seen.append(str(where.relative_to(self.folder)))

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
