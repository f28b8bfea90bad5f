"""Write a fake sysfs tree shaped like the seed's dual-socket machine.

Kept independent of ``coordinator.core.topology`` on purpose: it writes the files the kernel writes,
in the kernel's formats, so reading them back is a real test of the reader. Numbering follows the
seed: node n holds global cores ``n * cores_per_node ...``, and core N has threads
``N, N + total_cores, ...`` (on the seed, node 0 = threads 0-17 and 36-53, core N -> N and N+36).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _ranges(cpus: Sequence[int]) -> str:
    """Kernel cpulist text, written here by hand rather than with the code under test."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def write_fake_sysfs(
    root: str | Path,
    *,
    nodes: int = 2,
    cores_per_node: int = 18,
    threads_per_core: int = 2,
    mem_gb_per_node: int = 126,
    l3_mib: int = 45,
    distance: Sequence[Sequence[int]] = ((10, 21), (21, 10)),
) -> Path:
    """Write ``root``/sys/devices/system/{node,cpu} for the given machine; return ``root``.

    ``mem_gb_per_node`` is GiB (MemTotal = mem * 1024 * 1024 kB); MemFree is 3/4 of it.
    """
    root = Path(root)
    node_base = root / "sys/devices/system/node"
    cpu_base = root / "sys/devices/system/cpu"
    total_cores = nodes * cores_per_node
    total_threads = total_cores * threads_per_core
    every_node = _ranges(range(nodes))
    for name in ("online", "possible", "has_memory", "has_normal_memory", "has_cpu"):
        _write(node_base / name, every_node)
    for name in ("online", "possible", "present"):
        _write(cpu_base / name, _ranges(range(total_threads)))

    for n in range(nodes):
        node_cpus: list[int] = []
        for c in range(cores_per_node):
            core = n * cores_per_node + c
            siblings = [core + t * total_cores for t in range(threads_per_core)]
            node_cpus.extend(siblings)
            for cpu in siblings:
                topo = cpu_base / f"cpu{cpu}" / "topology"
                _write(topo / "thread_siblings_list", _ranges(siblings))
                _write(topo / "core_id", str(c))
                _write(topo / "physical_package_id", str(n))
                _write(topo / "die_id", "0")
        # Caches: private L1d/L1i/L2 per core and one L3 per socket, as on Xeon parts; the
        # reader must pick level 3 and count the shared instance once.
        for cpu in node_cpus:
            core = cpu % total_cores
            siblings = [core + t * total_cores for t in range(threads_per_core)]
            cache = cpu_base / f"cpu{cpu}" / "cache"
            for index, (level, kind, size, shared) in enumerate(
                [
                    (1, "Data", "32K", siblings),
                    (1, "Instruction", "32K", siblings),
                    (2, "Unified", "1024K", siblings),
                    (3, "Unified", f"{l3_mib * 1024}K", node_cpus),
                ]
            ):
                if level == 3 and not l3_mib:
                    continue
                folder = cache / f"index{index}"
                _write(folder / "level", str(level))
                _write(folder / "type", kind)
                _write(folder / "size", size)
                _write(folder / "shared_cpu_list", _ranges(shared))
                _write(folder / "id", str(n if level == 3 else core))

        node_dir = node_base / f"node{n}"
        _write(node_dir / "cpulist", _ranges(node_cpus))
        total_kib = mem_gb_per_node * 1024 * 1024
        free_kib = total_kib * 3 // 4
        _write(
            node_dir / "meminfo",
            f"Node {n} MemTotal:       {total_kib} kB\n"
            f"Node {n} MemFree:        {free_kib} kB\n"
            f"Node {n} MemUsed:        {total_kib - free_kib} kB\n"
            f"Node {n} Shmem:          0 kB",
        )
        _write(node_dir / "distance", " ".join(str(d) for d in distance[n]))
    return root
