"""The machine layout as code: VM pinning, emulator isolation, k3s taints and storage budgets.

``load_layout`` reads a layout TOML (``config/layout.seed.toml`` is the seed's allocation table),
``make_plan`` places it on a ``Topology`` and checks it, and the ``render_*`` functions turn the
plan into what an operator applies: libvirt domain XML fragments, k3s taints and labels, systemd
CPUAffinity drop-ins, and a report. Everything is pure except ``load_layout``, ``write_plan`` and
the CLI handler. Units: memory in GiB, disk in GB (10^9 bytes); see ``docs/layout.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError, LayoutError
from coordinator.topology import (
    Core,
    Node,
    Topology,
    format_cpulist,
    load_json,
    parse_cpulist,
    read_topology,
    synthetic_topology,
)

__all__ = [
    "Hardware",
    "Layout",
    "NodePlan",
    "NodeSpec",
    "Plan",
    "Tier",
    "Totals",
    "VmPlan",
    "VmSpec",
    "check_plan",
    "hardware_topology",
    "load_layout",
    "make_plan",
    "parse_layout",
    "plan_to_json",
    "register_cli",
    "render_domain_fragment",
    "render_k3s_commands",
    "render_k3s_config",
    "render_report",
    "render_systemd_dropins",
    "totals",
    "write_plan",
]

_KIB_PER_GIB = 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_AGENT_UNIT = "numa-staging-agent@{node}.service"
_COORDINATOR_UNIT = "numa-coordinator.service"


# --------------------------------------------------------------------------- layout (input)


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


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class VmPlan:
    """A VM placed on host cores; vCPU k*T+t runs on thread t of the k-th core."""

    spec: VmSpec
    cores: tuple[Core, ...]
    emulator_cpus: tuple[int, ...]

    @property
    def cpus(self) -> tuple[int, ...]:
        """Every host thread the VM's vCPUs run on."""
        return tuple(sorted(t for core in self.cores for t in core.threads))

    @property
    def threads_per_core(self) -> int:
        """Guest threads per core: the host's SMT width, so sibling threads stay together."""
        return len(self.cores[0].threads) if self.cores else 0

    @property
    def vcpupins(self) -> tuple[tuple[int, int], ...]:
        """``(vcpu, host_cpu)`` pairs. Guest core k is host core k, thread for thread."""
        # QEMU numbers x86 vCPUs thread-fastest (vCPU 2k, 2k+1 = threads of guest core k), so
        # pinning in this order makes guest siblings share a host core and its L1/L2.
        flat = (t for core in self.cores for t in core.threads)
        return tuple(enumerate(flat))


@dataclass(frozen=True)
class NodePlan:
    """A NUMA node's host side: its reserved cores (emulator threads, coordinator, agent)."""

    spec: NodeSpec
    node: Node
    host_cores: tuple[Core, ...]

    @property
    def host_cpus(self) -> tuple[int, ...]:
        """The reserved host threads on this node."""
        return tuple(sorted(t for core in self.host_cores for t in core.threads))


@dataclass(frozen=True)
class Plan:
    """A layout placed on a topology."""

    layout: Layout
    topology: Topology
    nodes: tuple[NodePlan, ...]
    vms: tuple[VmPlan, ...]

    def node_plan(self, node_id: int) -> NodePlan:
        """The host side of node ``node_id``."""
        for node in self.nodes:
            if node.spec.id == node_id:
                return node
        raise LayoutError(f"{self.layout.path}: node {node_id} has no [[node]] table")


def _claim(node: Node, cpus: tuple[int, ...], owner: str) -> tuple[tuple[Core, ...], list[str]]:
    """Turn an explicit thread list into whole cores of ``node``; report what does not fit."""
    problems: list[str] = []
    wanted = set(cpus)
    on_node = set(node.cpus)
    if stray := sorted(wanted - on_node):
        problems.append(
            f"{owner}: cpus {format_cpulist(stray)} are not on node {node.id} "
            f"(node {node.id} has {format_cpulist(node.cpus)}); a VM must not span nodes"
        )
    cores = tuple(core for core in node.cores if wanted & set(core.threads))
    problems.extend(
        f"{owner}: cpus list splits core {core.package}/{core.core_id} (threads "
        f"{format_cpulist(core.threads)}); sibling threads must stay together"
        for core in cores
        if not set(core.threads) <= wanted
    )
    return cores, problems


def make_plan(layout: Layout, topo: Topology) -> Plan:
    """Place every VM on its node's cores and check the result; LayoutError lists every problem.

    Host cores come first: ``host_cpus`` if given, else the node's lowest cores (core 0 carries
    most IRQs and housekeeping, so that noise stays off vCPUs). Then VMs with explicit ``cpus``;
    then the other VMs take the next free cores in layout order.
    """
    problems: list[str] = []
    specs = {spec.id: spec for spec in layout.nodes}
    taken: dict[int, set[tuple[int, ...]]] = {n: set() for n in topo.node_ids}

    def free(node: Node) -> list[Core]:
        return [core for core in node.cores if core.threads not in taken[node.id]]

    def node_of(node_id: int, owner: str) -> Node | None:
        if node_id not in topo.node_ids:
            problems.append(
                f"{owner}: node {node_id} does not exist on this machine "
                f"(online nodes: {format_cpulist(topo.node_ids)}; topology from {topo.source})"
            )
            return None
        return topo.node(node_id)

    node_plans: list[NodePlan] = []
    for spec in layout.nodes:
        node = node_of(spec.id, f"[[node]] {spec.id}")
        if node is None:
            continue
        if spec.host_cpus is not None:
            host, errs = _claim(node, spec.host_cpus, f"node {spec.id} host_cpus")
            problems += errs
        else:
            host = tuple(free(node)[: spec.host_cores])
            if len(host) < spec.host_cores:
                problems.append(
                    f"node {spec.id}: host_cores = {spec.host_cores} but node {spec.id} "
                    f"has only {len(node.cores)} physical cores"
                )
        taken[node.id].update(c.threads for c in host)
        node_plans.append(NodePlan(spec=spec, node=node, host_cores=host))
    host_by_node = {np.spec.id: np for np in node_plans}

    # Explicit VM cpus are claimed before any automatic placement, so it goes around them;
    # overlaps with host cores or other VMs are left for check_plan to report.
    vm_nodes: dict[str, Node] = {}
    claimed: dict[str, tuple[Core, ...]] = {}
    for vm in layout.vms:
        if vm.node not in specs:
            problems.append(
                f"vm {vm.name!r}: node {vm.node} has no [[node]] table in {layout.path} "
                "(its emulator/host cores are undefined)"
            )
            continue
        node = node_of(vm.node, f"vm {vm.name!r}")
        if node is None:
            continue
        vm_nodes[vm.name] = node
        if vm.cpus is not None:
            cores, errs = _claim(node, vm.cpus, f"vm {vm.name!r}")
            problems += errs
            claimed[vm.name] = cores
            taken[node.id].update(c.threads for c in cores)

    vm_plans: list[VmPlan] = []
    placed: dict[int, list[str]] = {}
    for vm in layout.vms:
        node = vm_nodes.get(vm.name)
        if node is None:
            continue
        mine = claimed.get(vm.name)
        if mine is None:
            available = free(node)
            if len(available) < vm.cores:
                others = ", ".join(
                    [f"host {len(host_by_node[node.id].host_cores)}", *placed.get(node.id, [])]
                )
                problems.append(
                    f"vm {vm.name!r}: cores over-subscribed on node {node.id}: needs "
                    f"{vm.cores}, only {len(available)} of {len(node.cores)} physical cores "
                    f"are free ({others})"
                )
                continue
            mine = tuple(available[: vm.cores])
            taken[node.id].update(c.threads for c in mine)
        cores = mine
        placed.setdefault(node.id, []).append(f"{vm.name} {len(cores)}")
        plan_vm = VmPlan(spec=vm, cores=cores, emulator_cpus=host_by_node[node.id].host_cpus)
        if len(cores) != vm.cores:
            problems.append(
                f"vm {vm.name!r}: cores = {vm.cores} but its cpus list holds {len(cores)} cores"
            )
        if len({len(c.threads) for c in cores}) > 1:
            problems.append(
                f"vm {vm.name!r}: its cores have different thread counts "
                f"({format_cpulist(plan_vm.cpus)}); the guest topology needs uniform cores"
            )
        elif len(plan_vm.cpus) != vm.threads:
            problems.append(
                f"vm {vm.name!r}: threads = {vm.threads} but {len(cores)} cores on node "
                f"{node.id} have {plan_vm.threads_per_core} threads each "
                f"({len(plan_vm.cpus)}); sibling threads stay together, so set threads = "
                f"{len(plan_vm.cpus)}"
            )
        vm_plans.append(plan_vm)

    plan = Plan(layout=layout, topology=topo, nodes=tuple(node_plans), vms=tuple(vm_plans))
    problems += check_plan(plan)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LayoutError(f"{layout.path}: the layout does not fit this machine:\n{lines}")
    return plan


def check_plan(plan: Plan) -> list[str]:
    """Every rule the seed relies on, checked on the finished plan; returns the violations.

    No host thread runs two vCPUs; each VM's vCPUs and memory are on its one node; emulator
    (host) threads are disjoint from every vCPU; memory per node and SSD/HDD fit their budgets.
    """
    problems: list[str] = []
    owner: dict[int, str] = {}
    for vm in plan.vms:
        for vcpu, cpu in vm.vcpupins:
            who = f"vm {vm.spec.name!r} vCPU {vcpu}"
            if cpu in owner:
                problems.append(f"cpu {cpu} is pinned twice: {owner[cpu]} and {who}")
            else:
                owner[cpu] = who
    cpu_node = {cpu: node.id for node in plan.topology.nodes for cpu in node.cpus}
    for vm in plan.vms:
        away = sorted({cpu_node.get(cpu, -1) for cpu in vm.cpus} - {vm.spec.node})
        if away:
            problems.append(
                f"vm {vm.spec.name!r} spans nodes: memory is bound to node {vm.spec.node} but "
                f"vCPUs run on threads of node(s) {', '.join(map(str, away))} "
                "(-1: on no node)"
            )
    emulators: dict[int, list[str]] = {}
    for vm in plan.vms:
        for cpu in vm.emulator_cpus:
            emulators.setdefault(cpu, []).append(vm.spec.name)
    for cpu, vms in sorted(emulators.items()):
        if cpu in owner:
            problems.append(
                f"emulator cpu {cpu} (of vm {', '.join(map(repr, vms))}) is also {owner[cpu]}; "
                "emulator and host cores must be disjoint from vCPUs"
            )
    for np in plan.nodes:
        budget_kib = np.node.mem_total_kib - np.spec.min_host_memory_gib * _KIB_PER_GIB
        used = 0
        for vm in (v for v in plan.vms if v.spec.node == np.spec.id):
            used += vm.spec.memory_gib * _KIB_PER_GIB
            if used > budget_kib:
                problems.append(
                    f"vm {vm.spec.name!r}: memory over budget on node {np.spec.id}: VMs there "
                    f"need {used // _KIB_PER_GIB} GiB up to and including this one, node has "
                    f"{np.node.mem_total_kib / _KIB_PER_GIB:.1f} GiB and the host keeps "
                    f"{np.spec.min_host_memory_gib} GiB"
                )
    for tier in (plan.layout.ssd, plan.layout.hdd):
        budget = tier.total_gb - tier.host_gb - tier.buffer_gb
        used = 0
        for vm in plan.vms:
            used += vm.spec.ssd_gb if tier.name == "ssd" else vm.spec.hdd_gb
            if used > budget:
                problems.append(
                    f"vm {vm.spec.name!r}: {tier.name.upper()} over budget: VMs need {used} GB "
                    f"up to and including this one, {tier.name} has {tier.total_gb} GB of which "
                    f"the host keeps {tier.host_gb} GB and a buffer {tier.buffer_gb} GB"
                )
                break
    return problems


@dataclass(frozen=True)
class Totals:
    """The allocation table's TOTAL row and what is left for the host."""

    cores: int
    threads: int
    memory_gib: int
    ssd_gb: int
    hdd_gb: int
    host_memory_gib: tuple[tuple[int, float], ...]  # (node, GiB left beside the VMs)
    host_ssd_gb: int
    host_hdd_gb: int


def totals(plan: Plan) -> Totals:
    """Sum VMs and host cores as the seed's table does, and what the host keeps."""
    vms, hosts = plan.vms, plan.nodes
    return Totals(
        cores=sum(len(v.cores) for v in vms) + sum(len(n.host_cores) for n in hosts),
        threads=sum(len(v.cpus) for v in vms) + sum(len(n.host_cpus) for n in hosts),
        memory_gib=sum(v.spec.memory_gib for v in vms),
        ssd_gb=sum(v.spec.ssd_gb for v in vms),
        hdd_gb=sum(v.spec.hdd_gb for v in vms),
        host_memory_gib=tuple(
            (
                n.spec.id,
                n.node.mem_total_kib / _KIB_PER_GIB
                - sum(v.spec.memory_gib for v in vms if v.spec.node == n.spec.id),
            )
            for n in hosts
        ),
        host_ssd_gb=plan.layout.ssd.total_gb - sum(v.spec.ssd_gb for v in vms),
        host_hdd_gb=plan.layout.hdd.total_gb - sum(v.spec.hdd_gb for v in vms),
    )


# --------------------------------------------------------------------------- outputs


def render_domain_fragment(vm: VmPlan, layout_path: str = "") -> str:
    """libvirt domain XML elements for one VM, to merge into its domain (``virsh edit``)."""
    elements: list[ET.Element] = []
    memory = ET.Element("memory", unit="GiB")
    memory.text = str(vm.spec.memory_gib)
    vcpu = ET.Element("vcpu", placement="static")
    vcpu.text = str(len(vm.cpus))
    cputune = ET.Element("cputune")
    for guest, host in vm.vcpupins:
        ET.SubElement(cputune, "vcpupin", vcpu=str(guest), cpuset=str(host))
    ET.SubElement(cputune, "emulatorpin", cpuset=format_cpulist(vm.emulator_cpus))
    numatune = ET.Element("numatune")
    ET.SubElement(numatune, "memory", mode="strict", nodeset=str(vm.spec.node))
    # host-passthrough: pinned, never-migrated VMs gain the host's vector units (AVX-512/AMX)
    # that SLM inference lives on; the topology makes the guest scheduler see real siblings.
    cpu = ET.Element("cpu", mode="host-passthrough")
    ET.SubElement(
        cpu,
        "topology",
        sockets="1",
        cores=str(len(vm.cores)),
        threads=str(vm.threads_per_core),
    )
    elements += [memory, vcpu, cputune, numatune, cpu]
    parts = [
        f"<!-- vm {vm.spec.name} on NUMA node {vm.spec.node}: generated by coordinatorctl plan"
        f"{' from ' + layout_path if layout_path else ''}. Merge into the domain with "
        "virsh edit; see docs/layout.md. -->"
    ]
    for element in elements:
        ET.indent(element)
        parts.append(ET.tostring(element, encoding="unicode"))
    return "\n".join(parts) + "\n"


def _labels(plan: Plan, vm: VmSpec) -> list[tuple[str, str]]:
    prefix = plan.layout.label_prefix
    auto = [(f"{prefix}numa-node", str(vm.node)), (f"{prefix}vm", vm.name)] if prefix else []
    return [*vm.labels, *auto]


def render_k3s_commands(plan: Plan) -> str:
    """A shell script of ``kubectl taint`` / ``kubectl label`` for already-joined workers."""
    lines = [
        "#!/bin/sh",
        f"# Taints and labels of the k3s workers, generated from {plan.layout.path}.",
        "# Idempotent (--overwrite); run where kubectl reaches the cluster.",
        "set -eu",
    ]
    for vm in plan.vms:
        node = shlex.quote(vm.spec.k3s_node)
        labels = " ".join(shlex.quote(f"{k}={v}") for k, v in _labels(plan, vm.spec))
        lines.append(f"kubectl taint nodes {node} {shlex.quote(vm.spec.taint)} --overwrite")
        lines.append(f"kubectl label nodes {node} {labels} --overwrite")
    return "\n".join(lines) + "\n"


def render_k3s_config(plan: Plan, vm: VmPlan) -> str:
    """k3s agent config YAML for one worker, so it registers already tainted and labelled."""
    # json.dumps gives double-quoted scalars, which are valid YAML and need no YAML library.
    labels = "".join(f"  - {json.dumps(f'{k}={v}')}\n" for k, v in _labels(plan, vm.spec))
    return (
        f"# {vm.spec.k3s_node}: vm {vm.spec.name} on NUMA node {vm.spec.node}, generated from "
        f"{plan.layout.path}.\n"
        "# Install in the worker as /etc/rancher/k3s/config.yaml.d/50-numa.yaml before it joins;\n"
        "# k3s applies node-label and node-taint when the node registers. The '+' appends to\n"
        "# lists from config.yaml instead of replacing them (drop-ins merge last-wins).\n"
        f"node-label+:\n{labels}"
        f"node-taint+:\n  - {json.dumps(vm.spec.taint)}\n"
    )


def render_systemd_dropins(plan: Plan) -> dict[str, str]:
    """CPUAffinity drop-ins (relative path -> text) keeping host daemons on host cores."""

    def dropin(why: str, cpus: tuple[int, ...]) -> str:
        return (
            f"# Generated by coordinatorctl plan from {plan.layout.path}.\n"
            f"# {why} Keeps it off every vCPU thread, so staging never steals guest cycles.\n"
            f"[Service]\nCPUAffinity={format_cpulist(cpus)}\n"
        )

    every = tuple(sorted(c for n in plan.nodes for c in n.host_cpus))
    out = {
        f"{_COORDINATOR_UNIT}.d/50-cpuaffinity.conf": dropin(
            "The coordinator is not node-bound; it may use any node's host cores.", every
        )
    }
    for n in plan.nodes:
        unit = _AGENT_UNIT.format(node=n.spec.id)
        out[f"{unit}.d/50-cpuaffinity.conf"] = dropin(
            f"The node {n.spec.id} staging agent runs on node {n.spec.id}'s host cores.",
            n.host_cpus,
        )
    return out


def _gb(value: int) -> str:
    return "-" if value == 0 else (f"{value // 1000}TB" if value % 1000 == 0 else f"{value}GB")


def render_report(plan: Plan) -> str:
    """The allocation table, the pinning, what the host keeps, and the checks that passed."""
    t = totals(plan)
    rows = [
        "| VM | NUMA | Cores | Threads | Memory | SSD | HDD | Workload |",
        "|----|------|-------|---------|--------|-----|-----|----------|",
    ]
    for vm in plan.vms:
        s = vm.spec
        rows.append(
            f"| {s.name} | {s.node} | {len(vm.cores)} | {len(vm.cpus)} | {s.memory_gib}GB | "
            f"{_gb(s.ssd_gb)} | {_gb(s.hdd_gb)} | {s.workload} |"
        )
    for n in plan.nodes:
        users = ", ".join(v.spec.name for v in plan.vms if v.spec.node == n.spec.id) or "no VM"
        rows.append(
            f"| Emulator (N{n.spec.id}) | {n.spec.id} | {len(n.host_cores)} | "
            f"{len(n.host_cpus)} | - | - | - | emulator ({users}) + host |"
        )
    rows.append(
        f"| **TOTAL** | - | {t.cores} | {t.threads} | {t.memory_gib}GB | {_gb(t.ssd_gb)} | "
        f"{_gb(t.hdd_gb)} | - |"
    )
    pins = [
        f"  {vm.spec.name}: node {vm.spec.node}, vCPUs 0-{len(vm.cpus) - 1} on threads "
        f"{format_cpulist(vm.cpus)} (sockets=1 cores={len(vm.cores)} "
        f"threads={vm.threads_per_core}), emulator on {format_cpulist(vm.emulator_cpus)}, "
        f"memory strict on node {vm.spec.node}"
        for vm in plan.vms
    ]
    pins += [
        f"  host node {n.spec.id}: cores {format_cpulist(n.host_cpus)} "
        f"(emulator threads, {_AGENT_UNIT.format(node=n.spec.id)}, {_COORDINATOR_UNIT})"
        for n in plan.nodes
    ]
    memory = ", ".join(f"node {node} {gib:.1f} GiB" for node, gib in t.host_memory_gib)
    host_mem = sum(gib for _, gib in t.host_memory_gib)
    ssd, hdd = plan.layout.ssd, plan.layout.hdd
    return (
        "\n".join(
            [
                f"Layout {plan.layout.path} on topology from {plan.topology.source}",
                "",
                *rows,
                "",
                "Pinning:",
                *pins,
                "",
                "Remaining for the host:",
                f"  RAM: {host_mem:.1f} GiB ({memory})",
                f"  SSD: {t.host_ssd_gb} GB of {ssd.total_gb} GB ({ssd.host_gb} GB host "
                f"operations, {ssd.buffer_gb} GB buffer, "
                f"{t.host_ssd_gb - ssd.host_gb - ssd.buffer_gb} GB unassigned)",
                f"  HDD: {t.host_hdd_gb} GB of {hdd.total_gb} GB",
                "",
                "Checks passed: no vCPU pinned twice; every VM on one node (vCPUs and memory); "
                "emulator cores disjoint from vCPUs; memory, SSD and HDD within budget.",
            ]
        )
        + "\n"
    )


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict (``plan --json``)."""
    t = totals(plan)
    return {
        "layout": plan.layout.path,
        "topology_source": plan.topology.source,
        "vms": [
            {
                "name": vm.spec.name,
                "k3s_node": vm.spec.k3s_node,
                "node": vm.spec.node,
                "cores": [list(c.threads) for c in vm.cores],
                "cpus": format_cpulist(vm.cpus),
                "vcpupin": {str(v): c for v, c in vm.vcpupins},
                "emulatorpin": format_cpulist(vm.emulator_cpus),
                "topology": {
                    "sockets": 1,
                    "cores": len(vm.cores),
                    "threads": vm.threads_per_core,
                },
                "memory_gib": vm.spec.memory_gib,
                "ssd_gb": vm.spec.ssd_gb,
                "hdd_gb": vm.spec.hdd_gb,
                "taint": vm.spec.taint,
                "labels": dict(_labels(plan, vm.spec)),
            }
            for vm in plan.vms
        ],
        "host": [
            {"node": n.spec.id, "cpus": format_cpulist(n.host_cpus), "cores": len(n.host_cores)}
            for n in plan.nodes
        ],
        "totals": {
            "cores": t.cores,
            "threads": t.threads,
            "memory_gib": t.memory_gib,
            "ssd_gb": t.ssd_gb,
            "hdd_gb": t.hdd_gb,
            "host_memory_gib": {str(node): round(gib, 3) for node, gib in t.host_memory_gib},
            "host_ssd_gb": t.host_ssd_gb,
            "host_hdd_gb": t.host_hdd_gb,
        },
    }


def write_plan(plan: Plan, out: str | Path) -> list[Path]:
    """Write every artefact of the plan under ``out``; return the files written."""
    out = Path(out)
    files: dict[str, str] = {
        "report.txt": render_report(plan),
        "plan.json": json.dumps(plan_to_json(plan), indent=2) + "\n",
        "k3s/taints.sh": render_k3s_commands(plan),
    }
    for vm in plan.vms:
        files[f"domains/{vm.spec.name}.xml"] = render_domain_fragment(vm, plan.layout.path)
        files[f"k3s/{vm.spec.k3s_node}.yaml"] = render_k3s_config(plan, vm)
    for rel, text in render_systemd_dropins(plan).items():
        files[f"systemd/{rel}"] = text
    written: list[Path] = []
    try:
        for rel, text in files.items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
        (out / "k3s/taints.sh").chmod(0o755)
    except OSError as exc:
        raise LayoutError(f"cannot write plan under {out}: {exc}") from exc
    return written


# --------------------------------------------------------------------------- CLI


def _cli(args: argparse.Namespace) -> int:
    try:
        layout = load_layout(args.layout)
        if args.topology is not None:
            topo = load_json(args.topology)
        elif args.from_host or args.sysfs_root is not None:
            topo = read_topology(args.sysfs_root or "/")
        else:
            topo = hardware_topology(layout)
        plan = make_plan(layout, topo)
        written = write_plan(plan, args.out) if args.out is not None else []
    except CoordinatorError as exc:
        print(f"coordinatorctl: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(plan_to_json(plan), indent=2))
    else:
        print(render_report(plan), end="")
        if written:
            print(f"\nWrote {len(written)} files under {args.out}:")
            print("".join(f"  {p}\n" for p in written), end="")
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan --layout FILE [--topology FILE|--from-host] ...`` to coordinatorctl."""
    parser = subparsers.add_parser(
        "plan",
        help="place a machine layout (VMs, host cores, storage) and generate its config",
        description="Check a layout against a topology and generate libvirt, k3s and systemd "
        "configuration. Without --topology/--from-host the layout's [hardware] is used.",
    )
    parser.add_argument("--layout", required=True, metavar="FILE", help="layout TOML")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--topology", metavar="FILE", help="topology JSON from 'coordinatorctl topology --json'"
    )
    source.add_argument("--from-host", action="store_true", help="read this machine's sysfs")
    parser.add_argument("--sysfs-root", metavar="DIR", help="read DIR/sys (implies --from-host)")
    parser.add_argument("--out", metavar="DIR", help="write the generated files under DIR")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=_cli)
