"""A machine layout as data: the hardware, the VMs and the storage tiers of a layout TOML.

``load_layout`` reads a layout file (``config/layout.seed.toml`` is the seed's allocation table)
and ``parse_layout`` checks it key by key, every error naming the file, the table and the key;
``hardware_topology`` turns its ``[hardware]`` into a ``Topology`` to plan on.
``coordinator.planner.plan`` places the layout, ``coordinator.planner.render`` turns the plan into
configuration. Units: memory in GiB, disk in GB (10^9 bytes); see ``docs/layout.md``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.core.errors import LayoutError
from coordinator.core.topology import Topology, parse_cpulist, read_topology, synthetic_topology

__all__ = [
    "Hardware",
    "Layout",
    "NodeSpec",
    "Tier",
    "VmSpec",
    "hardware_topology",
    "load_layout",
    "parse_layout",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class Hardware:
    """The machine a layout was written for, or ``source == "host"`` to read this machine."""

    source: str
    nodes: int
    cores_per_node: int
    threads_per_core: int
    memory_gib_per_node: int
    l3_mib_per_node: int
    distance: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class NodeSpec:
    """Per NUMA node: cores kept for QEMU emulator threads and the host, and host memory."""

    id: int
    host_cores: int
    min_host_memory_gib: int
    host_cpus: tuple[int, ...] | None  # explicit threads; None: the node's lowest cores


@dataclass(frozen=True)
class VmSpec:
    """One k3s worker VM: a row of the seed's allocation table."""

    name: str
    k3s_node: str
    node: int
    cores: int
    threads: int
    memory_gib: int
    ssd_gb: int
    hdd_gb: int
    workload: str
    taint: str
    labels: tuple[tuple[str, str], ...]
    cpus: tuple[int, ...] | None  # explicit host threads; None: allocated in layout order


@dataclass(frozen=True)
class Tier:
    """A storage tier's budget: the VMs' disks plus what the host keeps must fit ``total_gb``."""

    name: str
    tier: str
    mount: str
    total_gb: int
    host_gb: int
    buffer_gb: int


@dataclass(frozen=True)
class Layout:
    """A parsed layout file."""

    path: str
    hardware: Hardware
    nodes: tuple[NodeSpec, ...]
    vms: tuple[VmSpec, ...]
    ssd: Tier
    hdd: Tier
    label_prefix: str


_REQUIRED = object()


def _take(
    table: Any, spec: Mapping[str, tuple[type, Any]], where: str, path: str
) -> dict[str, Any]:
    """Check one TOML table against ``spec`` (key -> (type, default)); name file and key."""
    if not isinstance(table, dict):
        raise LayoutError(f"{path}: {where}: expected a table, found {table!r}")
    for key in table:
        if key not in spec:
            raise LayoutError(
                f"{path}: {where}: unknown key {key!r} (known: {', '.join(sorted(spec))})"
            )
    out: dict[str, Any] = {}
    for key, (kind, default) in spec.items():
        if key not in table:
            if default is _REQUIRED:
                raise LayoutError(f"{path}: {where}: missing key {key!r}")
            out[key] = default
            continue
        value: Any = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LayoutError(
                f"{path}: {where}: key {key!r} must be {kind.__name__}, found {value!r}"
            )
        if isinstance(value, int) and value < 0:
            raise LayoutError(f"{path}: {where}: key {key!r} must be >= 0, found {value}")
        out[key] = value
    return out


def _cpus(text: str | None, path: str, where: str, key: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError as exc:
        raise LayoutError(f"{path}: {where}: key {key!r}: {exc}") from None


def _check_label(key: str, value: str, path: str, where: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and not _DNS_NAME.fullmatch(prefix)) or not _LABEL_NAME.fullmatch(name):
        raise LayoutError(f"{path}: {where}: {key!r} is not a valid Kubernetes label key")
    if value and not _LABEL_NAME.fullmatch(value):
        raise LayoutError(f"{path}: {where}: {value!r} is not a valid label value for {key!r}")


def _check_taint(taint: str, path: str, where: str) -> None:
    head, _, effect = taint.rpartition(":")
    key, _, value = head.partition("=")
    if effect not in _TAINT_EFFECTS or not key:
        raise LayoutError(
            f"{path}: {where}: taint {taint!r} must look like key=value:Effect "
            f"with Effect one of {', '.join(_TAINT_EFFECTS)}"
        )
    _check_label(key, value, path, f"{where}: taint")


def _parse_hardware(raw: Any, path: str) -> Hardware:
    hw = _take(
        raw,
        {
            "source": (str, "inline"),
            "nodes": (int, 0),
            "cores_per_node": (int, 0),
            "threads_per_core": (int, 0),
            "memory_gib_per_node": (int, 0),
            "l3_mib_per_node": (int, 0),
            "distance": (list, []),
        },
        "[hardware]",
        path,
    )
    if hw["source"] not in ("inline", "host"):
        raise LayoutError(
            f'{path}: [hardware]: key \'source\' must be "inline" or "host", found {hw["source"]!r}'
        )
    matrix = hw["distance"]
    if hw["source"] == "inline":
        for key in ("nodes", "cores_per_node", "threads_per_core", "memory_gib_per_node"):
            if hw[key] < 1:
                raise LayoutError(f'{path}: [hardware]: source = "inline" needs {key} >= 1')
        n = hw["nodes"]
        if (
            len(matrix) != n
            or not all(isinstance(row, list) and len(row) == n for row in matrix)
            or not all(isinstance(d, int) and d > 0 for row in matrix for d in row)
        ):
            raise LayoutError(
                f"{path}: [hardware]: key 'distance' must be a {n} x {n} matrix of "
                f"positive ints, found {matrix!r}"
            )
    return Hardware(
        source=hw["source"],
        nodes=hw["nodes"],
        cores_per_node=hw["cores_per_node"],
        threads_per_core=hw["threads_per_core"],
        memory_gib_per_node=hw["memory_gib_per_node"],
        l3_mib_per_node=hw["l3_mib_per_node"],
        distance=tuple(tuple(row) for row in matrix),
    )


def _parse_tier(raw: Any, name: str, path: str) -> Tier:
    t = _take(
        raw,
        {
            "tier": (str, _REQUIRED),
            "mount": (str, _REQUIRED),
            "total_gb": (int, _REQUIRED),
            "host_gb": (int, 0),
            "buffer_gb": (int, 0),
        },
        f"[storage.{name}]",
        path,
    )
    return Tier(name=name, **t)


def parse_layout(data: Mapping[str, Any], path: str = "<layout>") -> Layout:
    """Validate a decoded layout TOML; LayoutError names ``path`` and the offending key."""
    top = _take(
        data,
        {
            "hardware": (dict, _REQUIRED),
            "node": (list, _REQUIRED),
            "vm": (list, _REQUIRED),
            "storage": (dict, _REQUIRED),
            "k3s": (dict, {}),
        },
        "top level",
        path,
    )
    hardware = _parse_hardware(top["hardware"], path)
    storage = _take(
        top["storage"], {"ssd": (dict, _REQUIRED), "hdd": (dict, _REQUIRED)}, "[storage]", path
    )
    k3s = _take(top["k3s"], {"label_prefix": (str, "numa-coordinator/")}, "[k3s]", path)
    prefix = k3s["label_prefix"]
    if prefix and not (prefix.endswith("/") and _DNS_NAME.fullmatch(prefix[:-1])):
        raise LayoutError(f"{path}: [k3s]: label_prefix {prefix!r} must be a DNS name plus '/'")

    nodes: list[NodeSpec] = []
    for i, raw in enumerate(top["node"]):
        where = f"[[node]] #{i + 1}"
        n = _take(
            raw,
            {
                "id": (int, _REQUIRED),
                "host_cores": (int, 2),
                "min_host_memory_gib": (int, 4),
                "host_cpus": (str, None),
            },
            where,
            path,
        )
        if any(spec.id == n["id"] for spec in nodes):
            raise LayoutError(f"{path}: {where}: node {n['id']} is listed twice")
        host_cpus = _cpus(n.pop("host_cpus"), path, where, "host_cpus")
        nodes.append(NodeSpec(host_cpus=host_cpus, **n))

    vms: list[VmSpec] = []
    for i, raw in enumerate(top["vm"]):
        label = raw.get("name", "?") if isinstance(raw, dict) else "?"
        where = f"[[vm]] #{i + 1} ({label!r})"
        v = _take(
            raw,
            {
                "name": (str, _REQUIRED),
                "k3s_node": (str, _REQUIRED),
                "node": (int, _REQUIRED),
                "cores": (int, _REQUIRED),
                "threads": (int, _REQUIRED),
                "memory_gib": (int, _REQUIRED),
                "ssd_gb": (int, 0),
                "hdd_gb": (int, 0),
                "workload": (str, ""),
                "taint": (str, _REQUIRED),
                "labels": (dict, {}),
                "cpus": (str, None),
            },
            where,
            path,
        )
        if not _NAME.fullmatch(v["name"]):
            raise LayoutError(f"{path}: {where}: name must match {_NAME.pattern}")
        if not _DNS_NAME.fullmatch(v["k3s_node"]) or len(v["k3s_node"]) > 253:
            raise LayoutError(f"{path}: {where}: k3s_node {v['k3s_node']!r} is not a DNS name")
        for key in ("cores", "threads", "memory_gib"):
            if v[key] < 1:
                raise LayoutError(f"{path}: {where}: key {key!r} must be >= 1")
        for other in vms:
            if other.name == v["name"] or other.k3s_node == v["k3s_node"]:
                raise LayoutError(
                    f"{path}: {where}: name or k3s_node already used by vm {other.name!r}"
                )
        _check_taint(v["taint"], path, where)
        labels = v.pop("labels")
        for key, value in labels.items():
            if not isinstance(value, str):
                raise LayoutError(f"{path}: {where}: label {key!r} must be a string")
            _check_label(key, value, path, where)
        cpus = _cpus(v.pop("cpus"), path, where, "cpus")
        vms.append(VmSpec(labels=tuple(sorted(labels.items())), cpus=cpus, **v))
    if not vms:
        raise LayoutError(f"{path}: no [[vm]] tables")

    return Layout(
        path=path,
        hardware=hardware,
        nodes=tuple(nodes),
        vms=tuple(vms),
        ssd=_parse_tier(storage["ssd"], "ssd", path),
        hdd=_parse_tier(storage["hdd"], "hdd", path),
        label_prefix=prefix,
    )


def load_layout(path: str | Path) -> Layout:
    """Read and validate a layout TOML file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise LayoutError(f"cannot read layout {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LayoutError(f"{path}: not valid TOML: {exc}") from None
    return parse_layout(data, str(path))


def hardware_topology(layout: Layout, sysfs_root: str | Path = "/") -> Topology:
    """The topology a layout describes: built from ``[hardware]``, or read from sysfs."""
    hw = layout.hardware
    if hw.source == "host":
        return read_topology(sysfs_root)
    return synthetic_topology(
        nodes=hw.nodes,
        cores_per_node=hw.cores_per_node,
        threads_per_core=hw.threads_per_core,
        mem_gib_per_node=hw.memory_gib_per_node,
        l3_mib=hw.l3_mib_per_node,
        distance=hw.distance,
        source=f"{layout.path} [hardware]",
    )
