"""Placement on a real two-node kernel: a QEMU guest with NUMA nodes 0 and 1 runs the real
staging agents under numactl on a real batch (vm.py boots it, guest.py runs inside). The agents'
own placement reports are checked against the kernel's per-node Shmem counters, and a copy put on
the wrong node must be reported as remote.

Needs qemu-system-x86_64 (Debian: qemu-system-x86) and a static busybox (busybox-static); the
first run fetches the Debian kernel package with apt-get download and caches it under
tests/numa_vm/.cache/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from typing import Any

import pytest

from tests import early
from tests.numa_vm import vm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        shutil.which(vm.QEMU) is None,
        reason=f"{vm.QEMU} not installed (Debian package qemu-system-x86)",
    ),
]

PAGE_KB = 4
MIN_FRACTION = 0.99
# Shmem that moves for reasons of its own while a batch is staged (a few pages at most; the
# counters are folded with vm/stat_refresh before each reading).
SLACK_KB = 64


def boot() -> dict[str, Any]:
    return vm.boot(timeout=600)


early.register(__name__, boot)  # boots while the rest of the suite runs


@pytest.fixture(scope="module")
def guest() -> dict[str, Any]:
    """One boot for the whole module: the guest's findings (see guest.py)."""
    try:
        result: dict[str, Any] = early.result(__name__)
    except vm.VMError as e:
        pytest.fail(str(e))
    assert "error" not in result, result["error"] + "\n" + result["console"]
    return result


def pages(sizes: Iterable[int]) -> int:
    """Pages files of these sizes take in a tmpfs: each rounded up to whole pages."""
    return sum(-(-size // (PAGE_KB * 1024)) for size in sizes)


def batch_pages(guest: dict[str, Any]) -> int:
    """Pages the batch's files take in a tmpfs."""
    return pages(guest["files"].values())


def test_guest_has_two_numa_nodes_one_cpu_each_at_distance_21(guest: dict[str, Any]) -> None:
    topo = guest["topology"]
    assert topo["nodes"] == [0, 1]
    assert topo["cpus"] == {"0": "0", "1": "1"}
    assert topo["distance"] == {"0": [10, 21], "1": [21, 10]}


@pytest.mark.parametrize("node", [0, 1])
def test_agent_says_hello_bound_to_its_own_node(guest: dict[str, Any], node: int) -> None:
    hello = guest["hello"][f"node{node}"]
    assert (hello["node"], hello["policy"], hello["mems"], hello["cpus"]) == (
        node,
        "bind",
        [node],
        [node],
    )


@pytest.mark.parametrize("node", [0, 1])
def test_agent_reports_its_copies_on_its_own_node(guest: dict[str, Any], node: int) -> None:
    reply = guest["stage"][f"node{node}"]["reply"]
    assert reply["type"] == "staged", reply
    p = reply["placement"]
    assert p["node"] == node
    assert p["method"] == "move_pages"
    assert p["pages"] == batch_pages(guest)
    assert p["fraction"] >= MIN_FRACTION
    assert p["nodes"] == {str(node): p["pages"]}
    assert set(p["files"]) == set(guest["files"])
    assert all(f["fraction"] >= MIN_FRACTION for f in p["files"].values()), p["files"]


@pytest.mark.parametrize("node", [0, 1])
def test_kernel_counters_agree_with_the_agents_report(guest: dict[str, Any], node: int) -> None:
    # Staging grew Shmem on the agent's node by the pages it reported, and not on the other.
    stage = guest["stage"][f"node{node}"]
    local_kb = stage["reply"]["placement"]["local_pages"] * PAGE_KB
    delta = stage["shmem_kb_delta"]
    assert abs(delta[str(node)] - local_kb) <= SLACK_KB, delta
    assert abs(delta[str(1 - node)]) <= SLACK_KB, delta
    # And the purge gave them back on the same node, with the aggregation's files.
    freed = guest["purge"][f"node{node}"]["shmem_kb_delta"]
    agg_kb = pages(guest["aggregate"][f"node{node}"]["file_bytes"].values()) * PAGE_KB
    assert abs(freed[str(node)] + local_kb + agg_kb) <= SLACK_KB, freed


@pytest.mark.parametrize("node", [0, 1])
def test_the_aggregation_writes_its_rows_into_its_own_nodes_memory(
    guest: dict[str, Any], node: int
) -> None:
    """The copies of the cross-check files, aggregates.csv and aggregates.parquet grow Shmem on
    the aggregating agent's node by their pages, and not on the other: node 0 by its bound
    policy on a plain tmpfs, node 1 by its mount's mpol."""
    agg = guest["aggregate"][f"node{node}"]
    reply = agg["reply"]
    assert reply["type"] == "aggregated", reply
    assert reply["summary"]["rows"] == guest["rows"]
    assert reply["summary"]["models"] == sorted(guest["models"])
    kb = pages(agg["file_bytes"].values()) * PAGE_KB
    assert kb > 100, agg["file_bytes"]  # enough pages for the delta to mean something
    delta = agg["shmem_kb_delta"]
    assert abs(delta[str(node)] - kb) <= SLACK_KB, (delta, kb)
    assert abs(delta[str(1 - node)]) <= SLACK_KB, delta


def test_the_archive_puts_the_whole_batch_in_the_lake(guest: dict[str, Any]) -> None:
    archive = guest["archive"]
    assert archive["reply"]["type"] == "archived", archive["reply"]
    models = guest["models"]
    expected = [f"{m}.parquet" for m in models] + [f"crosscheck_{m}.parquet" for m in models]
    assert archive["files"] == sorted([*expected, "aggregates.parquet"])


def test_a_copy_on_the_wrong_node_is_reported_as_remote(guest: dict[str, Any]) -> None:
    # Node 0's agent, bound to node 0, staging into a tmpfs mounted with mpol=bind:1.
    stage = guest["stage"]["wrong"]
    hello = guest["hello"]["wrong"]
    assert (hello["node"], hello["policy"], hello["mems"]) == (0, "bind", [0])
    p = stage["reply"]["placement"]
    assert p["node"] == 0
    assert p["fraction"] <= 1 - MIN_FRACTION
    assert p["nodes"] == {"1": batch_pages(guest)}
    # The kernel agrees: the pages went to node 1.
    delta = stage["shmem_kb_delta"]
    assert abs(delta["1"] - batch_pages(guest) * PAGE_KB) <= SLACK_KB, delta
    assert abs(delta["0"]) <= SLACK_KB, delta


def test_agent_bound_to_another_node_refuses_to_run(guest: dict[str, Any]) -> None:
    assert guest["exit"]["refused"] == 3
    assert "refused" not in guest["hello"]


def test_agents_stop_cleanly_on_sigterm(guest: dict[str, Any]) -> None:
    assert {k: v for k, v in guest["exit"].items() if k != "refused"} == {
        "node0": 0,
        "node1": 0,
        "wrong": 0,
    }


# -- cross-node bytes per batch (docs/numa.md §2) ------------------------------------------------


def batch_bytes(guest: dict[str, Any]) -> int:
    return sum(guest["files"].values())


def test_staging_was_filled_on_node_0(guest: dict[str, Any]) -> None:
    """The premise of the next tests: the staging files' pages are on node 0."""
    delta = guest["staging"]["shmem_kb_delta"]
    assert abs(delta["0"] - batch_pages(guest) * PAGE_KB) <= SLACK_KB, delta
    assert abs(delta["1"]) <= SLACK_KB, delta


@pytest.mark.parametrize(("label", "remote"), [("node0", False), ("node1", True), ("wrong", False)])
def test_a_copy_from_another_nodes_page_cache_counts_the_files_bytes(
    guest: dict[str, Any], label: str, remote: bool
) -> None:
    """Node 1's agent copies from pages on node 0: every byte crosses. Node 0's agents (the
    wrong one included: its source is on its own node) copy nothing across."""
    reply = guest["stage"][label]["reply"]
    total = batch_bytes(guest)
    assert reply["bytes"] == total
    assert reply["copied_remote"] == (total if remote else 0)
    assert reply["copied_absent"] == 0
    assert reply["source_nodes"] == {"0": total}


@pytest.mark.parametrize("label", ["node0", "node1"])
def test_the_crosscheck_reads_no_byte_off_its_node(guest: dict[str, Any], label: str) -> None:
    reply = guest["crosscheck"][label]["reply"]
    assert reply["type"] == "crosschecked", reply
    assert reply["read_bytes"] == batch_bytes(guest)
    assert reply["read_remote"] == 0
    assert reply["decode_cpu_s"] > 0


def test_a_wrongly_bound_agent_counts_all_its_reads_as_remote(guest: dict[str, Any]) -> None:
    """Node 0's agent whose tmpfs is bound to node 1: its copies are on node 1, so every byte
    its cross-check reads comes from another node."""
    reply = guest["crosscheck"]["wrong"]["reply"]
    assert reply["type"] == "crosschecked", reply
    assert reply["read_bytes"] == batch_bytes(guest)
    assert reply["read_remote"] == batch_bytes(guest)


@pytest.mark.parametrize("node", [0, 1])
def test_the_aggregation_copies_the_other_nodes_files_across_and_reads_locally(
    guest: dict[str, Any], node: int
) -> None:
    """The cross-check files in staging are on the node of the agent that wrote them: the
    aggregating agent's copies of the other node's files cross, its reads do not."""
    agg = guest["aggregate"][f"node{node}"]
    reply = agg["reply"]
    models = guest["models"]
    half = (len(models) + 1) // 2
    others = models[half:] if node == 0 else models[:half]
    copies = {k: v for k, v in agg["file_bytes"].items() if k.startswith("crosscheck_")}
    assert reply["copied_bytes"] == sum(copies.values())
    assert reply["copied_remote"] == sum(copies[f"crosscheck_{m}.parquet"] for m in others)
    assert reply["copied_absent"] == 0
    assert reply["read_bytes"] == sum(copies.values())
    assert reply["read_remote"] == 0


def test_every_step_reports_the_agents_peak_rss(guest: dict[str, Any]) -> None:
    peaks = [guest["stage"][k]["reply"]["peak_rss"] for k in ("node0", "node1", "wrong")]
    peaks += [guest["crosscheck"][k]["reply"]["peak_rss"] for k in ("node0", "node1", "wrong")]
    peaks += [guest["aggregate"][k]["reply"]["peak_rss"] for k in ("node0", "node1")]
    assert all(isinstance(p, int) and p > 10 << 20 for p in peaks), peaks


def test_the_staged_reply_carries_the_files_compression(guest: dict[str, Any]) -> None:
    """As pyarrow reads the footers on the host."""
    want = guest["footers"]
    for label in ("node0", "node1", "wrong"):
        reply = guest["stage"][label]["reply"]
        assert reply["compressed_bytes"] == want["compressed_bytes"]
        assert reply["decoded_bytes"] == want["decoded_bytes"]
        assert reply["encode_cpu_s"] == pytest.approx(want["encode_cpu_s"], abs=1e-5)
    assert want["decoded_bytes"] > want["compressed_bytes"] > 0
