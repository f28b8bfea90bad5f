"""Copying a batch into node-local tmpfs with the kernel (copy_file_range), and purging it.

Runs inside the staging agent, whose memory policy binds every page it allocates (tmpfs pages
included) to its node. A copy goes to `.<name>.tmp` and is renamed when complete, so a killed
agent leaves only temp files, which the next agent removes at start.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator import hooks
from coordinator.errors import NoSpaceError, StagingError

CHUNK = 1 << 30  # copy_file_range length per call; the kernel copies at most ~2 GiB at once.
# Keep a margin free so the node's tmpfs never fills to the last page.
HEADROOM = 16 << 20


@dataclass(frozen=True)
class StagedFile:
    """One file copied to node-local memory."""

    name: str
    bytes: int
    seconds: float


def copy_file(src: Path, dst: Path, expected: Sequence[int] | None = None) -> int:
    """Copy `src` to `dst` with copy_file_range (sendfile as a fallback); return bytes copied.

    `src` must be a regular file with a single link; symlinks are never followed. With
    `expected` (inode, size, mtime_ns) — the file as the barrier counted it — the open file must
    be that one: checked on the descriptor the copy reads, so a rewrite cannot slip in between.
    """
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd_in)
        if expected is not None and (st.st_ino, st.st_size, st.st_mtime_ns) != tuple(expected):
            raise StagingError(
                f"{src}: rewritten after the batch counted it (inode, size, mtime "
                f"{(st.st_ino, st.st_size, st.st_mtime_ns)} != counted {tuple(expected)})"
            )
        if not stat.S_ISREG(st.st_mode):
            raise StagingError(f"{src}: not a regular file")
        if st.st_nlink != 1:
            raise StagingError(f"{src}: has {st.st_nlink} hard links; refusing to copy")
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            done = 0
            use_cfr = True
            while done < st.st_size:
                n = min(CHUNK, st.st_size - done)
                if use_cfr:
                    try:
                        k = os.copy_file_range(fd_in, fd_out, n)
                    except OSError as e:
                        if e.errno not in (
                            errno.EXDEV,
                            errno.ENOSYS,
                            errno.EOPNOTSUPP,
                            errno.EINVAL,
                        ):
                            raise
                        use_cfr = False
                        continue
                else:
                    k = os.sendfile(fd_out, fd_in, done, n)
                if k == 0:
                    raise StagingError(f"{src}: shrank while copying ({done} of {st.st_size})")
                done += k
            return done
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path`."""
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def stage(
    staging_dir: Path,
    dest_dir: Path,
    names: Sequence[str],
    on_staged: Callable[[str, Path], None] | None = None,
    expected: Mapping[str, Sequence[int]] | None = None,
) -> list[StagedFile]:
    """Copy `names` from a staging batch folder into node-local `dest_dir`.

    Checks free space first; on any failure removes what this call copied and re-raises
    (NoSpaceError for a full tmpfs), so a batch is never left half-staged. `on_staged(name,
    path)` is called as soon as each file is in place (copied now, or found staged before), so
    a caller can inspect one copy while the next is being made. `expected` maps a name to the
    (inode, size, mtime_ns) the barrier counted; a file that differs is refused.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in names:
        try:
            st = os.lstat(staging_dir / name)
        except FileNotFoundError:
            raise StagingError(
                f"{staging_dir / name}: vanished before staging (removed, or quarantined as "
                "rewritten after the batch counted it)"
            ) from None
        sizes[name] = st.st_size
    need = sum(sizes.values())
    have_already = sum((dest_dir / n).stat().st_size for n in names if (dest_dir / n).exists())
    free = free_bytes(dest_dir)
    if need - have_already + HEADROOM > free:
        raise NoSpaceError(
            f"{dest_dir}: {free} bytes free, batch needs {need - have_already} + "
            f"{HEADROOM} headroom"
        )
    out: list[StagedFile] = []
    try:
        for name in names:
            final = dest_dir / name
            if final.exists() and final.stat().st_size == sizes[name]:
                # Staged earlier (a retried step); the staging copy is immutable once counted.
                out.append(StagedFile(name, 0, 0.0))
                if on_staged is not None:
                    on_staged(name, final)
                continue
            tmp = dest_dir / f".{name}.tmp"
            t0 = time.perf_counter()
            try:
                n = copy_file(staging_dir / name, tmp, (expected or {}).get(name))
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if e.errno == errno.ENOSPC:
                    raise NoSpaceError(f"{dest_dir}: no space left while copying {name}") from e
                raise StagingError(f"{staging_dir / name}: copy failed: {e}") from e
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            hooks.pause("stage")  # tests kill the agent here, mid-copy
            os.rename(tmp, final)
            out.append(StagedFile(name, n, time.perf_counter() - t0))
            if on_staged is not None:
                on_staged(name, final)
    except BaseException:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return out


def purge(dest_dir: Path) -> int:
    """Remove a batch's node-local copies; return the bytes freed."""
    if not dest_dir.exists():
        return 0
    freed = sum(p.stat().st_size for p in dest_dir.iterdir() if p.is_file())
    shutil.rmtree(dest_dir, ignore_errors=True)
    return freed


def remove_partials(tmpfs_root: Path) -> list[Path]:
    """Remove temp files a killed agent left in its tmpfs; return what was removed."""
    removed: list[Path] = []
    if not tmpfs_root.is_dir():
        return removed
    for batch in tmpfs_root.iterdir():
        if batch.is_dir() and not batch.is_symlink():
            for f in batch.iterdir():
                if f.name.startswith("."):
                    f.unlink(missing_ok=True)
                    removed.append(f)
    return removed
