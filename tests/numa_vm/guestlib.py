"""What both guest scripts (guest.py, remote_guest.py) read and do inside the two-node guest:
its uptime, its NUMA topology, each node's Shmem, and a tmpfs mount without a mount binary.

Imported by those scripts from their own folder (they run as `python SCRIPT JOB_DIR`); standard
library only.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

NODES = Path("/sys/devices/system/node")


def uptime() -> float:
    """Seconds since the guest booted."""
    return float(Path("/proc/uptime").read_text().split()[0])


def shmem_kb(*, refresh: bool = False) -> dict[str, int]:
    """Shmem (tmpfs and shared memory) per node, in kB, from the kernel's per-node meminfo.

    The node counters lag behind per-CPU deltas (folded about once a second); with `refresh`,
    stat_refresh folds them now, so a delta is exact rather than off by a few dozen pages.
    """
    if refresh:
        try:
            Path("/proc/sys/vm/stat_refresh").write_text("1")
        except OSError:  # EINVAL when some unrelated counter is transiently negative
            time.sleep(2.0)
    out = {}
    for d in sorted(NODES.glob("node[0-9]*")):
        for line in (d / "meminfo").read_text().splitlines():
            parts = line.split()  # "Node 1 Shmem:             2048 kB"
            if parts[2] == "Shmem:":
                out[parts[1]] = int(parts[3])
    return out


def topology() -> dict[str, Any]:
    """Nodes, their CPUs and distances as the guest kernel sees them."""
    nodes = sorted(int(d.name[4:]) for d in NODES.glob("node[0-9]*"))
    return {
        "nodes": nodes,
        "cpus": {str(n): (NODES / f"node{n}" / "cpulist").read_text().strip() for n in nodes},
        "distance": {
            str(n): [int(x) for x in (NODES / f"node{n}" / "distance").read_text().split()]
            for n in nodes
        },
    }


def mount_tmpfs(target: Path, options: str) -> None:
    """mount -t tmpfs -o OPTIONS tmpfs TARGET, through libc (no mount binary needed)."""
    target.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, options.encode())
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {target} -o {options}")
