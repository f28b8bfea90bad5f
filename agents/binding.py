"""Read back this process's NUMA memory policy and CPU mask, and refuse to run when unbound.

`numactl --membind=N` sets the MPOL_BIND memory policy (not the cpuset), so the check asks the
kernel with get_mempolicy(2); `Mems_allowed_list` in /proc/self/status only shows the cpuset.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from coordinator.core.errors import BindingError
from coordinator.core.topology import parse_cpulist

# get_mempolicy(2) syscall numbers; glibc has no wrapper (libnuma does, but is not required).
_SYS_GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236, "ppc64le": 260, "s390x": 269}
MPOL_NAMES = {
    0: "default",
    1: "preferred",
    2: "bind",
    3: "interleave",
    4: "local",
    5: "preferred_many",
    6: "weighted_interleave",
}
MPOL_BIND = 2
_MAXNODE = 1024


@dataclass(frozen=True)
class Binding:
    """What the kernel says about this process's placement."""

    policy: str  # default, bind, interleave, ...
    mems: tuple[int, ...]  # nodes of the memory policy (empty for default)
    cpus: tuple[int, ...]  # the CPU affinity mask

    def as_dict(self) -> dict[str, object]:
        """For the hello message and status."""
        return {"policy": self.policy, "mems": list(self.mems), "cpus": list(self.cpus)}


def memory_policy() -> tuple[str, tuple[int, ...]]:
    """This thread's memory policy mode and node mask, from get_mempolicy(2)."""
    nr = _SYS_GET_MEMPOLICY.get(platform.machine())
    if nr is None:
        raise BindingError(f"get_mempolicy: unsupported architecture {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    mode = ctypes.c_int(0)
    words = _MAXNODE // (8 * ctypes.sizeof(ctypes.c_ulong))
    mask = (ctypes.c_ulong * words)()
    rc = libc.syscall(nr, ctypes.byref(mode), mask, ctypes.c_ulong(_MAXNODE), None, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise BindingError(f"get_mempolicy failed: {os.strerror(err)}")
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    nodes = tuple(w * bits + b for w in range(words) for b in range(bits) if mask[w] >> b & 1)
    # Mode flags (MPOL_F_STATIC_NODES etc.) sit in the high bits.
    name = MPOL_NAMES.get(mode.value & 0xFF, f"mode{mode.value}")
    return name, nodes if name != "default" else ()


def node_cpus(node: int, sysfs_root: str | Path = "/") -> tuple[int, ...]:
    """The CPUs of a NUMA node, from sysfs."""
    path = Path(sysfs_root) / f"sys/devices/system/node/node{node}/cpulist"
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise BindingError(f"NUMA node {node} does not exist ({path}: {e.strerror})") from None
    return parse_cpulist(text)


def current() -> Binding:
    """This process's binding as the kernel reports it."""
    policy, mems = memory_policy()
    return Binding(policy=policy, mems=mems, cpus=tuple(sorted(os.sched_getaffinity(0))))


def check(node: int, *, cpus: str = "", sysfs_root: str | Path = "/") -> Binding:
    """Return the binding if memory is bound to exactly `node` and CPUs lie within the node
    (or the configured list); otherwise raise BindingError saying what was found."""
    b = current()
    if b.policy != "bind" or b.mems != (node,):
        raise BindingError(
            f"memory policy is {b.policy} on nodes {list(b.mems)}, expected bind to node {node}; "
            f"start the agent under `numactl --membind={node} --cpunodebind={node}` "
            f"(or systemd NUMAPolicy=bind NUMAMask={node})"
        )
    allowed = set(parse_cpulist(cpus)) if cpus else set(node_cpus(node, sysfs_root))
    outside = sorted(set(b.cpus) - allowed)
    if outside:
        raise BindingError(
            f"CPU mask {list(b.cpus)} includes CPUs {outside} outside node {node}'s "
            f"{sorted(allowed)}; start the agent with --cpunodebind={node}"
        )
    return b
