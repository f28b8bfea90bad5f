"""Where the pages of node-local copies actually are: the kernel's answer, per file and per batch.

Binding the agent (numactl, systemd NUMAPolicy=) only says where pages *should* go; a tmpfs mounted
with its own `mpol=`, a cpuset, or memory pressure can still put them elsewhere. So after staging
the agent maps each copy read-only and asks the kernel which node holds every page: move_pages(2)
with nodes = NULL (it moves nothing and fills in each page's node, or a negative errno), or, where
that syscall is unavailable, the mapping's line in /proc/self/numa_maps. Counting and parsing are
pure functions; only `page_nodes`, `file_nodes` and `measure` touch the kernel.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "NOT_IN_MEMORY",
    "BatchPlacement",
    "FilePlacement",
    "Method",
    "NodeBytes",
    "bytes_by_status",
    "count_bytes",
    "file_bytes",
    "file_nodes",
    "measure",
    "numa_maps_nodes",
    "page_nodes",
    "tally",
    "usable_method",
]

Method = Literal["move_pages", "numa_maps"]

# move_pages(2) syscall numbers; glibc has no wrapper (libnuma has, but is not required).
_SYS_MOVE_PAGES = {"x86_64": 279, "aarch64": 239, "ppc64le": 301, "s390x": 310}
PAGE = mmap.PAGESIZE
# Pages per move_pages call, and bytes mapped at once (bounds page tables and address space
# while measuring a copy of many GiB).
STAT_BATCH = 4096
WINDOW = 64 << 20

_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE_ANON = 0x02 | 0x20  # MAP_PRIVATE | MAP_ANONYMOUS
_MAP_POPULATE = 0x8000  # fault the pages in: move_pages and numa_maps only see mapped pages
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_READ = 22  # Linux 5.14: map pages in as a read would, one call per range
# The status of a page that is not in memory: move_pages' answer for a page not mapped in, and
# what the byte counts use for a page mincore(2) found absent (never read in to ask).
NOT_IN_MEMORY = -errno.ENOENT
# mincore(2) sets bit 0 of a page's byte when the page is resident (the others are reserved).
_LOW_BIT = bytes(b & 1 for b in range(256))
_RESIDENT_RUN = re.compile(rb"\x01+")
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class FilePlacement:
    """Pages of one file and how many of them are on the wanted node."""

    pages: int
    local_pages: int
    nodes: Mapping[int, int] = field(default_factory=dict)  # node -> pages (found ones only)

    @property
    def fraction(self) -> float:
        """Share of the file's pages on the wanted node (1.0 for an empty file: nothing is off)."""
        return self.local_pages / self.pages if self.pages else 1.0


@dataclass(frozen=True)
class BatchPlacement:
    """Placement of a batch's node-local copies, as reported in the agent's `staged` reply."""

    node: int
    method: Method
    files: Mapping[str, FilePlacement]
    seconds: float = 0.0

    @property
    def pages(self) -> int:
        """All pages of all files."""
        return sum(f.pages for f in self.files.values())

    @property
    def local_pages(self) -> int:
        """Pages on the wanted node."""
        return sum(f.local_pages for f in self.files.values())

    @property
    def fraction(self) -> float:
        """Share of the batch's pages on the wanted node."""
        return self.local_pages / self.pages if self.pages else 1.0

    def nodes(self) -> dict[int, int]:
        """Pages per node over all files; pages the kernel could not place are not counted."""
        total: Counter[int] = Counter()
        for f in self.files.values():
            total.update(f.nodes)
        return dict(sorted(total.items()))

    def as_dict(self) -> dict[str, Any]:
        """The `placement` field of the `staged` reply (docs/numa.md)."""
        return {
            # Fractions unrounded: rounding could lift 0.98999... over a 0.99 threshold.
            "fraction": self.fraction,
            "pages": self.pages,
            "local_pages": self.local_pages,
            "node": self.node,
            "method": self.method,
            "nodes": {str(n): p for n, p in self.nodes().items()},
            "seconds": round(self.seconds, 6),
            "files": {
                name: {"fraction": f.fraction, "pages": f.pages}
                for name, f in sorted(self.files.items())
            },
        }


def tally(counts: Mapping[int, int], node: int, pages: int) -> FilePlacement:
    """Fold per-page statuses counted by value ({node or negative errno: pages}) into a
    FilePlacement for `node`. A page with an error (e.g. -ENOENT: not present) or with no
    status at all (numa_maps lists only mapped pages) is a page of the file, just not a local one.
    """
    nodes = {n: c for n, c in sorted(counts.items()) if n >= 0 and c > 0}
    placed = sum(nodes.values())
    if placed > pages:
        raise ValueError(f"{placed} pages placed but the file has only {pages}")
    return FilePlacement(pages=pages, local_pages=nodes.get(node, 0), nodes=nodes)


_NODE_RE = re.compile(r"\bN(\d+)=(\d+)\b")


def numa_maps_nodes(text: str, start: int) -> dict[int, int]:
    """Pages per node of the mapping that starts at address `start`, from numa_maps text.

    A line looks like `7f3a2c000000 bind:0 file=/dev/shm/x mapped=16 N0=12 N1=4 ...`; the
    mapping is found by its start address, never by file name (names may be escaped).
    """
    for line in text.splitlines():
        addr, _, rest = line.partition(" ")
        try:
            if int(addr, 16) != start:
                continue
        except ValueError:
            continue
        return {int(n): int(p) for n, p in _NODE_RE.findall(rest)}
    return {}


def page_nodes(addr: int, npages: int) -> list[int]:
    """The node of each of `npages` pages from `addr` in this process, from move_pages(2) with
    nodes = NULL; a negative value is the errno for that page. OSError if the call fails."""
    nr = _SYS_MOVE_PAGES.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"move_pages: no syscall number for {platform.machine()}")
    out: list[int] = []
    for first in range(0, npages, STAT_BATCH):
        n = min(STAT_BATCH, npages - first)
        start = addr + first * PAGE
        pages = array.array("Q", range(start, start + n * PAGE, PAGE))
        status = array.array("i", bytes(4 * n))
        rc = _libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(0),  # this process
            ctypes.c_ulong(n),
            ctypes.c_void_p(pages.buffer_info()[0]),
            None,  # nodes = NULL: report, do not move
            ctypes.c_void_p(status.buffer_info()[0]),
            ctypes.c_int(0),
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"move_pages: {os.strerror(err)}")
        out.extend(status)
    return out


def _map(fd: int, offset: int, length: int) -> int:
    addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED | _MAP_POPULATE, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


def file_nodes(path: Path, method: Method = "move_pages") -> tuple[Counter[int], int]:
    """Where a file's pages are: {node or negative errno: pages} and the file's page count.

    The file is mapped read-only and shared, in windows, with MAP_POPULATE: both move_pages and
    numa_maps see only pages mapped into this process, and mapping existing tmpfs pages neither
    allocates nor moves them.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        counts: Counter[int] = Counter()
        for offset in range(0, size, WINDOW):
            length = min(WINDOW, size - offset)
            addr = _map(fd, offset, length)
            try:
                if method == "move_pages":
                    counts.update(page_nodes(addr, -(-length // PAGE)))
                else:
                    with open("/proc/self/numa_maps") as f:
                        counts.update(numa_maps_nodes(f.read(), addr))
            finally:
                _libc.munmap(addr, length)
        return counts, -(-size // PAGE)
    finally:
        os.close(fd)


_method: Method | None = None


def usable_method() -> Method:
    """move_pages when this kernel and architecture answer it for one page of our own memory,
    else numa_maps (an unknown architecture, or a seccomp filter that forbids the syscall)."""
    global _method
    if _method is None:
        addr = _libc.mmap(
            None, PAGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE_ANON | _MAP_POPULATE, -1, 0
        )
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        try:
            page_nodes(int(addr), 1)
            _method = "move_pages"
        except OSError:
            _method = "numa_maps"
        finally:
            _libc.munmap(addr, PAGE)
    return _method


def measure(files: Mapping[str, Path], node: int, method: Method | None = None) -> BatchPlacement:
    """Ask the kernel where the pages of `files` ({name: path}) are; fractions are of `node`."""
    t0 = time.perf_counter()
    how = method or usable_method()
    out = {}
    for name, path in files.items():
        counts, pages = file_nodes(path, how)
        out[name] = tally(counts, node, pages)
    return BatchPlacement(node, how, out, time.perf_counter() - t0)


# -- bytes by where their pages are (the per-batch cross-node accounting) ---------------------


@dataclass(frozen=True)
class NodeBytes:
    """Bytes of some files by where their pages were, as one node's agent sees them.

    `by_status` maps a page status to bytes: a node (>= 0), or a negative errno, NOT_IN_MEMORY
    for a page that was not in memory at all (a file's page cache not holding it). Every page
    counts PAGE bytes but a file's last, which counts what the file has left.
    """

    node: int
    by_status: Mapping[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All bytes of the files."""
        return sum(self.by_status.values())

    @property
    def local(self) -> int:
        """Bytes on this node's memory."""
        return self.by_status.get(self.node, 0)

    @property
    def other_nodes(self) -> int:
        """Bytes on another node's memory."""
        return sum(b for s, b in self.by_status.items() if s >= 0 and s != self.node)

    @property
    def not_in_memory(self) -> int:
        """Bytes whose pages were not in memory (NOT_IN_MEMORY), or whose node the kernel did
        not tell (another errno)."""
        return sum(b for s, b in self.by_status.items() if s < 0)

    @property
    def not_local(self) -> int:
        """Bytes not on this node's memory, for whatever reason."""
        return self.total - self.local

    def nodes(self) -> dict[str, int]:
        """Bytes per node (JSON keys), pages not in memory left out."""
        return {str(s): b for s, b in sorted(self.by_status.items()) if s >= 0}

    def __add__(self, other: NodeBytes) -> NodeBytes:
        if other.node != self.node:
            raise ValueError(f"adding bytes seen from node {other.node} to node {self.node}'s")
        total: Counter[int] = Counter(self.by_status)
        total.update(other.by_status)
        return NodeBytes(self.node, dict(total))


def bytes_by_status(statuses: Sequence[int], first_page: int, size: int) -> Counter[int]:
    """Bytes per page status of the pages `first_page`, `first_page + 1`, ... of a file of
    `size` bytes, given each page's status in order (pure): PAGE bytes a page, but the file's
    last page holds only the rest of the file."""
    out: Counter[int] = Counter()
    for status, n in Counter(statuses).items():
        out[status] = n * PAGE
    last = (size - 1) // PAGE if size else -1
    i = last - first_page
    if 0 <= i < len(statuses):
        out[statuses[i]] -= PAGE - (size - last * PAGE)
    return +out  # drop statuses left at zero


def _window_statuses(addr: int, npages: int, method: Method) -> list[int] | Counter[int]:
    """The pages mapped in at `addr`: per page (move_pages) or per node (numa_maps)."""
    if method == "move_pages":
        return page_nodes(addr, npages)
    with open("/proc/self/numa_maps") as f:
        return Counter(numa_maps_nodes(f.read(), addr))


def file_bytes(fd: int, method: Method = "move_pages") -> Counter[int]:
    """Bytes per page status (node, or NOT_IN_MEMORY) of the open file `fd`, without reading
    in a page that is not in memory: each window is mapped (read-only, shared, not populated),
    mincore(2) says which pages are resident (the page cache of a disk file, or tmpfs), only
    those are mapped in (MADV_POPULATE_READ, Linux 5.14), and the kernel
    tells their nodes. The others count as NOT_IN_MEMORY. Exact to the byte with move_pages;
    with numa_maps (pages per node only) the file's partial last page is taken off the pages
    not in memory, else off the largest node's."""
    size = os.fstat(fd).st_size
    out: Counter[int] = Counter()
    for offset in range(0, size, WINDOW):
        length = min(WINDOW, size - offset)
        npages = -(-length // PAGE)
        addr = _libc.mmap(None, length, _PROT_READ, _MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        try:
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, length, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}")
            for run in _RESIDENT_RUN.finditer(bytes(vec).translate(_LOW_BIT)):
                _map_in(addr + run.start() * PAGE, (run.end() - run.start()) * PAGE)
            statuses = _window_statuses(addr, npages, method)
        finally:
            _libc.munmap(addr, length)
        if isinstance(statuses, list):
            out.update(bytes_by_status(statuses, offset // PAGE, size))
        else:  # numa_maps: pages per node; the rest of the window was not in memory
            placed = sum(statuses.values())
            counts = Counter({n: p * PAGE for n, p in statuses.items()})
            counts[NOT_IN_MEMORY] += (npages - placed) * PAGE
            short = npages * PAGE - length
            key = NOT_IN_MEMORY if counts[NOT_IN_MEMORY] >= short else counts.most_common(1)[0][0]
            counts[key] -= short
            out.update(+counts)
    return +out


def _map_in(addr: int, length: int) -> None:
    """Map the (resident) pages of a range in, as a read would; OSError where the kernel
    cannot (before Linux 5.14: no MADV_POPULATE_READ), or where a read would fault (EFAULT: the
    file was truncated meanwhile). Touching the pages instead would turn that fault into a
    SIGBUS that kills the agent."""
    if _libc.madvise(addr, length, _MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        why = "needs Linux 5.14" if err == errno.EINVAL else os.strerror(err)
        raise OSError(err, f"madvise(MADV_POPULATE_READ): {why}")


def count_bytes(fds: Mapping[str, int], node: int, method: Method | None = None) -> NodeBytes:
    """Bytes of the open files `fds` ({name: descriptor}) by where their pages are, seen from
    `node` (file_bytes)."""
    how = method or usable_method()
    total: Counter[int] = Counter()
    for fd in fds.values():
        total.update(file_bytes(fd, how))
    return NodeBytes(node, dict(total))


def main(argv: list[str] | None = None) -> int:
    """`python -m agents.placement --node N FILE...`: an operator's spot check of copies on
    tmpfs; prints the placement as JSON, exits 1 when the fraction is below --min."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m agents.placement", description=main.__doc__)
    p.add_argument("--node", type=int, required=True, help="the node the pages should be on")
    p.add_argument("--min", type=float, default=0.99, help="lowest acceptable fraction")
    p.add_argument("--method", choices=["move_pages", "numa_maps"], help="default: move_pages")
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        where = measure({str(f): f for f in args.files}, args.node, args.method)
    except OSError as e:
        print(f"placement: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(json.dumps(where.as_dict(), indent=2))
    return 0 if where.fraction >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
