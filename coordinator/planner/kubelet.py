"""Each k3s worker's kubelet configuration from the plan, its checks, and ``plan --k8s``'s files.

The agents' DaemonSets ask for integer CPUs in Guaranteed QoS; only a kubelet running the static
CPU manager, the single-numa-node topology manager and the Static memory manager actually pins
them. Each worker VM sits on one host NUMA node, so inside the guest there is one NUMA node (0;
the domain XML's one ``<numa>`` cell, ``VmPlan.guest_cells``).
The kubelet keeps the guest's first ``kubelet_reserved_cores`` cores (their SMT threads, guest
vCPUs 0..) for the system and kube daemons, as the host keeps its lowest cores (``host_cores``)
for emulator threads and the coordinator; the rest is allocatable. ``check_kubelet`` refuses a
config that names a vCPU the VM lacks, leaves no allocatable CPU for the node's agent, or
reserves memory the VM does not have; ``check_host_reserve`` refuses host cores that are also a
vCPU's pin. See ``docs/layout.md`` "Deploy on k3s".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.core.errors import LayoutError
from coordinator.core.topology import format_cpulist, parse_cpulist
from coordinator.planner.plan import Plan, VmPlan

__all__ = [
    "KUBELET_CONFIG_PATH",
    "KubeletOptions",
    "allocatable_cpus",
    "check_host_reserve",
    "check_kubelet",
    "render_k3s_kubelet_arg",
    "render_kubelet_config",
    "reserved_cpus",
]

KUBELET_CONFIG_PATH = "/etc/rancher/k3s/kubelet.yaml"
_MIB_PER_GIB = 1024


@dataclass(frozen=True)
class KubeletOptions:
    """The guest-side reserve; the host-side one is the layout's ``host_cores``."""

    reserved_cores: int = 1  # guest cores (all their threads) for system and kube daemons
    kube_reserved_mib: int = 1024
    system_reserved_mib: int = 1024
    eviction_mib: int = 100

    @property
    def reserved_memory_mib(self) -> int:
        """What the Static memory manager requires reservedMemory to sum to."""
        return self.kube_reserved_mib + self.system_reserved_mib + self.eviction_mib


def reserved_cpus(vm: VmPlan, opts: KubeletOptions) -> tuple[int, ...]:
    """Guest CPU ids of the first ``reserved_cores`` guest cores (vCPU k*T+t is thread t of
    guest core k, as ``VmPlan.vcpupins`` numbers them)."""
    return tuple(range(opts.reserved_cores * vm.threads_per_core))


def allocatable_cpus(vm: VmPlan, reserved: tuple[int, ...]) -> tuple[int, ...]:
    """Guest CPU ids the static CPU manager may hand to Guaranteed pods."""
    return tuple(c for c in range(len(vm.vcpupins)) if c not in set(reserved))


def render_kubelet_config(vm: VmPlan, opts: KubeletOptions | None = None) -> dict[str, Any]:
    """The KubeletConfiguration for one worker VM."""
    opts = opts or KubeletOptions()
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cpuManagerPolicy": "static",
        "topologyManagerPolicy": "single-numa-node",
        "topologyManagerScope": "pod",
        "memoryManagerPolicy": "Static",
        "reservedSystemCPUs": format_cpulist(reserved_cpus(vm, opts)),
        "kubeReserved": {"memory": f"{opts.kube_reserved_mib}Mi"},
        "systemReserved": {"memory": f"{opts.system_reserved_mib}Mi"},
        # Setting evictionHard replaces the kubelet's defaults, so the others are restated.
        "evictionHard": {
            "memory.available": f"{opts.eviction_mib}Mi",
            "nodefs.available": "10%",
            "nodefs.inodesFree": "5%",
            "imagefs.available": "15%",
        },
        "reservedMemory": [
            {"numaNode": 0, "limits": {"memory": f"{opts.reserved_memory_mib}Mi"}},
        ],
    }


def render_k3s_kubelet_arg(vm: VmPlan) -> str:
    """The k3s config drop-in that makes the worker's kubelet read ``KUBELET_CONFIG_PATH``."""
    return (
        f"# {vm.spec.k3s_node}: install as /etc/rancher/k3s/config.yaml.d/60-kubelet.yaml and the\n"
        f"# KubeletConfiguration beside it as {KUBELET_CONFIG_PATH}; then restart k3s-agent.\n"
        f'kubelet-arg+:\n  - "config={KUBELET_CONFIG_PATH}"\n'
    )


def _mib(quantity: object) -> int | None:
    text = str(quantity)
    for suffix, factor in (("Mi", 1), ("Gi", _MIB_PER_GIB)):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    return None


_POLICIES = {
    "cpuManagerPolicy": "static",
    "topologyManagerPolicy": "single-numa-node",
    "topologyManagerScope": "pod",
    "memoryManagerPolicy": "Static",
}


def check_kubelet(
    plan: Plan, configs: dict[str, dict[str, Any]], agent_cpus: dict[str, int]
) -> list[str]:
    """What in the kubelet configs (k3s node -> config) contradicts the plan; ``agent_cpus``
    maps the k3s node of each agent worker to the integer CPUs its DaemonSet asks for."""
    vms = {vm.spec.k3s_node: vm for vm in plan.vms}
    problems = [
        f"kubelet/{node}.yaml: missing; the worker would not pin its pods"
        for node in sorted(set(vms) - set(configs))
    ]
    for node, cfg in configs.items():
        where = f"kubelet/{node}.yaml"
        vm = vms.get(node)
        if vm is None:
            problems.append(f"{where}: {node} is no worker of the plan")
            continue
        for key, want in _POLICIES.items():
            if cfg.get(key) != want:
                problems.append(f"{where}: {key} is {cfg.get(key)!r}, must be {want!r}")
        count = len(vm.vcpupins)
        try:
            reserved = parse_cpulist(str(cfg.get("reservedSystemCPUs", "")))
        except (LayoutError, ValueError) as exc:
            problems.append(f"{where}: reservedSystemCPUs is not a CPU list: {exc}")
            continue
        if not reserved:
            problems.append(f"{where}: reservedSystemCPUs is empty")
        if stray := [c for c in reserved if not 0 <= c < count]:
            problems.append(
                f"{where}: reservedSystemCPUs {format_cpulist(stray)} are not vCPUs of vm "
                f"{vm.spec.name!r} (guest CPUs 0-{count - 1})"
            )
        free = allocatable_cpus(vm, reserved)
        want_cpus = agent_cpus.get(node, 0)
        if want_cpus > len(free):
            problems.append(
                f"{where}: the staging agent asks for {want_cpus} CPUs but only "
                f"{len(free)} of {count} guest CPUs are allocatable"
            )
        blocks = cfg.get("reservedMemory") or []
        if [b.get("numaNode") for b in blocks] != [0]:
            problems.append(
                f"{where}: reservedMemory must hold exactly numaNode 0 (the guest has one node); "
                f"it holds {[b.get('numaNode') for b in blocks]}"
            )
            continue
        reserve = _mib((blocks[0].get("limits") or {}).get("memory"))
        parts = [
            _mib((cfg.get("kubeReserved") or {}).get("memory", "0Mi")),
            _mib((cfg.get("systemReserved") or {}).get("memory", "0Mi")),
            _mib((cfg.get("evictionHard") or {}).get("memory.available", "0Mi")),
        ]
        if reserve is None or None in parts:
            problems.append(f"{where}: memory quantities must be in Mi or Gi")
        elif reserve != sum(p or 0 for p in parts):
            problems.append(
                f"{where}: reservedMemory {reserve}Mi must equal kubeReserved + systemReserved "
                f"+ evictionHard memory.available ({sum(p or 0 for p in parts)}Mi), or the "
                "kubelet refuses to start"
            )
        elif reserve >= vm.spec.memory_gib * _MIB_PER_GIB:
            problems.append(
                f"{where}: reservedMemory {reserve}Mi does not fit vm {vm.spec.name!r} "
                f"({vm.spec.memory_gib} GiB)"
            )
    return problems


def check_host_reserve(plan: Plan) -> list[str]:
    """The host's reserved cores (coordinator, emulator threads) against every vCPU pin."""
    pins = {cpu: (vm.spec.name, vcpu) for vm in plan.vms for vcpu, cpu in vm.vcpupins}
    return [
        f"node {n.spec.id}: reserved host cpu {cpu} (coordinator, emulator threads) is also "
        f"vm {pins[cpu][0]!r} vCPU {pins[cpu][1]}"
        for n in plan.nodes
        for cpu in n.host_cpus
        if cpu in pins
    ]
