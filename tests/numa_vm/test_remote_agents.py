"""Agents in another kernel: the real coordinator on the host, the real staging agents of nodes
0 and 1 in a two-node QEMU guest, reaching it over TCP with mutual TLS.

One run (tests/numa_vm/remote.py, started in the background at collection time by
tests/early.py, like test_numa_vm.py's guest) does it all; the tests check what it found:

- the network, on its own: the guest (10.0.2.15 on QEMU's user-mode network, no port forwarded
  into it) opens a plain TCP connection to 10.0.2.2, which QEMU maps to the host's loopback,
  and a listener on the host's 127.0.0.1 answers it;
- the agents: coordinatord runs on the host with PostgreSQL (embedded, or $TEST_DSN) and
  `[agents] listen = "tcp://127.0.0.1:PORT"` with trustme certificates (`coordinator.numa`,
  `node-0.numa`, `node-1.numa`); both `[[node]]`s are `remote = true`. In the guest,
  remote_guest.py starts `numactl --membind=N --cpunodebind=N python -m agents.agent --node N
  --connect tcp://10.0.2.2:PORT --tls-*` for N = 0 and 1, with a config of their own whose
  staging is the guest's 9p mount of the host's staging (/run/staging) and whose lake is the
  host's lake, mounted over 9p at the same path;
- a batch published on the host with the SDK goes through: the ledger row is `done`, its rows
  are in PostgreSQL, its files in the lake, staging is empty;
- placement, measured inside the guest: each node's Staged reply (move_pages over its copies,
  which the daemon records in the ledger row's `placement`, per node, and the staging time in
  `timings`) puts the whole batch on the agent's own node, and the guest's per-node Shmem
  counters saw the batch's pages on both nodes.

Needs what test_numa_vm.py needs (qemu-system-x86, busybox-static, the Debian kernel fetched
once into tests/numa_vm/.cache/). `python -m tests.numa_vm.remote` runs the same outside pytest.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from tests import early
from tests.numa_vm import remote, vm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        shutil.which(vm.QEMU) is None,
        reason=f"{vm.QEMU} not installed (Debian package qemu-system-x86)",
    ),
]

NODES = (0, 1)


def run() -> dict[str, Any]:
    return remote.run(batch=False, timeout=600)


early.register(__name__, run)  # boots while the rest of the suite runs


@pytest.fixture(scope="module")
def found() -> dict[str, Any]:
    """One run for the whole module (see remote.run)."""
    try:
        result: dict[str, Any] = early.result(__name__)
    except vm.VMError as e:
        pytest.fail(str(e))
    guest = result["guest"]
    assert "error" not in guest, guest["error"] + "\n" + guest["console"]
    return result


def test_guest_is_on_user_mode_network_with_the_host_as_gateway(found: dict[str, Any]) -> None:
    net = found["guest"]["net"]
    assert net["interfaces"] == ["eth0", "lo"]
    assert net["gateway"] == "10.0.2.2"


def test_guest_reaches_a_tcp_port_on_the_hosts_loopback(found: dict[str, Any]) -> None:
    probe = found["guest"]["probe"]
    assert probe["local"] == "10.0.2.15"
    assert probe["answer"] == f"host saw {found['token']}"
    # The host's listener, bound to 127.0.0.1 alone, saw the guest's line come from loopback.
    assert found["probe_seen"] == [{"line": found["token"], "peer": "127.0.0.1"}]


def test_coordinator_listens_for_agents_on_the_hosts_loopback_only(found: dict[str, Any]) -> None:
    listening = [e for e in found["coordinator_events"] if e["event"] == "listening for agents"]
    assert [(e["listen"], e["cluster"]) for e in listening] == [(found["listen"], "numa")]
    assert found["listen"].startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize("node", NODES)
def test_guest_agent_connects_over_tls_bound_to_its_own_node(
    found: dict[str, Any], node: int
) -> None:
    port = found["listen"].rsplit(":", 1)[1]
    # The agent, in the guest, connected to the host's loopback as the guest sees it ...
    said = [
        e for e in found["agent_events"][str(node)] if e["event"] == "connected to the coordinator"
    ]
    assert [e["at"] for e in said] == [f"tcp://10.0.2.2:{port}"]
    started = [e for e in found["agent_events"][str(node)] if e["event"] == "agent started"]
    assert [(e["policy"], e["mems"], e["cpus"]) for e in started] == [("bind", [node], [node])]
    # ... and the coordinator accepted it (its certificate names node-<N>.numa) as that node,
    # from its loopback, with the binding the guest's kernel reports.
    accepted = [
        e
        for e in found["coordinator_events"]
        if e["event"] == "agent connected" and e["node"] == node
    ]
    assert [(e["mems"], e["cpus"]) for e in accepted] == [([node], [node])]
    assert accepted[0]["peer"].startswith("127.0.0.1:")
    [agent] = [a for a in found["status"]["agents"] if a["node"] == node]
    assert agent["connected"] is True
    assert (agent["policy"], agent["mems"], agent["cpus"]) == ("bind", [node], [node])


def test_no_connection_was_refused(found: dict[str, Any]) -> None:
    assert found["status"]["agents_refused"] == {}
    assert sorted(a["node"] for a in found["status"]["agents"]) == list(NODES)


def test_guest_agents_stop_cleanly_on_sigterm(found: dict[str, Any]) -> None:
    assert found["guest"]["exit"] == {"0": 0, "1": 0}
    assert found["coordinator_exit"] == 0
