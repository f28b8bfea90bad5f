"""coordinator.core.topology: reading NUMA nodes, cores, memory, distances and L3 from sysfs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import pytest
from fakesysfs import write_fake_sysfs
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.errors import TopologyError
from coordinator.core.topology import (
    Topology,
    check_nodes,
    format_cpulist,
    from_json,
    load_json,
    parse_cpulist,
    read_topology,
    register_cli,
    render_tree,
    synthetic_topology,
    to_json,
)

GIB_KIB = 1024 * 1024


@pytest.fixture
def seed_root(tmp_path: Path) -> Path:
    """A fake sysfs of the seed's 2 x 18-core, 2-thread, 126 GiB-per-node machine."""
    return write_fake_sysfs(tmp_path / "root")


@pytest.fixture
def seed(seed_root: Path) -> Topology:
    return read_topology(seed_root)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="coordinatorctl")
    sub = parser.add_subparsers()
    register_cli(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


# --------------------------------------------------------------------------- cpulists


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-17,36-53", (*range(18), *range(36, 54))),
        ("5", (5,)),
        ("", ()),
        ("\n", ()),
        ("3,1,2-3", (1, 2, 3)),
        ("0-6:3", (0, 3, 6)),
    ],
)
def test_parse_cpulist_reads_kernel_ranges_lists_and_strides(
    text: str, cpus: tuple[int, ...]
) -> None:
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "0-4:0", "1,,x"])
def test_parse_cpulist_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="cpulist"):
        parse_cpulist(text)


def test_format_cpulist_collapses_runs_like_the_kernel() -> None:
    assert format_cpulist([36, 0, 1, 2, 37, 5]) == "0-2,5,36-37"
    assert format_cpulist([]) == ""
    assert format_cpulist([0, 1], ", ") == "0-1"


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_format_then_parse_cpulist_gives_back_the_same_cpus(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == tuple(sorted(cpus))


# --------------------------------------------------------------------------- fake seed machine


def test_seed_sysfs_has_two_nodes_with_the_seeds_thread_ranges(seed: Topology) -> None:
    assert seed.node_ids == (0, 1)
    assert format_cpulist(seed.node(0).cpus) == "0-17,36-53"
    assert format_cpulist(seed.node(1).cpus) == "18-35,54-71"
    assert seed.packages == (0, 1)


def test_each_physical_core_pairs_thread_n_with_thread_n_plus_36(seed: Topology) -> None:
    for node in seed.nodes:
        assert len(node.cores) == 18
        for local, core in enumerate(node.cores):
            first = node.id * 18 + local
            assert core.threads == (first, first + 36)
            assert core.core_id == local
            assert core.package == node.id


def test_memory_per_node_is_read_from_the_node_meminfo(seed: Topology) -> None:
    for node in seed.nodes:
        assert node.mem_total_kib == 126 * GIB_KIB
        assert node.mem_free_kib == 126 * GIB_KIB * 3 // 4
        assert node.mem_total_gib == 126


def test_distances_and_cross_node_penalty_are_the_seeds_21_vs_10(seed: Topology) -> None:
    assert seed.node(0).distances == ((0, 10), (1, 21))
    assert seed.node(1).distance_to(0) == 21
    assert seed.penalty() == (2.1, 21, 10)


def test_l3_is_the_one_shared_socket_cache_counted_once(seed: Topology) -> None:
    for node in seed.nodes:
        assert node.l3_bytes == 45 * 1024 * 1024
        assert node.l3_count == 1


def test_reading_the_fake_tree_equals_the_synthetic_seed_topology(seed: Topology) -> None:
    synthetic = synthetic_topology()
    # The fake tree reports 3/4 free; everything else must agree field for field.
    assert [n.mem_free_kib for n in seed.nodes] == [126 * GIB_KIB * 3 // 4] * 2
    nodes = tuple(dataclasses.replace(n, mem_free_kib=n.mem_total_kib) for n in seed.nodes)
    assert Topology(nodes=nodes) == synthetic


def test_render_tree_prints_the_seeds_hardware_topology_block(seed: Topology) -> None:
    assert render_tree(seed) == (
        "Dual-Socket NUMA System:\n"
        "├─ Node 0 (Socket 0):\n"
        "│   ├─ 18 physical cores (36 threads: 0-17, 36-53)\n"
        "│   ├─ sibling threads per core: 0+36  1+37  …  17+53\n"
        "│   ├─ 126 GiB RAM (94.5 GiB free)\n"
        "│   ├─ 45 MiB L3 cache (shared)\n"
        "│   └─ distances: node 0: 10, node 1: 21\n"
        "│\n"
        "└─ Node 1 (Socket 1):\n"
        "    ├─ 18 physical cores (36 threads: 18-35, 54-71)\n"
        "    ├─ sibling threads per core: 18+54  19+55  …  35+71\n"
        "    ├─ 126 GiB RAM (94.5 GiB free)\n"
        "    ├─ 45 MiB L3 cache (shared)\n"
        "    └─ distances: node 0: 21, node 1: 10\n"
        "\n"
        "NUMA Cross-Node Penalty: 2.1x (distance 21 vs 10, firmware SLIT)\n"
    )


def test_four_node_machine_without_smt_or_l3_reads_and_renders(tmp_path: Path) -> None:
    dist = [[10 if i == j else 16 if abs(i - j) == 1 else 32 for j in range(4)] for i in range(4)]
    root = write_fake_sysfs(
        tmp_path, nodes=4, cores_per_node=2, threads_per_core=1, l3_mib=0, distance=dist
    )
    topo = read_topology(root)
    assert topo.node_ids == (0, 1, 2, 3)
    assert topo.node(3).cores[1].threads == (7,)
    assert topo.node(2).l3_bytes is None
    assert topo.penalty() == (3.2, 32, 10)
    text = render_tree(topo)
    assert text.startswith("Quad-Socket NUMA System:\n")
    assert "L3 cache: not reported" in text


# --------------------------------------------------------------------------- kernel edge cases


def test_offline_nodes_are_left_out(seed_root: Path) -> None:
    node_base = seed_root / "sys/devices/system/node"
    (node_base / "online").write_text("0\n")
    (node_base / "node0/distance").write_text("10\n")  # the kernel lists online nodes only
    topo = read_topology(seed_root)
    assert topo.node_ids == (0,)
    assert topo.penalty() is None


def test_offline_cpus_are_left_out_and_their_core_shrinks(seed_root: Path) -> None:
    (seed_root / "sys/devices/system/cpu/online").write_text("0-70\n")
    node1 = read_topology(seed_root).node(1)
    assert 71 not in node1.cpus
    assert node1.cores[-1].threads == (35,)


def test_distance_row_not_matching_the_online_nodes_is_an_error(seed_root: Path) -> None:
    (seed_root / "sys/devices/system/node/node1/distance").write_text("21\n")
    with pytest.raises(TopologyError, match=r"node1/distance: expected 2 distances"):
        read_topology(seed_root)


def test_missing_node_sysfs_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"sys/devices/system/node not found"):
        read_topology(tmp_path)


def test_unreadable_sibling_list_names_the_file(seed_root: Path) -> None:
    (seed_root / "sys/devices/system/cpu/cpu5/topology/thread_siblings_list").unlink()
    with pytest.raises(TopologyError, match=r"cpu5/topology/thread_siblings_list"):
        read_topology(seed_root)


# --------------------------------------------------------------------------- check_nodes


def test_check_nodes_accepts_configured_nodes_that_exist_with_memory(seed: Topology) -> None:
    check_nodes(seed, [0, 1])


def test_check_nodes_names_a_configured_node_that_does_not_exist(seed: Topology) -> None:
    with pytest.raises(TopologyError, match=r"node 2 does not exist .*online nodes: 0-1"):
        check_nodes(seed, [0, 2])


def test_check_nodes_names_a_configured_node_without_memory(seed_root: Path) -> None:
    meminfo = seed_root / "sys/devices/system/node/node1/meminfo"
    meminfo.write_text("Node 1 MemTotal: 0 kB\nNode 1 MemFree: 0 kB\n")
    with pytest.raises(TopologyError, match=r"configured node 1 has no memory"):
        check_nodes(read_topology(seed_root), [0, 1])


# --------------------------------------------------------------------------- JSON


def test_json_round_trip_gives_back_the_same_topology(seed: Topology) -> None:
    data = json.loads(json.dumps(to_json(seed)))
    assert data["penalty"] == {"ratio": 2.1, "remote": 21, "local": 10}
    assert data["nodes"][1]["cores"][0] == {"package": 1, "core_id": 0, "threads": [18, 54]}
    assert from_json(data) == seed


def test_topology_json_with_a_wrong_type_names_the_key(tmp_path: Path, seed: Topology) -> None:
    data = to_json(seed)
    data["nodes"][1]["mem_total_kib"] = "lots"
    path = tmp_path / "topo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopologyError, match=r"topo.json: nodes\[1\]: key 'mem_total_kib'"):
        load_json(path)


def test_a_json_file_that_is_not_a_topology_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"nodes": []}')
    with pytest.raises(TopologyError, match=r"other.json: not a topology file"):
        load_json(path)


# --------------------------------------------------------------------------- CLI


def test_cli_topology_prints_the_tree(seed_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("topology", "--sysfs-root", str(seed_root)) == 0
    out = capsys.readouterr().out
    assert "└─ Node 1 (Socket 1):" in out
    assert "NUMA Cross-Node Penalty: 2.1x (distance 21 vs 10" in out


def test_cli_topology_json_is_what_from_json_reads(
    seed_root: Path, seed: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("topology", "--json", "--sysfs-root", str(seed_root)) == 0
    assert from_json(json.loads(capsys.readouterr().out)) == seed


def test_cli_topology_reports_an_unreadable_sysfs_as_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("topology", "--sysfs-root", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("coordinatorctl: error: ")
    assert "sys/devices/system/node not found" in err


# --------------------------------------------------------------------------- this machine


def test_real_host_sysfs_reads_with_at_least_one_node_holding_every_usable_cpu() -> None:
    topo = read_topology("/")
    assert len(topo.nodes) >= 1
    assert any(node.mem_total_kib > 0 for node in topo.nodes)
    on_nodes = {cpu for node in topo.nodes for cpu in node.cpus}
    assert os.sched_getaffinity(0) <= on_nodes
    for node in topo.nodes:
        assert {t for core in node.cores for t in core.threads} == set(node.cpus)
    check_nodes(topo, topo.node_ids)
    assert render_tree(topo).endswith("\n")


def test_cli_topology_on_the_real_host_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("topology", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["nodes"]) >= 1
