"""``coordinatorctl plan --check-chain``: every worker's pin chain, link by link, in one report.

host thread -> libvirt vCPU pin -> guest NUMA node -> kubelet reserved/allocatable CPUs -> the
agent container. Each link is checked against the artefacts the planner generates (the domain
XML of ``coordinator.planner.render``, the kubelet configs of ``coordinator.planner.kubelet``,
the DaemonSets of ``coordinator.planner.k8s``), which a caller may replace to check edited ones.
The host side comes from sysfs, a topology JSON or a libvirt ``virsh capabilities`` XML
(``topology_from_capabilities``). Every problem names its link. Pure but for reading files in
the CLI; see ``docs/layout.md`` "Checking the pin chain".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from coordinator.core.errors import LayoutError
from coordinator.core.topology import Core, Node, Topology, format_cpulist, parse_cpulist
from coordinator.planner.k8s import K8sOptions, agent_args, render_manifests, worker_labels
from coordinator.planner.kubelet import (
    KubeletOptions,
    check_host_reserve,
    check_kubelet,
    render_kubelet_config,
)
from coordinator.planner.plan import Plan

__all__ = ["LINKS", "ChainResult", "check_chain", "topology_from_capabilities"]

LINKS = ("host thread", "libvirt vCPU pin", "guest NUMA node", "kubelet", "agent container")


def topology_from_capabilities(text: str, source: str = "<capabilities>") -> Topology:
    """The host's NUMA topology from ``virsh capabilities`` XML; LayoutError names what is bad."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise LayoutError(f"{source}: not XML: {exc}") from None
    cells = root.findall("./host/topology/cells/cell")
    if not cells:
        raise LayoutError(f"{source}: no host/topology/cells/cell (not virsh capabilities?)")
    nodes: list[Node] = []
    for cell in cells:
        where = f"{source}: cell {cell.get('id')!r}"
        try:
            node_id = int(cell.get("id", ""))
            mem = cell.find("memory")
            kib = int(mem.text or "") if mem is not None else 0
            if mem is not None and mem.get("unit", "KiB") != "KiB":
                raise LayoutError(f"{where}: memory unit {mem.get('unit')!r}, expected KiB")
            cores: dict[tuple[int, int], set[int]] = {}
            for cpu in cell.findall("./cpus/cpu"):
                cid = int(cpu.get("id", ""))
                key = (int(cpu.get("socket_id", "0")), int(cpu.get("core_id", str(cid))))
                sibs = parse_cpulist(cpu.get("siblings", str(cid)))
                cores.setdefault(key, set()).update(sibs or (cid,))
            distances = tuple(
                sorted(
                    (int(s.get("id", "")), int(s.get("value", "")))
                    for s in cell.findall("./distances/sibling")
                )
            )
        except ValueError as exc:
            raise LayoutError(f"{where}: {exc}") from None
        core_list = tuple(
            sorted(
                (
                    Core(package=p, core_id=c, threads=tuple(sorted(t)))
                    for (p, c), t in cores.items()
                ),
                key=lambda core: core.threads,
            )
        )
        nodes.append(
            Node(
                id=node_id,
                cpus=tuple(sorted(t for core in core_list for t in core.threads)),
                cores=core_list,
                mem_total_kib=kib,
                mem_free_kib=kib,
                distances=distances or ((node_id, 10),),
                l3_bytes=None,
                l3_count=0,
            )
        )
    return Topology(nodes=tuple(sorted(nodes, key=lambda n: n.id)), source=source)


_GIB = {"KiB": 1 / 1024**2, "k": 1 / 1024**2, "MiB": 1 / 1024, "M": 1 / 1024, "GiB": 1.0, "G": 1.0}


def _cells_gib(domain: ET.Element) -> float | None:
    """The memory of the domain's <cpu><numa> cells, in GiB; None without cells. A cell whose
    memory cannot be read counts as 0, so that the sum disagrees."""
    cells = domain.findall("./cpu/numa/cell")
    if not cells:
        return None
    total = 0.0
    for c in cells:
        factor = _GIB.get(c.get("unit", "KiB"))
        text = c.get("memory", "")
        total += int(text) * factor if factor is not None and text.isdigit() else 0.0
    return total


@dataclass(frozen=True)
class ChainResult:
    """The report (one block per worker) and every break, each starting with its link."""

    report: str
    problems: tuple[str, ...]


def _guest_nodes(domain: ET.Element, vcpus: int) -> dict[int, tuple[int, ...]]:
    """Guest NUMA node -> guest CPUs: the domain's <cpu><numa> cells, else one node 0."""
    cells = domain.findall("./cpu/numa/cell")
    if not cells:
        return {0: tuple(range(vcpus))}
    return {int(c.get("id", "0")): parse_cpulist(c.get("cpus", "")) for c in cells}


def check_chain(
    plan: Plan,
    domains: dict[str, str],
    kubelets: dict[str, dict[str, Any]] | None = None,
    manifests: dict[str, dict[str, Any]] | None = None,
    opts: K8sOptions | None = None,
    kubelet_opts: KubeletOptions | None = None,
) -> ChainResult:
    """Check every worker's pin chain; ``domains`` maps vm name -> domain XML (fragments as
    ``plan --out`` writes them, from ``render_domain_fragment``, are wrapped in a <domain>),
    ``kubelets`` k3s node -> config (default: the generated ones)."""
    opts = opts or K8sOptions()
    if kubelets is None:
        kubelets = {vm.spec.k3s_node: render_kubelet_config(vm, kubelet_opts) for vm in plan.vms}
    if manifests is None:
        manifests = render_manifests(plan, opts)
    problems: list[str] = [f"host thread: {p}" for p in check_host_reserve(plan)]
    lines: list[str] = []
    cpu_node = {cpu: n.id for n in plan.topology.nodes for cpu in n.cpus}
    guest: dict[str, dict[int, tuple[int, ...]]] = {}
    allocatable: dict[str, tuple[int, ...]] = {}
    for vm in plan.vms:
        name, k3s = vm.spec.name, vm.spec.k3s_node
        lines.append(f"{k3s} (vm {name}, host NUMA node {vm.spec.node}):")
        stray = [c for _, c in vm.vcpupins if cpu_node.get(c) != vm.spec.node]
        if stray:
            problems.append(
                f"host thread: vm {name!r}: host cpus {format_cpulist(stray)} are not on node "
                f"{vm.spec.node} of {plan.topology.source}"
            )
        lines.append(f"  host thread       {format_cpulist(vm.cpus)} on node {vm.spec.node}")
        text = domains.get(name)
        if text is None:
            problems.append(f"libvirt vCPU pin: vm {name!r}: no domain XML")
            continue
        try:
            root = ET.fromstring(
                text if text.lstrip().startswith("<domain") else f"<domain>{text}</domain>"
            )
        except ET.ParseError as exc:
            problems.append(f"libvirt vCPU pin: vm {name!r}: domain XML does not parse: {exc}")
            continue
        pins: dict[int, str] = {
            int(p.get("vcpu", "-1")): p.get("cpuset", "") for p in root.findall("./cputune/vcpupin")
        }
        want = dict(vm.vcpupins)
        bad = sorted(
            v for v in set(pins) | set(want) if pins.get(v) != (str(want[v]) if v in want else None)
        )
        if bad:
            problems.append(
                f"libvirt vCPU pin: vm {name!r}: vCPUs {format_cpulist(bad)} are not pinned to "
                "the plan's host threads (vcpupin vcpu -> cpuset, one thread each)"
            )
        count = root.findtext("vcpu")
        if count != str(len(want)):
            problems.append(f"libvirt vCPU pin: vm {name!r}: <vcpu> {count} != {len(want)} pins")
        nodeset = root.find("./numatune/memory")
        if nodeset is None or nodeset.get("nodeset") != str(vm.spec.node):
            problems.append(
                f"libvirt vCPU pin: vm {name!r}: numatune memory is not bound to node "
                f"{vm.spec.node}"
            )
        emu = root.find("./cputune/emulatorpin")
        emu_cpus = set(parse_cpulist(emu.get("cpuset", ""))) if emu is not None else set()
        if emu_cpus & set(want.values()):
            problems.append(
                f"libvirt vCPU pin: vm {name!r}: emulatorpin "
                f"{format_cpulist(sorted(emu_cpus & set(want.values())))} runs on vCPU threads"
            )
        lines.append(
            f"  libvirt vCPU pin  vCPU 0-{len(want) - 1} -> {format_cpulist(want.values())}"
        )
        nodes = _guest_nodes(root, len(want))
        guest[k3s] = nodes
        unplaced = sorted(set(range(len(want))) - {c for cpus in nodes.values() for c in cpus})
        if unplaced:
            problems.append(
                f"guest NUMA node: vm {name!r}: vCPUs {format_cpulist(unplaced)} are in no "
                "guest NUMA node"
            )
        cell_mem = _cells_gib(root)
        if cell_mem is not None and cell_mem != vm.spec.memory_gib:
            problems.append(
                f"guest NUMA node: vm {name!r}: its <numa> cells hold {cell_mem:g} GiB, not the "
                f"VM's {vm.spec.memory_gib} GiB"
            )
        lines.append(
            "  guest NUMA node   "
            + ", ".join(f"{n}: cpus {format_cpulist(c)}" for n, c in sorted(nodes.items()))
        )
        cfg = kubelets.get(k3s)
        if cfg is None:
            problems.append(f"kubelet: {k3s}: no kubelet config")
            continue
        try:
            reserved = parse_cpulist(str(cfg.get("reservedSystemCPUs", "")))
        except ValueError:
            reserved = ()
        free = tuple(c for c in range(len(want)) if c not in set(reserved))
        allocatable[k3s] = free
        lacking = {b.get("numaNode") for b in cfg.get("reservedMemory") or []} - set(nodes)
        problems.extend(
            f"kubelet: {k3s}: reservedMemory on guest NUMA node {node}, which the guest "
            f"lacks (it has {format_cpulist(sorted(nodes))})"
            for node in sorted(lacking, key=str)
        )
        lines.append(
            f"  kubelet           reserved {format_cpulist(reserved) or 'none'}, "
            f"allocatable {format_cpulist(free) or 'none'}"
        )
    problems += [f"kubelet: {p}" for p in check_kubelet(plan, kubelets, {})]
    for fname, obj in manifests.items():
        if obj.get("kind") != "DaemonSet":
            continue
        spec = obj["spec"]["template"]["spec"]
        selector = set((spec.get("nodeSelector") or {}).items())
        workers = [vm for vm in plan.vms if selector and selector <= worker_labels(plan, vm)]
        where = f"agent container: {fname}"
        if len(workers) != 1:
            problems.append(f"{where}: selects {len(workers)} workers, not one")
            continue
        k3s = workers[0].spec.k3s_node
        for c in spec.get("containers") or []:
            cmd = [str(a) for a in c.get("command") or []]
            cpus = str(((c.get("resources") or {}).get("limits") or {}).get("cpu", ""))
            nodes = guest.get(k3s, {})
            args = agent_args(cmd)
            for flag, node in (("membind", args.membind), ("cpunodebind", args.cpunodebind)):
                if node not in nodes:
                    problems.append(
                        f"{where}: numactl --{flag}={node} on {k3s}, whose guest has NUMA "
                        f"node(s) {format_cpulist(sorted(nodes)) or 'none'}"
                    )
                elif node != args.bind_node:
                    problems.append(
                        f"{where}: numactl --{flag}={node} on {k3s}, but the agent checks its "
                        f"binding against guest node {args.bind_node} (--bind-node, else "
                        "--node): it would refuse to run"
                    )
            if args.node != workers[0].spec.node:
                problems.append(
                    f"{where}: the agent claims --node {args.node} (its certificate node-"
                    f"{args.node}) on {k3s}, whose vm sits on host NUMA node "
                    f"{workers[0].spec.node}"
                )
            node = args.cpunodebind
            usable = set(allocatable.get(k3s, ())) & set(
                nodes.get(node, ()) if node is not None else ()
            )
            if not cpus.isdigit() or int(cpus) > len(usable):
                problems.append(
                    f"{where}: {cpus!r} CPUs on {k3s}, but guest NUMA node {node} has "
                    f"{len(usable)} allocatable CPUs"
                )
            lines.append(
                f"{k3s}: agent container {obj['metadata']['name']}: host node {args.node}, "
                f"numactl guest node {args.cpunodebind}, {cpus} CPUs"
            )
    verdict = (
        "pin chain: OK\n"
        if not problems
        else "pin chain: BROKEN\n" + "".join(f"  - {p}\n" for p in problems)
    )
    return ChainResult(report="\n".join(lines) + "\n" + verdict, problems=tuple(problems))
