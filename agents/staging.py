"""Copying a batch into node-local tmpfs with the kernel (copy_file_range), and purging it.

Runs inside the staging agent, whose memory policy binds every page it allocates (tmpfs pages
included) to its node. A copy goes to `.<name>.tmp` and is renamed when complete, so a killed
agent leaves only temp files, which the next agent removes at start. Both sides are reached
through open folders (`coordinator.core.roots`): a link in staging is refused, never followed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.core import hooks
from coordinator.core.errors import NoSpaceError, StagingError
from coordinator.core.roots import Dir, LinkRefused, fd_path

CHUNK = 1 << 30  # copy_file_range length per call; the kernel copies at most ~2 GiB at once.
# Keep a margin free so the node's tmpfs never fills to the last page.
HEADROOM = 16 << 20


@dataclass(frozen=True)
class StagedFile:
    """One file copied to node-local memory."""

    name: str
    bytes: int
    seconds: float


def copy_file(
    src: Dir,
    name: str,
    dst: Dir,
    dst_name: str,
    expected: Sequence[int] | None = None,
    *,
    inspect: Callable[[str, int], None] | None = None,
) -> int:
    """Copy `src/name` to `dst/dst_name` in the kernel (copy_file_range, sendfile as a
    fallback); return bytes copied. Both names are opened relative to their folder's
    descriptor; a link is never followed (LinkRefused).

    The source must be a regular file with a single link. With `expected` (inode, size,
    mtime_ns) — the file as the barrier counted it — the open file must be that one: checked on
    the descriptor the copy reads, so a rewrite cannot slip in between. `inspect(name, fd)` is
    called on that descriptor just before the copy (to see where its pages are:
    agents.placement.file_bytes); it must not raise.
    """
    fd_in = src.open_file(name)
    try:
        st = os.fstat(fd_in)
        check_source(src.where(name), st, expected)
        if inspect is not None:
            inspect(name, fd_in)
        fd_out = dst.open_file(dst_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            n = copy_fd(fd_in, fd_out, st.st_size, src.where(name))
            # The copy carries its source's mtime: with the size it tells, later, which
            # counted file a copy was made from (`stage` reuses a copy only if they match).
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
            return n
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def is_counted(st: os.stat_result, expected: Sequence[int]) -> bool:
    """True if the file `st` describes is the counted one, `expected` = (inode, size, mtime_ns).
    Inode 0 means the counter could not know this kernel's inode number (the coordinator of a
    `[[node]] remote` agent, which sees staging through a 9p or NFS share that numbers inodes
    its own way): then size and mtime_ns alone identify the file."""
    ino, size, mtime_ns = (int(x) for x in expected)
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns) and ino in (0, st.st_ino)


def check_source(where: str, st: os.stat_result, expected: Sequence[int] | None) -> None:
    """Refuse a source that is not a single-linked regular file, or not the counted one."""
    if expected is not None and not is_counted(st, expected):
        raise StagingError(
            f"{where}: rewritten after the batch counted it (inode, size, mtime "
            f"{(st.st_ino, st.st_size, st.st_mtime_ns)} != counted {tuple(expected)})"
        )
    if not stat.S_ISREG(st.st_mode):
        raise StagingError(f"{where}: not a regular file")
    if st.st_nlink != 1:
        raise StagingError(f"{where}: has {st.st_nlink} hard links; refusing to copy")


def copy_fd(fd_in: int, fd_out: int, size: int, where: str) -> int:
    """Copy `size` bytes from the start of `fd_in` to `fd_out` in the kernel."""
    done = 0
    use_cfr = True
    while done < size:
        n = min(CHUNK, size - done)
        if use_cfr:
            try:
                k = os.copy_file_range(fd_in, fd_out, n, done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                use_cfr = False
                continue
        else:
            k = os.sendfile(fd_out, fd_in, done, n)
        if k == 0:
            raise StagingError(f"{where}: shrank while copying ({done} of {size})")
        done += k
    return done


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path`."""
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def stage(
    src: Dir,
    tmpfs: Dir,
    batch_id: str,
    names: Sequence[str],
    on_staged: Callable[[str, Path], None] | None = None,
    expected: Mapping[str, Sequence[int]] | None = None,
    on_source: Callable[[str, int], None] | None = None,
) -> list[StagedFile]:
    """Copy `names` from a staging batch folder `src` into `tmpfs/<batch_id>`.

    Checks free space first; on any failure removes the batch's node-local folder and
    re-raises (NoSpaceError for a full tmpfs), so a batch is never left half-staged.
    `on_staged(name, path)` is called as soon as each file is in place (copied now, or found
    staged before), with a path that names it through the open folder, so a caller can inspect
    one copy while the next is being made. `expected` maps a name to the (inode, size,
    mtime_ns) the barrier counted; a file that differs is refused. `on_source(name, fd)` is
    called on each source file's open descriptor just before it is copied (not for a copy
    found staged before).
    """
    sizes = {}
    for name in names:
        try:
            st = src.lstat(name)
        except FileNotFoundError:
            raise StagingError(
                f"{src.where(name)}: vanished before staging (removed, or quarantined as "
                "rewritten after the batch counted it)"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            raise LinkRefused(src.where(name))
        sizes[name] = st.st_size
    dest = tmpfs.sub(batch_id, create=True)
    try:
        return _stage_into(src, dest, names, sizes, on_staged, expected or {}, on_source)
    except BaseException:
        dest.close()
        tmpfs.rmtree(batch_id)
        raise
    finally:
        dest.close()


def _stage_into(
    src: Dir,
    dest: Dir,
    names: Sequence[str],
    sizes: Mapping[str, int],
    on_staged: Callable[[str, Path], None] | None,
    expected: Mapping[str, Sequence[int]],
    on_source: Callable[[str, int], None] | None = None,
) -> list[StagedFile]:
    def size_of(name: str) -> int | None:
        try:
            st = dest.lstat(name)
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def staged_before(name: str) -> bool:
        # A copy from an earlier request is reused only if it is a copy of the file counted
        # now: same size and (where the count is given) the same mtime, which copies carry.
        # A count lost to a crash and taken again after a rewrite never reuses the old copy.
        try:
            st = dest.lstat(name)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != sizes[name]:
            return False
        want = expected.get(name)
        return want is None or (st.st_size, st.st_mtime_ns) == (int(want[1]), int(want[2]))

    need = sum(sizes.values())
    have_already = sum(s for n in names if (s := size_of(n)) is not None)
    free = free_bytes(Path(fd_path(dest.fd)))
    if need - have_already + HEADROOM > free:
        raise NoSpaceError(
            f"{dest.label}: {free} bytes free, batch needs {need - have_already} + "
            f"{HEADROOM} headroom"
        )
    here = Path(fd_path(dest.fd))
    out: list[StagedFile] = []
    for name in names:
        if staged_before(name):
            out.append(StagedFile(name, 0, 0.0))
            if on_staged is not None:
                on_staged(name, here / name)
            continue
        tmp = f".{name}.tmp"
        t0 = time.perf_counter()
        try:
            n = copy_file(src, name, dest, tmp, expected.get(name), inspect=on_source)
        except LinkRefused:
            dest.unlink(tmp, missing_ok=True)
            raise
        except OSError as e:
            dest.unlink(tmp, missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise NoSpaceError(f"{dest.label}: no space left while copying {name}") from e
            raise StagingError(f"{src.where(name)}: copy failed: {e}") from e
        except BaseException:
            dest.unlink(tmp, missing_ok=True)
            raise
        hooks.pause("stage")  # tests kill the agent here, mid-copy
        dest.rename(tmp, dest, name)
        out.append(StagedFile(name, n, time.perf_counter() - t0))
        if on_staged is not None:
            on_staged(name, here / name)
    return out


def purge(tmpfs: Dir, batch_id: str) -> int:
    """Remove a batch's node-local copies; return the bytes freed."""
    try:
        dest = tmpfs.sub(batch_id)
    except FileNotFoundError:
        return 0
    with dest:
        freed = sum(
            e.stat(follow_symlinks=False).st_size
            for e in dest.entries()
            if e.is_file(follow_symlinks=False)
        )
    tmpfs.rmtree(batch_id)
    return freed


def remove_partials(tmpfs: Dir) -> list[str]:
    """Remove temp files a killed agent left in its tmpfs; return what was removed
    (`<batch>/<name>`)."""
    removed: list[str] = []
    for batch in tmpfs.entries():
        if not batch.is_dir(follow_symlinks=False):
            continue
        with tmpfs.sub(batch.name) as d:
            for name in d.names():
                if name.startswith("."):
                    d.unlink(name, missing_ok=True)
                    removed.append(f"{batch.name}/{name}")
    return removed
