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
