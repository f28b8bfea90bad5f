"""Filesystem access confined to a configured folder: staging, a node's tmpfs, the quarantine.

A writer to staging (an SLM's VM shares that folder) can plant a symbolic link anywhere, or swap a
folder for one between two system calls. So nothing under a root is reached through a path
string that the kernel resolves again later: a root is opened once (`Root`; its own path is the
operator's configuration, links in it included), and every name below it is opened relative to
a directory descriptor (`Dir`), one component at a time, with O_NOFOLLOW. A link is never
followed: opening one raises `LinkRefused` (an OSError, ELOOP) naming it; renames and removals
act on the link itself, never on what it points to.

Reading a file by descriptor: `Dir.open_file` returns the descriptor, and `fd_path(fd)` names
that open file for a library that insists on a path (/proc/self/fd/N is the open file itself,
not the name it was opened by).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from coordinator.core.errors import LinkRefused  # defined there for the error codes' table

__all__ = ["Dir", "LinkRefused", "Root", "component", "fd_path", "fit_name"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def component(name: str) -> str:
    """`name` if it is one plain path component, else ValueError (a '/', '.', '..', a NUL)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a single file or folder name")
    return name


def fd_path(fd: int) -> str:
    """A path that names the open file `fd` itself (for libraries that take only paths)."""
    return f"/proc/self/fd/{fd}"


def fit_name(name: str, suffix: str, limit: int) -> str:
    """`name + suffix`, its stem shortened (and disambiguated by a hash of the whole name) so
    that it is at most `limit` bytes, the filesystem's NAME_MAX."""
    import hashlib

    raw, tail = os.fsencode(name), os.fsencode(suffix)
    if len(raw) + len(tail) <= limit:
        return name + suffix
    digest = hashlib.sha256(raw).hexdigest()[:16].encode()
    keep = max(0, limit - len(tail) - len(digest) - 1)
    return os.fsdecode(raw[:keep] + b"~" + digest + tail)


class Dir:
    """An open folder. Names below it are single components, resolved relative to its
    descriptor; a link is never followed. Close it (or use `with`) when done."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label  # the path it was opened by: for messages only, never re-opened

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False, mode: int = 0o755) -> Dir:
        """Open a root folder by the path an operator configured (a link in that path is the
        operator's own, and is followed); with `create`, make it and its parents first."""
        p = Path(path)
        if create:
            p.mkdir(parents=True, exist_ok=True, mode=mode)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return cls(os.open(p, flags), str(p))
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(p)) from None

    def where(self, name: str = "") -> str:
        """The path of `name` in this folder, for messages."""
        return f"{self.label}/{name}" if name else self.label

    def sub(self, name: str, *, create: bool = False, mode: int = 0o755) -> Dir:
        """Open the sub-folder `name` (made first with `create`); a link there is refused."""
        component(name)
        if create:
            try:
                os.mkdir(name, mode, dir_fd=self.fd)
            except FileExistsError:
                pass
        try:
            return Dir(os.open(name, _DIR_FLAGS, dir_fd=self.fd), self.where(name))
        except OSError as e:
            raise _refusal(e, self.where(name), lambda: self.lstat(name)) from None

    def lstat(self, name: str) -> os.stat_result:
        """The entry `name` itself (a link is described, not followed)."""
        return os.stat(component(name), dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        """True if an entry of that name is here (whatever it is)."""
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        """The names in this folder."""
        return os.listdir(self.fd)

    def entries(self) -> list[os.DirEntry[str]]:
        """The entries of this folder (`is_dir(follow_symlinks=False)` tells folders)."""
        with os.scandir(self.fd) as it:
            return list(it)

    def open_file(self, name: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """Open the file `name` here and return its descriptor; a link is refused. Opens for
        reading never block (a FIFO swapped in cannot hang the caller)."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if flags & os.O_ACCMODE == os.O_RDONLY:
            flags |= os.O_NONBLOCK
        try:
            return os.open(component(name), flags, mode, dir_fd=self.fd)
        except OSError as e:
            raise _refusal(e, self.where(name), lambda: self.lstat(name)) from None

    def rename(self, name: str, dest: Dir, new_name: str) -> None:
        """Move the entry `name` (a link moves as a link) to `dest/new_name`."""
        os.rename(component(name), component(new_name), src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def unlink(self, name: str, *, missing_ok: bool = False) -> None:
        """Remove the file (or link) `name`."""
        try:
            os.unlink(component(name), dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self, name: str) -> None:
        """Remove the empty folder `name` (a link there is not a folder: ENOTDIR)."""
        os.rmdir(component(name), dir_fd=self.fd)

    def rmtree(self, name: str) -> None:
        """Remove the folder `name` and everything in it; never follows a link (a link in its
        place raises LinkRefused and is left alone). A folder already gone is fine."""
        component(name)
        try:
            st = self.lstat(name)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise LinkRefused(self.where(name))
        errors: list[OSError] = []

        def note(_fn: object, _path: str, exc: BaseException) -> None:
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                errors.append(exc)

        # shutil's descriptor-based walk: it opens each folder relative to its parent and
        # checks it is the one it lstat-ed, so a folder swapped for a link is not followed.
        if sys.version_info >= (3, 12):
            shutil.rmtree(name, dir_fd=self.fd, onexc=note)
        else:
            shutil.rmtree(name, dir_fd=self.fd, onerror=lambda f, p, ei: note(f, p, ei[1]))
        if errors:
            raise errors[0]

    def fsync(self) -> None:
        """fsync the folder, so renames in it survive a crash."""
        os.fsync(self.fd)

    def free_bytes(self) -> int:
        """Free bytes on the filesystem holding this folder."""
        s = os.fstatvfs(self.fd)
        return s.f_bavail * s.f_frsize

    def name_max(self) -> int:
        """The longest name, in bytes, this folder's filesystem takes."""
        return int(os.fstatvfs(self.fd).f_namemax) or 255

    @property
    def gone(self) -> bool:
        """True once the folder has been removed (the descriptor outlives it)."""
        return os.fstat(self.fd).st_nlink == 0

    def close(self) -> None:
        """Close the descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Root:
    """A configured folder, opened once and shared by every thread of the process.

    Should the folder itself be removed and made again (an operator's hand, a test), the next
    use opens the new one: a removed folder's descriptor would see nothing that lands there.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        self.create = create
        self._dir: Dir | None = None
        self._lock = threading.Lock()

    def dir(self) -> Dir:
        """The open root (do not close it)."""
        with self._lock:
            d = self._dir
            if d is not None and _gone(d):
                d.close()
                d = self._dir = None
            if d is None:
                d = self._dir = Dir.open(self.path, create=self.create)
            return d

    def sub(self, name: str, *, create: bool = False) -> Dir:
        """Open the folder `name` in the root (close it when done)."""
        return self.dir().sub(name, create=create)

    def close(self) -> None:
        """Close the root's descriptor."""
        with self._lock:
            if self._dir is not None:
                self._dir.close()
                self._dir = None


def _gone(d: Dir) -> bool:
    try:
        return d.gone
    except OSError:
        return True  # cannot tell: open the root again


def _refusal(e: OSError, where: str, lstat: Callable[[], os.stat_result]) -> OSError:
    """Turn an open's ELOOP/ENOTDIR on a link into LinkRefused; keep any other error, with the
    path it concerns."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        try:
            st = lstat()
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return LinkRefused(where)
    return type(e)(e.errno, e.strerror, where)
