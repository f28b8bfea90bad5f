"""The machine's NUMA topology, read from sysfs.

Everything here reads files under an overridable root, so tests (and ``--sysfs-root``) can point
it at a fake tree shaped like the seed's 2 x 18-core machine. The result is a frozen value that the
daemon checks its config against (``check_nodes``), that ``coordinatorctl topology`` prints, and
that the layout planner (``coordinator.planner.plan``) allocates cores and memory from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.core.errors import CoordinatorError, TopologyError

__all__ = [
    "Core",
    "Node",
    "Topology",
    "check_nodes",
    "format_cpulist",
    "from_json",
    "load_json",
    "parse_cpulist",
    "read_topology",
    "register_cli",
    "render_tree",
    "synthetic_topology",
    "to_json",
]

_KIB_PER_GIB = 1024 * 1024
_NODE_DIR = re.compile(r"node(\d+)")
_CACHE_SIZE = re.compile(r"(\d+)\s*([KMG]?)")
_MEMINFO_LINE = re.compile(r"Node\s+\d+\s+(\w+):\s+(\d+)")


@dataclass(frozen=True)
class Core:
    """One physical core: its package (socket), the kernel's core id, and its sibling threads."""

    package: int
    core_id: int
    threads: tuple[int, ...]


@dataclass(frozen=True)
class Node:
    """One online NUMA node.

    ``cores`` are ordered by their first thread. ``distances`` holds ``(other_node, distance)``
    pairs from the firmware's SLIT, as the kernel reports them in ``nodeN/distance``.
    ``l3_bytes`` sums the distinct L3 caches whose CPUs are on this node (None if sysfs has none).
    """

    id: int
    cpus: tuple[int, ...]
    cores: tuple[Core, ...]
    mem_total_kib: int
    mem_free_kib: int
    distances: tuple[tuple[int, int], ...]
    l3_bytes: int | None
    l3_count: int

    @property
    def packages(self) -> tuple[int, ...]:
        """The sockets this node's cores sit on (one on the seed machine)."""
        return tuple(sorted({core.package for core in self.cores}))

    @property
    def mem_total_gib(self) -> float:
        """MemTotal in GiB (the unit the seed's "126 GB" means)."""
        return self.mem_total_kib / _KIB_PER_GIB

    def distance_to(self, other: int) -> int:
        """The firmware distance from this node to ``other``."""
        for node_id, dist in self.distances:
            if node_id == other:
                return dist
        raise TopologyError(f"node {self.id} has no distance to node {other}")


@dataclass(frozen=True)
class Topology:
    """All online NUMA nodes of a machine, ordered by node id."""

    nodes: tuple[Node, ...]
    # Where it came from ("/", a fake root, a JSON file); for messages only, so not compared.
    source: str = field(default="/", compare=False)

    @property
    def node_ids(self) -> tuple[int, ...]:
        """The online node ids in ascending order."""
        return tuple(node.id for node in self.nodes)

    @property
    def packages(self) -> tuple[int, ...]:
        """All sockets of the machine."""
        return tuple(sorted({pkg for node in self.nodes for pkg in node.packages}))

    def node(self, node_id: int) -> Node:
        """The node with id ``node_id``; TopologyError if it is not online."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise TopologyError(
            f"node {node_id} does not exist on this machine "
            f"(online nodes: {format_cpulist(self.node_ids) or 'none'}; source {self.source})"
        )

    def penalty(self) -> tuple[float, int, int] | None:
        """Cross-node penalty as ``(ratio, remote, local)`` from the SLIT; None with one node.

        The worst remote distance over the best local one, so the figure is never flattering.
        """
        if len(self.nodes) < 2:
            return None
        local = min(node.distance_to(node.id) for node in self.nodes)
        remote = max(
            dist for node in self.nodes for other, dist in node.distances if other != node.id
        )
        return remote / local, remote, local


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse a kernel cpulist such as ``"0-17,36-53"`` into sorted unique ints.

    Also accepts the stride form ``"0-10:2"`` the kernel takes on input; empty text is no CPUs.
    """
    result: set[int] = set()
    for raw in text.strip().split(","):
        part = raw.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if match is None:
            raise ValueError(f"bad cpulist item {part!r} in {text.strip()!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        step = int(match.group(3)) if match.group(3) is not None else 1
        if last < first or step < 1:
            raise ValueError(f"bad cpulist range {part!r} in {text.strip()!r}")
        result.update(range(first, last + 1, step))
    return tuple(sorted(result))


def format_cpulist(cpus: Iterable[int], sep: str = ",") -> str:
    """Format CPU (or node) numbers as a kernel cpulist: ``(0, 1, 2, 36)`` -> ``"0-2,36"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in ordered:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None and prev is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    if start is not None and prev is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return sep.join(parts)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError:
        raise TopologyError(f"{path}: expected an integer, found {text!r}") from None


def _read_cpulist(path: Path) -> tuple[int, ...]:
    text = _read(path)
    try:
        return parse_cpulist(text)
    except ValueError as exc:
        raise TopologyError(f"{path}: {exc}") from None


def _cache_bytes(path: Path) -> int:
    text = _read(path).strip()
    match = _CACHE_SIZE.fullmatch(text)
    if match is None:
        raise TopologyError(f"{path}: expected a cache size like '32768K', found {text!r}")
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]


def _online_nodes(node_base: Path) -> tuple[int, ...]:
    online = node_base / "online"
    if online.exists():
        return _read_cpulist(online)
    # Very old kernels lack node/online; every nodeN folder is then an online node.
    return tuple(
        sorted(
            int(m.group(1))
            for p in node_base.iterdir()
            if (m := _NODE_DIR.fullmatch(p.name)) is not None
        )
    )


def _read_meminfo(path: Path) -> tuple[int, int]:
    values: dict[str, int] = {}
    for line in _read(path).splitlines():
        match = _MEMINFO_LINE.match(line.strip())
        if match is not None:
            values[match.group(1)] = int(match.group(2))
    try:
        return values["MemTotal"], values["MemFree"]
    except KeyError as exc:
        raise TopologyError(f"{path}: no {exc.args[0]} line") from None


def _read_cores(cpu_base: Path, cpus: tuple[int, ...]) -> tuple[Core, ...]:
    cores: dict[tuple[int, ...], Core] = {}
    on_node = set(cpus)
    for cpu in cpus:
        topo = cpu_base / f"cpu{cpu}" / "topology"
        # Siblings on other nodes cannot happen on real hardware; keep the node's own only.
        siblings = tuple(t for t in _read_cpulist(topo / "thread_siblings_list") if t in on_node)
        if cpu not in siblings:
            siblings = tuple(sorted({*siblings, cpu}))
        if siblings not in cores:
            cores[siblings] = Core(
                package=_read_int(topo / "physical_package_id"),
                core_id=_read_int(topo / "core_id"),
                threads=siblings,
            )
    return tuple(sorted(cores.values(), key=lambda core: core.threads))


def _read_l3(cpu_base: Path, cpus: tuple[int, ...]) -> tuple[int | None, int]:
    # One L3 is shared by many CPUs; key each instance by its CPU set so it is counted once.
    seen: dict[tuple[int, ...], int] = {}
    for cpu in cpus:
        cache = cpu_base / f"cpu{cpu}" / "cache"
        if not cache.is_dir():
            continue
        for index in sorted(cache.glob("index*")):
            if _read_int(index / "level") != 3:
                continue
            shared = _read_cpulist(index / "shared_cpu_list") or (cpu,)
            seen.setdefault(shared, _cache_bytes(index / "size"))
    if not seen:
        return None, 0
    return sum(seen.values()), len(seen)


def read_topology(root: str | Path = "/") -> Topology:
    """Read the online NUMA nodes, their cores, memory, distances and L3 from ``root``/sys."""
    root = Path(root)
    node_base = root / "sys/devices/system/node"
    cpu_base = root / "sys/devices/system/cpu"
    if not node_base.is_dir():
        raise TopologyError(
            f"{node_base} not found: expected a NUMA sysfs (kernel with CONFIG_NUMA) under {root}"
        )
    online_cpus = (
        set(_read_cpulist(cpu_base / "online")) if (cpu_base / "online").exists() else None
    )
    node_ids = _online_nodes(node_base)
    if not node_ids:
        raise TopologyError(f"{node_base}: no online NUMA node")
    nodes: list[Node] = []
    for node_id in node_ids:
        node_dir = node_base / f"node{node_id}"
        cpus = _read_cpulist(node_dir / "cpulist")
        if online_cpus is not None:
            cpus = tuple(c for c in cpus if c in online_cpus)
        mem_total, mem_free = _read_meminfo(node_dir / "meminfo")
        row = _read(node_dir / "distance").split()
        # The kernel prints one distance per online node, in node order.
        if len(row) != len(node_ids) or not all(d.isdigit() for d in row):
            raise TopologyError(
                f"{node_dir / 'distance'}: expected {len(node_ids)} distances "
                f"(one per online node), found {' '.join(row)!r}"
            )
        l3_bytes, l3_count = _read_l3(cpu_base, cpus)
        nodes.append(
            Node(
                id=node_id,
                cpus=cpus,
                cores=_read_cores(cpu_base, cpus),
                mem_total_kib=mem_total,
                mem_free_kib=mem_free,
                distances=tuple(zip(node_ids, (int(d) for d in row), strict=True)),
                l3_bytes=l3_bytes,
                l3_count=l3_count,
            )
        )
    return Topology(nodes=tuple(nodes), source=str(root))


def synthetic_topology(
    *,
    nodes: int = 2,
    cores_per_node: int = 18,
    threads_per_core: int = 2,
    mem_gib_per_node: int = 126,
    l3_mib: int = 45,
    distance: Sequence[Sequence[int]] = ((10, 21), (21, 10)),
    source: str = "synthetic",
) -> Topology:
    """A topology numbered like the seed machine, without reading sysfs.

    Core c of node n is global core ``g = n * cores_per_node + c`` with threads
    ``g, g + total_cores, ...`` (the seed's "core N -> threads N, N+36"). Used for layouts that
    describe their hardware inline instead of reading it from the host.
    """
    if len(distance) != nodes or any(len(row) != nodes for row in distance):
        raise TopologyError(f"distance matrix must be {nodes} x {nodes}, found {distance!r}")
    total_cores = nodes * cores_per_node
    result: list[Node] = []
    for n in range(nodes):
        cores = tuple(
            Core(
                package=n,
                core_id=c,
                threads=tuple(
                    n * cores_per_node + c + t * total_cores for t in range(threads_per_core)
                ),
            )
            for c in range(cores_per_node)
        )
        kib = mem_gib_per_node * _KIB_PER_GIB
        result.append(
            Node(
                id=n,
                cpus=tuple(sorted(t for core in cores for t in core.threads)),
                cores=cores,
                mem_total_kib=kib,
                mem_free_kib=kib,
                distances=tuple((m, int(distance[n][m])) for m in range(nodes)),
                l3_bytes=l3_mib * 1024 * 1024 if l3_mib else None,
                l3_count=1 if l3_mib else 0,
            )
        )
    return Topology(nodes=tuple(result), source=source)


def check_nodes(topo: Topology, node_ids: Iterable[int]) -> None:
    """Raise TopologyError naming the first configured node that is not online or has no memory."""
    for node_id in node_ids:
        node = topo.node(node_id)
        if node.mem_total_kib <= 0:
            raise TopologyError(
                f"configured node {node_id} has no memory (MemTotal {node.mem_total_kib} kB "
                f"in {topo.source}); node-local staging needs memory on that node"
            )


def _size(n_bytes: int) -> str:
    mib = n_bytes / (1024 * 1024)
    return f"{mib:g} MiB" if mib < 1024 else f"{mib / 1024:g} GiB"


def _gib(kib: int) -> str:
    return f"{round(kib / _KIB_PER_GIB, 1):g} GiB"


_SOCKET_WORDS = {1: "Single-Socket", 2: "Dual-Socket", 4: "Quad-Socket"}


def render_tree(topo: Topology) -> str:
    """A text tree in the shape of the seed's "Hardware Topology" block, plus distances."""
    sockets = len(topo.packages)
    lines = [f"{_SOCKET_WORDS.get(sockets, f'{sockets}-Socket')} NUMA System:"]
    for i, node in enumerate(topo.nodes):
        last = i == len(topo.nodes) - 1
        pad = "    " if last else "│   "
        pkgs = node.packages
        where = f" (Socket {pkgs[0]})" if len(pkgs) == 1 else ""
        if len(pkgs) > 1:
            where = f" (Sockets {format_cpulist(pkgs, ', ')})"
        lines.append(f"{'└─' if last else '├─'} Node {node.id}{where}:")
        threads = format_cpulist(node.cpus, ", ") or "none"
        lines.append(
            f"{pad}├─ {len(node.cores)} physical cores ({len(node.cpus)} threads: {threads})"
        )
        if node.cores:
            shown = [f"{'+'.join(map(str, c.threads))}" for c in node.cores]
            if len(shown) > 4:
                shown = [*shown[:2], "…", shown[-1]]
            lines.append(f"{pad}├─ sibling threads per core: {'  '.join(shown)}")
        lines.append(f"{pad}├─ {_gib(node.mem_total_kib)} RAM ({_gib(node.mem_free_kib)} free)")
        if node.l3_bytes is None:
            lines.append(f"{pad}├─ L3 cache: not reported")
        else:
            shared = "shared" if node.l3_count == 1 else f"{node.l3_count} instances"
            lines.append(f"{pad}├─ {_size(node.l3_bytes)} L3 cache ({shared})")
        row = ", ".join(f"node {other}: {dist}" for other, dist in node.distances)
        lines.append(f"{pad}└─ distances: {row}")
        if not last:
            lines.append("│")
    lines.append("")
    penalty = topo.penalty()
    if penalty is None:
        lines.append("NUMA Cross-Node Penalty: none (single node)")
    else:
        ratio, remote, local = penalty
        lines.append(
            f"NUMA Cross-Node Penalty: {ratio:.1f}x (distance {remote} vs {local}, firmware SLIT)"
        )
    return "\n".join(lines) + "\n"


_FORMAT = "numa-coordinator/topology/1"


def to_json(topo: Topology) -> dict[str, Any]:
    """A JSON-ready dict of the topology; ``from_json`` reads it back."""
    penalty = topo.penalty()
    return {
        "format": _FORMAT,
        "source": topo.source,
        "nodes": [
            {
                "id": node.id,
                "cpus": format_cpulist(node.cpus),
                "packages": list(node.packages),
                "cores": [
                    {"package": c.package, "core_id": c.core_id, "threads": list(c.threads)}
                    for c in node.cores
                ],
                "mem_total_kib": node.mem_total_kib,
                "mem_free_kib": node.mem_free_kib,
                "l3_bytes": node.l3_bytes,
                "l3_count": node.l3_count,
                "distances": {str(other): dist for other, dist in node.distances},
            }
            for node in topo.nodes
        ],
        "penalty": None
        if penalty is None
        else {"ratio": round(penalty[0], 3), "remote": penalty[1], "local": penalty[2]},
    }


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise TopologyError(f"{where}: missing key {key!r}")
    value = obj[key]
    # bool is an int subclass; a JSON true where a count belongs is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TopologyError(f"{where}: key {key!r} must be {kind.__name__}, found {value!r}")
    return value


def from_json(data: Mapping[str, Any], source: str = "<json>") -> Topology:
    """Rebuild a Topology from ``to_json`` output; TopologyError names the bad key."""
    if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
        raise TopologyError(f"{source}: not a topology file (expected format {_FORMAT!r})")
    nodes: list[Node] = []
    for i, raw in enumerate(_get(data, "nodes", list, source)):
        where = f"{source}: nodes[{i}]"
        if not isinstance(raw, Mapping):
            raise TopologyError(f"{where}: expected an object, found {raw!r}")
        cores: list[Core] = []
        for j, core in enumerate(_get(raw, "cores", list, where)):
            cwhere = f"{where}.cores[{j}]"
            if not isinstance(core, Mapping):
                raise TopologyError(f"{cwhere}: expected an object, found {core!r}")
            threads = _get(core, "threads", list, cwhere)
            if not threads or not all(isinstance(t, int) for t in threads):
                raise TopologyError(f"{cwhere}: 'threads' must be a non-empty list of CPUs")
            cores.append(
                Core(
                    package=_get(core, "package", int, cwhere),
                    core_id=_get(core, "core_id", int, cwhere),
                    threads=tuple(sorted(threads)),
                )
            )
        try:
            cpus = parse_cpulist(_get(raw, "cpus", str, where))
            dists = _get(raw, "distances", dict, where)
            distances = tuple(sorted((int(k), int(v)) for k, v in dists.items()))
        except ValueError as exc:
            raise TopologyError(f"{where}: {exc}") from None
        l3 = raw.get("l3_bytes")
        if l3 is not None and (not isinstance(l3, int) or isinstance(l3, bool)):
            raise TopologyError(f"{where}: key 'l3_bytes' must be int or null, found {l3!r}")
        nodes.append(
            Node(
                id=_get(raw, "id", int, where),
                cpus=cpus,
                cores=tuple(sorted(cores, key=lambda c: c.threads)),
                mem_total_kib=_get(raw, "mem_total_kib", int, where),
                mem_free_kib=_get(raw, "mem_free_kib", int, where),
                distances=distances,
                l3_bytes=l3,
                l3_count=_get(raw, "l3_count", int, where),
            )
        )
    if not nodes:
        raise TopologyError(f"{source}: no nodes")
    return Topology(nodes=tuple(sorted(nodes, key=lambda n: n.id)), source=source)


def load_json(path: str | Path) -> Topology:
    """Read a topology JSON file as written by ``coordinatorctl topology --json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{path}: not valid JSON: {exc}") from None
    return from_json(data, source=str(path))


def _cli(args: argparse.Namespace) -> int:
    try:
        topo = read_topology(args.sysfs_root)
    except CoordinatorError as exc:
        print(f"coordinatorctl: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(topo), indent=2))
    else:
        print(render_tree(topo), end="")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``topology [--json] [--sysfs-root DIR]`` to a coordinatorctl subparsers object."""
    parser = subparsers.add_parser(
        "topology", help="print this machine's NUMA topology", description=render_tree.__doc__
    )
    parser.add_argument("--json", action="store_true", help="print JSON (input for plan)")
    parser.add_argument(
        "--sysfs-root", default="/", metavar="DIR", help="read DIR/sys instead of /sys"
    )
    parser.set_defaults(func=_cli)
