"""The machine layout as code: VM pinning, emulator isolation and storage budgets, checked.

``make_plan`` places a ``Layout`` (``coordinator.planner.layout``) on a ``Topology``: each VM's
vCPUs on whole host cores of its node, its emulator threads beside them, the host's services on
the cores left; ``check_plan`` lists what over-subscribes or contradicts itself and ``totals``
sums it up.
``coordinator.planner.render`` turns a plan into what an operator applies. Everything here is pure.
Units: memory in GiB, disk in GB (10^9 bytes); see ``docs/layout.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.core.errors import LayoutError
from coordinator.core.topology import Core, Node, Topology, format_cpulist
from coordinator.planner.layout import Layout, NodeSpec, VmSpec

__all__ = [
    "GUEST_NODE",
    "NodePlan",
    "Plan",
    "Totals",
    "VmPlan",
    "check_plan",
    "make_plan",
    "totals",
]

_KIB_PER_GIB = 1024 * 1024
# Inside every worker VM its one NUMA node (the host node it sits on) is numbered 0.
GUEST_NODE = 0


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

    @property
    def guest_cells(self) -> dict[int, tuple[int, ...]]:
        """The guest's NUMA nodes -> their vCPUs. The VM sits on one host node (its vCPUs and,
        by numatune, its memory), so its guest has one NUMA node, 0, holding every vCPU and all
        its memory; host node ``spec.node`` is guest node 0 inside it."""
        return {GUEST_NODE: tuple(range(len(self.cores) * self.threads_per_core))}


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
