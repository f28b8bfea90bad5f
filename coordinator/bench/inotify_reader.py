"""The barrier's anchor: a bare inotify reader on the staging folder, in a process of its own.

`python -m coordinator.bench.inotify_reader STAGING MODEL,MODEL,...` watches STAGING for new
batch folders and each folder for renamed-in files; when every `<model>.parquet` of a batch has
arrived it prints `<batch_id> <unix time>` (the moment read() returned that last event). It
validates nothing: it is the floor any barrier pays. It prints `ready` once its watch is armed.
Uses inotify_simple when installed, otherwise the same three libc calls through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import time
from collections.abc import Iterator

IN_CLOSE_WRITE = 0x08
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_ISDIR = 0x40000000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class _Inotify:
    """inotify_init1 / inotify_add_watch / read, the way inotify_simple does it."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add_watch(self, path: str, mask: int) -> int:
        wd = int(self.libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def read(self) -> Iterator[tuple[int, int, int, str]]:
        data = os.read(self.fd, 1 << 16)
        pos = 0
        while pos < len(data):
            wd, mask, cookie, n = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            name = data[pos : pos + n].rstrip(b"\0").decode()
            pos += n
            yield wd, mask, cookie, name


def _open() -> tuple[str, object]:
    try:
        import inotify_simple

        return "inotify_simple", inotify_simple.INotify()
    except ImportError:
        return "ctypes", _Inotify()


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    staging, wanted = args[0], {f"{m}.parquet" for m in args[1].split(",")}
    kind, ino = _open()
    add = ino.add_watch  # type: ignore[attr-defined]
    root = add(staging, IN_CREATE | IN_MOVED_TO)
    folders: dict[int, str] = {}
    seen: dict[str, set[str]] = {}
    done: set[str] = set()
    out = sys.stdout
    out.write(f"ready {kind}\n")
    out.flush()

    def arrived(batch: str, names: set[str], t: float) -> None:
        have = seen.setdefault(batch, set())
        have |= names & wanted
        if batch not in done and len(have) == len(wanted):
            done.add(batch)
            out.write(f"{batch} {t:.6f}\n")
            out.flush()

    while True:
        events = list(ino.read())  # type: ignore[attr-defined]
        t = time.time()
        for ev in events:
            wd, mask, name = int(ev[0]), int(ev[1]), str(ev[3])  # (wd, mask, cookie, name)
            if wd == root and mask & IN_ISDIR and not name.startswith("."):
                path = os.path.join(staging, name)
                try:
                    folders[add(path, IN_MOVED_TO | IN_CLOSE_WRITE)] = name
                    # Files that landed before the watch: the same arm-then-list as the daemon.
                    arrived(name, set(os.listdir(path)), time.time())
                except OSError:
                    continue
            elif wd in folders and mask & IN_MOVED_TO:
                arrived(folders[wd], {name}, t)


if __name__ == "__main__":
    sys.exit(main())
