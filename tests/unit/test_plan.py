"""The seed's machine layout parsed (layout), placed and checked (plan) and turned into
configuration (plan_render)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from fakesysfs import write_fake_sysfs

from coordinator.core import topology
from coordinator.core.errors import LayoutError
from coordinator.core.topology import Core, format_cpulist, read_topology, synthetic_topology
from coordinator.planner.layout import hardware_topology, load_layout, parse_layout
from coordinator.planner.plan import Plan, check_plan, make_plan, totals
from coordinator.planner.render import (
    plan_to_json,
    register_cli,
    render_domain_fragment,
    render_k3s_commands,
    render_k3s_config,
    render_report,
    render_systemd_dropins,
    write_plan,
)

SEED_LAYOUT = Path(__file__).resolve().parents[2] / "config" / "layout.seed.toml"


def seed_data() -> dict[str, Any]:
    """The seed layout as decoded TOML, a fresh copy to mutate."""
    with SEED_LAYOUT.open("rb") as fh:
        return copy.deepcopy(tomllib.load(fh))


def vm_table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table: dict[str, Any] = next(vm for vm in data["vm"] if vm["name"] == name)
    return table


def plan_of(data: dict[str, Any]) -> Plan:
    layout = parse_layout(data, "test.toml")
    return make_plan(layout, hardware_topology(layout))


@pytest.fixture(scope="module")
def seed_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """The seed layout planned on the seed machine read from a fake sysfs tree."""
    topo = read_topology(write_fake_sysfs(tmp_path_factory.mktemp("sysfs")))
    return make_plan(load_layout(SEED_LAYOUT), topo)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="coordinatorctl")
    sub = parser.add_subparsers()
    register_cli(sub)
    topology.register_cli(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


# --------------------------------------------------------------------------- the seed


def test_seed_plan_reproduces_the_seed_tables_core_thread_and_memory_totals(
    seed_plan: Plan,
) -> None:
    t = totals(seed_plan)
    assert (t.cores, t.threads, t.memory_gib) == (36, 72, 234)
    assert t.hdd_gb == 8000
    assert dict(t.host_memory_gib) == {0: 8.0, 1: 10.0}  # "Host: ~18GB RAM"


def test_seed_plan_ssd_total_is_the_sum_of_the_seed_rows(seed_plan: Plan) -> None:
    # The seed's rows are 40 + 120 + 40 + 40 = 240 GB. Its TOTAL row says 280 and "70 GB left",
    # which counts the data VM's 40 GB disk twice (4 x 40 + 120); its own storage section
    # (350 = 160 disks + 80 hot tier + 100 host + 10 buffer) agrees with 240 and 110 left.
    t = totals(seed_plan)
    assert t.ssd_gb == 240
    assert t.host_ssd_gb == 110


def test_the_seed_tables_280gb_ssd_total_would_not_fit_its_own_storage_budget() -> None:
    data = seed_data()
    vm_table(data, "data")["ssd_gb"] = 160  # 280 GB in all, as the seed's TOTAL row claims
    with pytest.raises(LayoutError, match=r"SSD over budget: VMs need 280 GB"):
        plan_of(data)


def test_seed_plan_pins_vcpus_to_the_seeds_thread_mapping(seed_plan: Plan) -> None:
    vms = {vm.spec.name: vm for vm in seed_plan.vms}
    heavy = dict(vms["slm-heavy"].vcpupins)
    for k in range(16):  # guest core k = host core k + 2, threads (N, N+36)
        assert (heavy[2 * k], heavy[2 * k + 1]) == (k + 2, k + 2 + 36)
    assert format_cpulist(vms["slm-heavy"].cpus) == "2-17,38-53"
    assert format_cpulist(vms["data"].cpus) == "20-27,56-63"
    assert format_cpulist(vms["slm"].cpus) == "28-31,64-67"
    assert format_cpulist(vms["tasks"].cpus) == "32-35,68-71"
    assert format_cpulist(vms["slm-heavy"].emulator_cpus) == "0-1,36-37"
    for name in ("data", "slm", "tasks"):
        assert format_cpulist(vms[name].emulator_cpus) == "18-19,54-55"


def test_inline_seed_hardware_plans_exactly_like_the_fake_seed_sysfs(seed_plan: Plan) -> None:
    inline = make_plan(load_layout(SEED_LAYOUT), hardware_topology(load_layout(SEED_LAYOUT)))
    assert [vm.vcpupins for vm in inline.vms] == [vm.vcpupins for vm in seed_plan.vms]
    assert [n.host_cpus for n in inline.nodes] == [n.host_cpus for n in seed_plan.nodes]


def test_layout_with_hardware_source_host_reads_the_given_sysfs(tmp_path: Path) -> None:
    data = seed_data()
    data["hardware"] = {"source": "host"}
    layout = parse_layout(data, "host.toml")
    topo = hardware_topology(layout, write_fake_sysfs(tmp_path))
    assert topo.source == str(tmp_path)
    assert totals(make_plan(layout, topo)).threads == 72


def test_report_shows_the_seed_table_and_what_the_host_keeps(seed_plan: Plan) -> None:
    report = render_report(seed_plan)
    assert "| slm-heavy | 0 | 16 | 32 | 118GB | 40GB | - | Heavy SLM ensemble |" in report
    assert "| data | 1 | 8 | 16 | 60GB | 120GB | 8TB | DB + Lake |" in report
    assert (
        "| Emulator (N1) | 1 | 2 | 4 | - | - | - | emulator (data, slm, tasks) + host |" in report
    )
    assert "| **TOTAL** | - | 36 | 72 | 234GB | 240GB | 8TB | - |" in report
    assert "RAM: 18.0 GiB (node 0 8.0 GiB, node 1 10.0 GiB)" in report
    assert "SSD: 110 GB of 350 GB" in report


# --------------------------------------------------------------------------- libvirt XML


def minimal_domain(name: str, fragment: str) -> str:
    """A complete domain around a fragment: what `virsh define` would need at the least."""
    return (
        f'<domain type="kvm">\n<name>{name}</name>\n{fragment}'
        '<os><type arch="x86_64">hvm</type></os>\n</domain>\n'
    )


def test_every_domain_fragment_validates_against_libvirts_schema(
    seed_plan: Plan, tmp_path: Path
) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate not installed (Debian libvirt-clients)")
    if shutil.which("xmllint") is None:
        pytest.skip("xmllint not installed (Debian libxml2-utils; virt-xml-validate runs it)")
    for vm in seed_plan.vms:
        path = tmp_path / f"{vm.spec.name}.xml"
        path.write_text(minimal_domain(vm.spec.name, render_domain_fragment(vm, "seed")))
        done = subprocess.run(
            ["virt-xml-validate", str(path), "domain"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{vm.spec.name}: {done.stdout}{done.stderr}"


def test_virt_xml_validate_rejects_a_broken_fragment(tmp_path: Path) -> None:
    """Guards the test above: the validator really runs and fails bad input."""
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate not installed (Debian libvirt-clients)")
    if shutil.which("xmllint") is None:
        pytest.skip("xmllint not installed (Debian libxml2-utils; virt-xml-validate runs it)")
    path = tmp_path / "bad.xml"
    path.write_text(minimal_domain("bad", '<numatune><memory mode="tight"/></numatune>\n'))
    done = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, timeout=60, check=False
    )
    assert done.returncode != 0


def test_domain_fragment_pins_each_vcpu_once_with_strict_memory_and_matching_topology(
    seed_plan: Plan,
) -> None:
    for vm in seed_plan.vms:
        dom = ET.fromstring(minimal_domain(vm.spec.name, render_domain_fragment(vm)))
        vcpus = int(dom.findtext("vcpu") or 0)
        topo = dom.find("cpu/topology")
        assert topo is not None
        assert vcpus == vm.spec.threads
        assert vcpus == int(topo.get("sockets", 0)) * int(topo.get("cores", 0)) * int(
            topo.get("threads", 0)
        )
        assert topo.get("threads") == "2"
        pins = {int(p.get("vcpu", -1)): int(p.get("cpuset", -1)) for p in dom.iter("vcpupin")}
        assert sorted(pins) == list(range(vcpus))
        assert len(set(pins.values())) == vcpus
        emulator = dom.find("cputune/emulatorpin")
        assert emulator is not None
        assert not set(pins.values()) & set(topology.parse_cpulist(emulator.get("cpuset", "")))
        memory = dom.find("numatune/memory")
        assert memory is not None
        assert (memory.get("mode"), memory.get("nodeset")) == ("strict", str(vm.spec.node))
        assert dom.findtext("memory") == str(vm.spec.memory_gib)


# --------------------------------------------------------------------------- rejected layouts


def test_over_subscribed_cores_are_rejected_naming_the_vm_and_node() -> None:
    data = seed_data()
    vm_table(data, "tasks")["cores"] = 6
    vm_table(data, "tasks")["threads"] = 12
    with pytest.raises(LayoutError) as info:
        plan_of(data)
    message = str(info.value)
    assert "test.toml" in message
    assert (
        "vm 'tasks': cores over-subscribed on node 1: needs 6, only 4 of 18 physical cores are "
        "free (host 2, data 8, slm 4)"
    ) in message


def test_memory_over_budget_is_rejected_naming_the_vm_and_node() -> None:
    data = seed_data()
    vm_table(data, "tasks")["memory_gib"] = 31  # node 1: 60 + 32 + 31 = 123 > 126 - 4
    with pytest.raises(LayoutError, match=r"vm 'tasks': memory over budget on node 1"):
        plan_of(data)


def test_memory_that_leaves_the_host_exactly_its_minimum_is_accepted() -> None:
    data = seed_data()
    vm_table(data, "tasks")["memory_gib"] = 30  # 60 + 32 + 30 = 122 = 126 - 4
    assert totals(plan_of(data)).memory_gib == 240


def test_hdd_over_budget_is_rejected_naming_the_vm() -> None:
    data = seed_data()
    vm_table(data, "tasks")["hdd_gb"] = 1
    with pytest.raises(LayoutError, match=r"vm 'tasks': HDD over budget: VMs need 8001 GB"):
        plan_of(data)


def test_thread_count_that_would_split_sibling_threads_is_rejected() -> None:
    data = seed_data()
    vm_table(data, "slm")["threads"] = 4
    with pytest.raises(LayoutError, match=r"vm 'slm': threads = 4 .* set threads = 8"):
        plan_of(data)


def test_a_vm_on_a_node_the_machine_lacks_is_rejected_naming_both(tmp_path: Path) -> None:
    topo = read_topology(write_fake_sysfs(tmp_path, nodes=1, distance=((10,),)))
    with pytest.raises(LayoutError) as info:
        make_plan(load_layout(SEED_LAYOUT), topo)
    assert "vm 'data': node 1 does not exist on this machine (online nodes: 0" in str(info.value)


def test_explicit_cpus_used_by_two_vms_are_reported_as_pinned_twice() -> None:
    data = seed_data()
    vm_table(data, "slm")["cpus"] = "28-31,64-67"
    vm_table(data, "tasks")["cpus"] = "28-31,64-67"
    with pytest.raises(
        LayoutError, match=r"cpu 28 is pinned twice: vm 'slm' vCPU 0 and vm 'tasks'"
    ):
        plan_of(data)


def test_explicit_vm_cpus_on_the_emulator_cores_are_rejected() -> None:
    data = seed_data()
    vm_table(data, "tasks")["cpus"] = "18-21,54-57"
    with pytest.raises(LayoutError, match=r"emulator cpu 18 .* is also vm 'tasks' vCPU 0"):
        plan_of(data)


def test_explicit_cpus_that_split_a_core_are_rejected() -> None:
    data = seed_data()
    vm_table(data, "tasks")["cpus"] = "32-35,68-70"
    with pytest.raises(LayoutError, match=r"vm 'tasks': cpus list splits core 1/17"):
        plan_of(data)


def test_explicit_cpus_on_another_node_are_rejected() -> None:
    data = seed_data()
    vm_table(data, "tasks")["cpus"] = "14-17,50-53"
    with pytest.raises(LayoutError, match=r"vm 'tasks': cpus 14-17,50-53 are not on node 1"):
        plan_of(data)


def test_explicit_host_and_vm_cpus_are_honoured() -> None:
    data = seed_data()
    data["node"][1]["host_cpus"] = "34-35,70-71"
    vm_table(data, "tasks")["cpus"] = "18-21,54-57"
    plan = plan_of(data)
    vms = {vm.spec.name: vm for vm in plan.vms}
    assert format_cpulist(vms["tasks"].cpus) == "18-21,54-57"
    assert format_cpulist(vms["data"].cpus) == "22-29,58-65"
    assert format_cpulist(vms["slm"].emulator_cpus) == "34-35,70-71"


def test_check_plan_flags_a_vm_whose_vcpus_sit_on_another_node(seed_plan: Plan) -> None:
    heavy = seed_plan.vms[0]
    moved = dataclasses.replace(heavy, cores=(Core(package=1, core_id=9, threads=(27, 63)),))
    plan = dataclasses.replace(seed_plan, vms=(moved,))
    assert check_plan(plan) == [
        "vm 'slm-heavy' spans nodes: memory is bound to node 0 but vCPUs run on threads of "
        "node(s) 1 (-1: on no node)"
    ]


def test_check_plan_finds_nothing_wrong_with_the_seed(seed_plan: Plan) -> None:
    assert check_plan(seed_plan) == []


# --------------------------------------------------------------------------- layout file


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), r"test.toml: top level: unknown key 'extra'"),
        (
            lambda d: d["vm"][2].update(ram=1),
            r"test.toml: \[\[vm\]\] #3 \('slm'\): unknown key 'ram'",
        ),
        (
            lambda d: d["storage"]["ssd"].update(size=1),
            r"test.toml: \[storage.ssd\]: unknown key 'size'",
        ),
        (lambda d: d["node"][0].update(cores=2), r"\[\[node\]\] #1: unknown key 'cores'"),
        (lambda d: d["hardware"].update(sockets=2), r"\[hardware\]: unknown key 'sockets'"),
        (lambda d: d["vm"][0].pop("taint"), r"\('slm-heavy'\): missing key 'taint'"),
        (lambda d: d["vm"][0].update(cores="16"), r"key 'cores' must be int, found '16'"),
        (lambda d: d["vm"][0].update(memory_gib=True), r"key 'memory_gib' must be int"),
        (lambda d: d["vm"][0].update(ssd_gb=-1), r"key 'ssd_gb' must be >= 0"),
        (lambda d: d["vm"][0].update(taint="workload=slm"), r"taint 'workload=slm' must look"),
        (lambda d: d["vm"][0].update(labels={"bad key": "x"}), r"not a valid Kubernetes label"),
        (lambda d: d["vm"][1].update(name="slm-heavy"), r"already used by vm 'slm-heavy'"),
        (lambda d: d["vm"][0].update(k3s_node="Not_DNS"), r"is not a DNS name"),
        (lambda d: d["node"].append({"id": 0}), r"node 0 is listed twice"),
        (lambda d: d["hardware"].update(distance=[[10]]), r"'distance' must be a 2 x 2 matrix"),
        (lambda d: d["vm"][0].update(cpus="2-x"), r"key 'cpus': bad cpulist item"),
    ],
)
def test_a_bad_layout_is_rejected_naming_file_and_key(edit: Any, message: str) -> None:
    data = seed_data()
    edit(data)
    with pytest.raises(LayoutError, match=message):
        parse_layout(data, "test.toml")


def test_a_layout_that_is_not_toml_is_rejected_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[vm\nname = 1\n")
    with pytest.raises(LayoutError, match=r"broken.toml: not valid TOML"):
        load_layout(path)


def test_a_vm_on_a_node_without_a_node_table_is_rejected() -> None:
    data = seed_data()
    data["node"] = data["node"][:1]
    with pytest.raises(LayoutError, match=r"vm 'data': node 1 has no \[\[node\]\] table"):
        plan_of(data)


# --------------------------------------------------------------------------- k3s and systemd


def test_k3s_commands_taint_and_label_every_worker(seed_plan: Plan) -> None:
    script = render_k3s_commands(seed_plan)
    assert "kubectl taint nodes k3s-worker-slm-heavy workload=slm:NoSchedule --overwrite" in script
    assert "kubectl taint nodes k3s-worker-data workload=data:NoSchedule --overwrite" in script
    assert "kubectl taint nodes k3s-worker-slm workload=slm:NoSchedule --overwrite" in script
    assert "kubectl taint nodes k3s-worker-tasks workload=tasks:NoSchedule --overwrite" in script
    assert (
        "kubectl label nodes k3s-worker-tasks workload=tasks numa-coordinator/numa-node=1 "
        "numa-coordinator/vm=tasks --overwrite"
    ) in script


def test_k3s_config_yaml_appends_the_workers_taint_and_labels(seed_plan: Plan) -> None:
    text = render_k3s_config(seed_plan, seed_plan.vms[0])
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == [
        "node-label+:",
        '  - "workload=slm"',
        '  - "numa-coordinator/numa-node=0"',
        '  - "numa-coordinator/vm=slm-heavy"',
        "node-taint+:",
        '  - "workload=slm:NoSchedule"',
    ]


def test_systemd_dropins_confine_coordinator_and_agents_to_host_cores(seed_plan: Plan) -> None:
    dropins = render_systemd_dropins(seed_plan)

    def affinity(path: str) -> str:
        lines = [ln for ln in dropins[path].splitlines() if ln.startswith("CPUAffinity=")]
        assert len(lines) == 1
        assert "[Service]" in dropins[path]
        return lines[0]

    assert affinity("numa-coordinator.service.d/50-cpuaffinity.conf") == (
        "CPUAffinity=0-1,18-19,36-37,54-55"
    )
    assert affinity("numa-staging-agent@0.service.d/50-cpuaffinity.conf") == (
        "CPUAffinity=0-1,36-37"
    )
    assert affinity("numa-staging-agent@1.service.d/50-cpuaffinity.conf") == (
        "CPUAffinity=18-19,54-55"
    )
    assert len(dropins) == 3


def test_write_plan_writes_every_artefact(seed_plan: Plan, tmp_path: Path) -> None:
    written = {p.relative_to(tmp_path).as_posix() for p in write_plan(seed_plan, tmp_path)}
    assert written == {
        "report.txt",
        "plan.json",
        "k3s/taints.sh",
        *(f"domains/{n}.xml" for n in ("slm-heavy", "data", "slm", "tasks")),
        *(f"k3s/k3s-worker-{n}.yaml" for n in ("slm-heavy", "data", "slm", "tasks")),
        "systemd/numa-coordinator.service.d/50-cpuaffinity.conf",
        "systemd/numa-staging-agent@0.service.d/50-cpuaffinity.conf",
        "systemd/numa-staging-agent@1.service.d/50-cpuaffinity.conf",
    }
    assert os.access(tmp_path / "k3s/taints.sh", os.X_OK)
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(
        json.dumps(plan_to_json(seed_plan))
    )


# --------------------------------------------------------------------------- CLI


def test_cli_plan_prints_the_report_for_the_seed_layout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli("plan", "--layout", str(SEED_LAYOUT)) == 0
    assert "| **TOTAL** | - | 36 | 72 | 234GB | 240GB | 8TB | - |" in capsys.readouterr().out


def test_cli_plan_json_carries_the_pins_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plan", "--layout", str(SEED_LAYOUT), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["threads"] == 72
    assert data["vms"][0]["vcpupin"]["1"] == 38
    assert data["host"] == [
        {"node": 0, "cpus": "0-1,36-37", "cores": 2},
        {"node": 1, "cpus": "18-19,54-55", "cores": 2},
    ]


def test_cli_plan_takes_a_topology_json_from_the_topology_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_fake_sysfs(tmp_path / "root")
    assert run_cli("topology", "--json", "--sysfs-root", str(root)) == 0
    topo_file = tmp_path / "topo.json"
    topo_file.write_text(capsys.readouterr().out)
    out_dir = tmp_path / "out"
    args = ("plan", "--layout", str(SEED_LAYOUT), "--topology", str(topo_file))
    assert run_cli(*args, "--out", str(out_dir)) == 0
    assert f"on topology from {topo_file}" in capsys.readouterr().out
    assert (out_dir / "domains/slm-heavy.xml").read_text().count("<vcpupin ") == 32


def test_cli_plan_from_a_one_node_sysfs_fails_with_exit_1_naming_the_vm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_fake_sysfs(tmp_path, nodes=1, distance=((10,),))
    assert run_cli("plan", "--layout", str(SEED_LAYOUT), "--sysfs-root", str(root)) == 1
    err = capsys.readouterr().err
    assert err.startswith("coordinatorctl: error: ")
    assert "vm 'data': node 1 does not exist on this machine" in err


def test_cli_plan_refuses_topology_and_from_host_together(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("plan", "--layout", "x", "--topology", "t.json", "--from-host")
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_plan_reports_a_missing_layout_file_as_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("plan", "--layout", str(tmp_path / "none.toml")) == 1
    assert "cannot read layout" in capsys.readouterr().err


def test_synthetic_seed_topology_is_what_the_seed_layout_describes() -> None:
    assert hardware_topology(load_layout(SEED_LAYOUT)) == synthetic_topology()
