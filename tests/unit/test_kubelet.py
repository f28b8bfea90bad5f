"""plan --k8s DIR writes a checked KubeletConfiguration per worker and the k3s line applying it;
check_kubelet and check_host_reserve fail on configs and plans that break each rule."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.core.errors import LayoutError
from coordinator.planner.k8s import agent_cpus_by_worker, render_manifests, write_k8s
from coordinator.planner.kubelet import (
    KubeletOptions,
    check_host_reserve,
    check_kubelet,
    render_kubelet_config,
)
from coordinator.planner.layout import hardware_topology, load_layout
from coordinator.planner.plan import Plan, make_plan

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
