"""plan --k8s DIR writes a checked KubeletConfiguration per worker and the k3s line applying it;
check_kubelet and check_host_reserve fail on configs and plans that break each rule."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.core.errors import LayoutError
from coordinator.planner.chain import check_chain, topology_from_capabilities
from coordinator.planner.k8s import agent_cpus_by_worker, render_manifests, write_k8s
from coordinator.planner.kubelet import (
    KubeletOptions,
    check_host_reserve,
    check_kubelet,
    render_kubelet_config,
)
from coordinator.planner.layout import hardware_topology, load_layout
from coordinator.planner.plan import Plan, make_plan
from coordinator.planner.render import render_domain_fragment

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "config" / "layout.seed.toml"


@pytest.fixture(scope="module")
def plan() -> Plan:
    layout = load_layout(SEED)
    return make_plan(layout, hardware_topology(layout))


def _configs(plan: Plan) -> dict[str, dict[str, Any]]:
    return {vm.spec.k3s_node: render_kubelet_config(vm) for vm in plan.vms}


def _agents(plan: Plan) -> dict[str, int]:
    return agent_cpus_by_worker(plan, render_manifests(plan))


def test_write_k8s_writes_a_kubelet_config_and_its_k3s_line_per_worker(
    plan: Plan, tmp_path: Path
) -> None:
    write_k8s(plan, tmp_path)
    for vm in plan.vms:
        cfg = yaml.safe_load((tmp_path / "kubelet" / f"{vm.spec.k3s_node}.yaml").read_text())
        assert cfg == render_kubelet_config(vm)
        assert cfg["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
        assert cfg["kind"] == "KubeletConfiguration"
        assert cfg["cpuManagerPolicy"] == "static"
        assert cfg["topologyManagerPolicy"] == "single-numa-node"
        assert cfg["topologyManagerScope"] == "pod"
        assert cfg["memoryManagerPolicy"] == "Static"
        # guest core 0's SMT threads: the seed's hosts have 2 threads per core
        assert cfg["reservedSystemCPUs"] == "0-1"
        assert cfg["reservedMemory"] == [{"numaNode": 0, "limits": {"memory": "2148Mi"}}]
        k3s = yaml.safe_load((tmp_path / "kubelet" / f"{vm.spec.k3s_node}.k3s.yaml").read_text())
        assert k3s == {"kubelet-arg+": ["config=/etc/rancher/k3s/kubelet.yaml"]}
    # the kubelet files are not Kubernetes objects: kustomize must not apply them
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert not any(r.startswith("kubelet") for r in kustomization["resources"])


def test_the_generated_configs_pass(plan: Plan) -> None:
    assert _agents(plan) == {"k3s-worker-slm-heavy": 2, "k3s-worker-data": 2}
    assert check_kubelet(plan, _configs(plan), _agents(plan)) == []
    assert check_host_reserve(plan) == []


def test_reserved_cpus_beyond_the_vms_vcpus(plan: Plan) -> None:
    configs = _configs(plan)
    configs["k3s-worker-data"]["reservedSystemCPUs"] = "0-1,16"
    problems = check_kubelet(plan, configs, _agents(plan))
    assert any("reservedSystemCPUs 16 are not vCPUs of vm 'data'" in p for p in problems)
    configs["k3s-worker-data"]["reservedSystemCPUs"] = "0-x"
    assert any("not a CPU list" in p for p in check_kubelet(plan, configs, _agents(plan)))
    configs["k3s-worker-data"]["reservedSystemCPUs"] = ""
    assert any("is empty" in p for p in check_kubelet(plan, configs, _agents(plan)))


def test_no_allocatable_cpus_left_for_the_agent(plan: Plan) -> None:
    data = next(vm for vm in plan.vms if vm.spec.k3s_node == "k3s-worker-data")
    cfg = render_kubelet_config(data, KubeletOptions(reserved_cores=len(data.cores)))
    problems = check_kubelet(plan, {**_configs(plan), "k3s-worker-data": cfg}, _agents(plan))
    assert any("asks for 2 CPUs but only 0 of 16" in p for p in problems)


def test_memory_reserve_must_add_up_and_fit_the_vm(plan: Plan) -> None:
    configs = _configs(plan)
    configs["k3s-worker-data"]["reservedMemory"][0]["limits"]["memory"] = "2Gi"
    assert any("must equal" in p for p in check_kubelet(plan, configs, _agents(plan)))
    big = KubeletOptions(system_reserved_mib=60 * 1024)
    data = next(vm for vm in plan.vms if vm.spec.k3s_node == "k3s-worker-data")
    configs = {**_configs(plan), "k3s-worker-data": render_kubelet_config(data, big)}
    assert any("does not fit vm 'data'" in p for p in check_kubelet(plan, configs, _agents(plan)))
    configs = _configs(plan)
    configs["k3s-worker-data"]["reservedMemory"].append(
        copy.deepcopy(configs["k3s-worker-data"]["reservedMemory"][0]) | {"numaNode": 1}
    )
    assert any("exactly numaNode 0" in p for p in check_kubelet(plan, configs, _agents(plan)))


def test_wrong_policy_and_missing_worker(plan: Plan) -> None:
    configs = _configs(plan)
    configs["k3s-worker-data"]["topologyManagerPolicy"] = "best-effort"
    del configs["k3s-worker-slm-heavy"]
    problems = check_kubelet(plan, configs, _agents(plan))
    assert any("topologyManagerPolicy is 'best-effort'" in p for p in problems)
    assert any("kubelet/k3s-worker-slm-heavy.yaml: missing" in p for p in problems)


def test_host_reserve_overlapping_a_vcpu_is_refused(plan: Plan, tmp_path: Path) -> None:
    # make_plan refuses such a layout; a plan assembled by hand must still be caught
    node0 = plan.nodes[0]
    vm = next(vm for vm in plan.vms if vm.spec.node == node0.spec.id)
    bad_node = dataclasses.replace(node0, host_cores=(*node0.host_cores, vm.cores[0]))
    bad = dataclasses.replace(plan, nodes=(bad_node, *plan.nodes[1:]))
    cpu = vm.cores[0].threads[0]
    problems = check_host_reserve(bad)
    assert any(
        f"node {node0.spec.id}: reserved host cpu {cpu}" in p and f"vm {vm.spec.name!r}" in p
        for p in problems
    )
    with pytest.raises(LayoutError, match="reserved host cpu"):
        write_k8s(bad, tmp_path)


# --- plan --check-chain: host thread -> libvirt vCPU pin -> guest NUMA node -> kubelet -> agent


def _domains(plan: Plan) -> dict[str, str]:
    return {vm.spec.name: render_domain_fragment(vm) for vm in plan.vms}


def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_the_seed_chain_is_closed(plan: Plan) -> None:
    result = check_chain(plan, _domains(plan))
    assert result.problems == ()
    assert "k3s-worker-slm-heavy (vm slm-heavy, host NUMA node 0):" in result.report
    assert "  libvirt vCPU pin  vCPU 0-31 -> 2-17,38-53" in result.report
    # each guest has one NUMA node, 0, the host node numatune binds it to
    assert "  guest NUMA node   0: cpus 0-15" in result.report
    assert "  kubelet           reserved 0-1, allocatable 2-31" in result.report
    assert (
        "k3s-worker-data: agent container staging-agent-node1: host node 1, numactl guest "
        "node 0, 2 CPUs" in result.report
    )
    assert result.report.endswith("pin chain: OK\n")


def test_the_domain_gives_the_guest_one_numa_cell_with_all_of_the_vm(plan: Plan) -> None:
    data = next(vm for vm in plan.vms if vm.spec.name == "data")
    text = render_domain_fragment(data)
    assert '<cell id="0" cpus="0-15" memory="60" unit="GiB" />' in text
    assert '<memory mode="strict" nodeset="1" />' in text


def _agent_cmd(manifests: dict[str, Any], name: str) -> list[str]:
    cmd: list[str] = manifests[name]["spec"]["template"]["spec"]["containers"][0]["command"]
    return cmd


def test_agent_link_binding_a_node_the_guest_lacks(plan: Plan) -> None:
    manifests = copy.deepcopy(render_manifests(plan))
    cmd = _agent_cmd(manifests, "agent-node1.yaml")
    cmd[1:3] = ["--membind=1", "--cpunodebind=1"]  # the host's number, not the guest's
    cmd[cmd.index("--bind-node") + 1] = "1"
    problems = check_chain(plan, _domains(plan), manifests=manifests).problems
    assert problems == (
        "agent container: agent-node1.yaml: numactl --membind=1 on k3s-worker-data, whose "
        "guest has NUMA node(s) 0",
        "agent container: agent-node1.yaml: numactl --cpunodebind=1 on k3s-worker-data, whose "
        "guest has NUMA node(s) 0",
        "agent container: agent-node1.yaml: '2' CPUs on k3s-worker-data, but guest NUMA node 1 "
        "has 0 allocatable CPUs",
    )


def test_agent_link_bind_node_other_than_numactls(plan: Plan) -> None:
    manifests = copy.deepcopy(render_manifests(plan))
    cmd = _agent_cmd(manifests, "agent-node1.yaml")
    i = cmd.index("--bind-node")
    del cmd[i : i + 2]  # the agent would check its binding against node 1
    problems = check_chain(plan, _domains(plan), manifests=manifests).problems
    assert problems[0] == (
        "agent container: agent-node1.yaml: numactl --membind=0 on k3s-worker-data, but the "
        "agent checks its binding against guest node 1 (--bind-node, else --node): it would "
        "refuse to run"
    )


def test_agent_link_claiming_another_host_node(plan: Plan) -> None:
    manifests = copy.deepcopy(render_manifests(plan))
    cmd = _agent_cmd(manifests, "agent-node1.yaml")
    cmd[cmd.index("--node") + 1] = "0"
    cmd[cmd.index("--bind-node") + 1] = "0"
    problems = check_chain(plan, _domains(plan), manifests=manifests).problems
    assert problems == (
        "agent container: agent-node1.yaml: the agent claims --node 0 (its certificate "
        "node-0) on k3s-worker-data, whose vm sits on host NUMA node 1",
    )


def test_a_guest_with_two_cells_still_closes_when_the_agent_binds_one(plan: Plan) -> None:
    domains = _domains(plan)
    domains["data"] = _edit(
        domains["data"],
        '<cell id="0" cpus="0-15" memory="60" unit="GiB" />',
        '<cell id="0" cpus="0-7" memory="30" unit="GiB"/><cell id="1" cpus="8-15" memory="30" '
        'unit="GiB"/>',
    )
    result = check_chain(plan, domains)
    assert result.problems == ()
    assert "  guest NUMA node   0: cpus 0-7, 1: cpus 8-15" in result.report


def test_each_link_names_itself_when_broken(plan: Plan) -> None:
    heavy = next(vm for vm in plan.vms if vm.spec.name == "slm-heavy")
    cases = {
        "libvirt vCPU pin: vm 'slm-heavy': vCPUs 3 are not pinned": (
            "slm-heavy",
            f'vcpu="3" cpuset="{dict(heavy.vcpupins)[3]}"',
            'vcpu="3" cpuset="70"',
        ),
        "libvirt vCPU pin: vm 'slm-heavy': numatune memory is not bound to node 0": (
            "slm-heavy",
            'nodeset="0"',
            'nodeset="1"',
        ),
        "libvirt vCPU pin: vm 'slm-heavy': emulatorpin 2 runs on vCPU threads": (
            "slm-heavy",
            '<emulatorpin cpuset="0-1,36-37"',
            '<emulatorpin cpuset="0-2,36-37"',
        ),
        "guest NUMA node: vm 'slm-heavy': vCPUs 16-31 are in no guest NUMA node": (
            "slm-heavy",
            'cpus="0-31"',
            'cpus="0-15"',
        ),
        "guest NUMA node: vm 'slm-heavy': its <numa> cells hold 64 GiB, not the VM's 118 GiB": (
            "slm-heavy",
            'memory="118" unit="GiB" />',
            'memory="64" unit="GiB" />',
        ),
    }
    for want, (vm, old, new) in cases.items():
        domains = _domains(plan)
        domains[vm] = _edit(domains[vm], old, new)
        problems = check_chain(plan, domains).problems
        assert any(p.startswith(want) for p in problems), (want, problems)


def test_kubelet_and_agent_links(plan: Plan) -> None:
    kubelets = {vm.spec.k3s_node: render_kubelet_config(vm) for vm in plan.vms}
    kubelets["k3s-worker-slm-heavy"]["reservedSystemCPUs"] = "0-31"
    kubelets["k3s-worker-slm-heavy"]["reservedMemory"][0]["numaNode"] = 3
    problems = check_chain(plan, _domains(plan), kubelets).problems
    assert any(
        p.startswith("kubelet: k3s-worker-slm-heavy: reservedMemory on guest NUMA node 3")
        for p in problems
    )
    assert any(
        p.startswith(
            "agent container: agent-node0.yaml: '2' CPUs on k3s-worker-slm-heavy, but "
            "guest NUMA node 0 has 0 allocatable CPUs"
        )
        for p in problems
    )


def test_host_thread_on_the_wrong_node(plan: Plan) -> None:
    heavy = next(vm for vm in plan.vms if vm.spec.name == "slm-heavy")
    away = plan.topology.node(1).cores[-1]
    bad_vm = dataclasses.replace(heavy, cores=(*heavy.cores[:-1], away))
    bad = dataclasses.replace(plan, vms=tuple(bad_vm if v is heavy else v for v in plan.vms))
    problems = check_chain(bad, _domains(bad)).problems
    assert any(
        p.startswith("host thread: vm 'slm-heavy': host cpus 35,71 are not on node 0")
        for p in problems
    ), problems


def _capabilities(plan: Plan) -> str:
    cells = "".join(
        f'<cell id="{n.id}"><memory unit="KiB">{n.mem_total_kib}</memory><distances>'
        + "".join(f'<sibling id="{o}" value="{d}"/>' for o, d in n.distances)
        + f'</distances><cpus num="{len(n.cpus)}">'
        + "".join(
            f'<cpu id="{t}" socket_id="{c.package}" die_id="0" core_id="{c.core_id}" '
            f'siblings="{",".join(map(str, c.threads))}"/>'
            for c in n.cores
            for t in c.threads
        )
        + "</cpus></cell>"
        for n in plan.topology.nodes
    )
    return (
        f'<capabilities><host><uuid>x</uuid><topology><cells num="{len(plan.topology.nodes)}">'
        f"{cells}</cells></topology></host></capabilities>"
    )


def test_capabilities_give_the_same_topology(plan: Plan) -> None:
    topo = topology_from_capabilities(_capabilities(plan), "caps.xml")
    for mine, theirs in zip(topo.nodes, plan.topology.nodes, strict=True):
        assert (mine.id, mine.cpus, mine.cores, mine.mem_total_kib) == (
            theirs.id,
            theirs.cpus,
            theirs.cores,
            theirs.mem_total_kib,
        )
    with pytest.raises(LayoutError, match=r"caps\.xml: no host/topology/cells/cell"):
        topology_from_capabilities("<capabilities/>", "caps.xml")
    with pytest.raises(LayoutError, match=r"caps\.xml: not XML"):
        topology_from_capabilities("<capabilities", "caps.xml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.ctl.main", "plan", "--layout", str(SEED), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_cli_check_chain_from_capabilities(plan: Plan, tmp_path: Path) -> None:
    caps = tmp_path / "caps.xml"
    caps.write_text(_capabilities(plan))
    proc = _cli("--capabilities", str(caps), "--check-chain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "k3s-worker-data (vm data, host NUMA node 1):" in proc.stdout
    assert proc.stdout.endswith("pin chain: OK\n")
    proc = _cli("--capabilities", str(tmp_path / "missing.xml"), "--check-chain")
    assert proc.returncode == 1
    assert f"--capabilities {tmp_path / 'missing.xml'}" in proc.stderr


def test_cli_check_chain_names_the_kubelet_and_agent_links_of_a_broken_layout(
    tmp_path: Path,
) -> None:
    # node 1's agent worker shrunk to one core: the kubelet keeps it, no CPU is left to pin;
    # and the tasks VM given 2 GiB, less than the kubelet's memory reserve (2148Mi)
    text = _edit(SEED.read_text(), "cores = 8\nthreads = 16", "cores = 1\nthreads = 2")
    text = _edit(text, "memory_gib = 24", "memory_gib = 2")
    layout = tmp_path / "layout.toml"
    layout.write_text(text)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.ctl.main",
            "plan",
            "--layout",
            str(layout),
            "--check-chain",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pin chain: BROKEN" in proc.stdout
    assert (
        "  - kubelet: kubelet/k3s-worker-tasks.yaml: reservedMemory 2148Mi does not fit vm "
        "'tasks' (2 GiB)" in proc.stdout
    )
    assert (
        "  - agent container: agent-node1.yaml: '2' CPUs on k3s-worker-data, but guest NUMA "
        "node 0 has 0 allocatable CPUs" in proc.stdout
    )


def _interleaved(plan: Plan) -> Plan:
    """The plan's host with its threads renumbered: node n's core k is threads 2k+n, 2k+n+T/2."""
    half = sum(len(n.cpus) for n in plan.topology.nodes) // 2
    nodes = []
    for n in plan.topology.nodes:
        cores = tuple(
            dataclasses.replace(c, threads=(2 * k + n.id, 2 * k + n.id + half))
            for k, c in enumerate(n.cores)
        )
        cpus = tuple(sorted(t for c in cores for t in c.threads))
        nodes.append(dataclasses.replace(n, cores=cores, cpus=cpus))
    topology = dataclasses.replace(plan.topology, nodes=tuple(nodes))
    return dataclasses.replace(plan, topology=topology)


def test_cli_check_chain_of_applied_domains(plan: Plan, tmp_path: Path) -> None:
    seed = _cli("--check-chain")  # the generated artefacts of the seed: closed
    assert (seed.returncode, seed.stdout.splitlines()[-1]) == (0, "pin chain: OK"), seed.stdout
    assert _cli("--out", str(tmp_path / "plan")).returncode == 0
    domains = tmp_path / "plan" / "domains"
    assert _cli("--check-chain", "--domains", str(domains)).returncode == 0
    heavy = next(vm for vm in plan.vms if vm.spec.name == "slm-heavy")
    path = domains / "slm-heavy.xml"
    pin = f'vcpu="3" cpuset="{dict(heavy.vcpupins)[3]}"'
    path.write_text(_edit(path.read_text(), pin, 'vcpu="3" cpuset="1"'))
    path = domains / "data.xml"
    path.write_text(_edit(path.read_text(), 'cpus="0-15"', 'cpus="0-13"'))
    (domains / "tasks.xml").unlink()
    proc = _cli("--check-chain", "--domains", str(domains))
    assert proc.returncode == 1
    broken = proc.stdout.split("pin chain: BROKEN\n")[1].splitlines()
    assert broken == [
        "  - libvirt vCPU pin: vm 'slm-heavy': vCPUs 3 are not pinned to the plan's host threads "
        "(vcpupin vcpu -> cpuset, one thread each)",
        "  - guest NUMA node: vm 'data': vCPUs 14-15 are in no guest NUMA node",
        "  - libvirt vCPU pin: vm 'tasks': no domain XML",
    ]
    # The same applied domains, checked against a host whose CPUs are numbered otherwise (node
    # 0 the even threads, node 1 the odd): every pin is off the plan made from that host.
    caps = tmp_path / "caps.xml"
    caps.write_text(_capabilities(_interleaved(plan)))
    proc = _cli("--capabilities", str(caps), "--check-chain", "--domains", str(domains))
    assert proc.returncode == 1
    assert "  - libvirt vCPU pin: vm 'data': vCPUs 0-15 are not pinned" in proc.stdout
    assert _cli("--domains", str(domains)).returncode == 2
    proc = _cli("--check-chain", "--domains", str(tmp_path / "none"))
    assert proc.returncode == 1
    assert f"--domains {tmp_path / 'none'}: not a folder" in proc.stderr
