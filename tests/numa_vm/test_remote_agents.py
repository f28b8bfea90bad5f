"""Agents in another kernel: the real coordinator on the host, the real staging agents of nodes
0 and 1 in a two-node QEMU guest, reaching it over TCP with mutual TLS.

One run (tests/numa_vm/remote.py, started in the background at collection time by
tests/early.py, like test_numa_vm.py's guest) does it all; the tests check what it found:

- the network, on its own: the guest (10.0.2.15 on QEMU's user-mode network, no port forwarded
  into it) opens a plain TCP connection to 10.0.2.2, which QEMU maps to the host's loopback,
  and a listener on the host's 127.0.0.1 answers it;
- the agents: coordinatord runs on the host with PostgreSQL (embedded, or $TEST_DSN) and
  `[agents] listen = "tcp://127.0.0.1:PORT"` with trustme certificates (`coordinator.numa`,
  `node-0.numa`, `node-1.numa`); both `[[node]]`s are `remote = true`, their `staging`, `tmpfs`
  and `lake` the guest's paths. In the guest, remote_guest.py starts `numactl --membind=N
  --cpunodebind=N python -m agents.agent --node N --config C --connect tcp://10.0.2.2:PORT
  --tls-cert F --tls-key F --tls-ca F` for N = 0 and 1 with the coordinator's own config file
  (the guest sees the host's / read-only); staging and the lake are the host's folders, shared
  over 9p and seen as /run/staging and /run/lake. Each agent must connect from the guest and
  be accepted as its node with the binding the guest's kernel reports, nothing refused;
- a batch published on the host with the SDK goes through: the ledger row is `done`, its rows
  are in PostgreSQL, its files in the lake, staging is empty;
- placement, measured inside the guest: each node's Staged reply (move_pages over its copies,
  which the daemon records in the ledger row's `placement`, per node, with the staging time in
  `timings` as `staging_node<N>_ms`, and in status as the agent's `last_placement`) puts the
  whole batch on the agent's own node, and the guest's per-node Shmem counters, sampled four
  times a second, saw at least the batch's pages on each node and saw them go.

Then, in the same guest (no second boot), the k8s DaemonSets' own agent command lines: the
YAML `coordinatorctl plan --layout config/layout.seed.toml --k8s DIR` writes is parsed, each
agent container's command taken as it is (`numactl --membind=0 --cpunodebind=0 staging-agent
--node N --bind-node 0 ...`), only the value of --config (the run's config file for the
ConfigMap's) and of --connect (10.0.2.2:PORT for the Service's name) replaced, and run in the
guest with each node's tmpfs a plain tmpfs as the pod's memory emptyDir is. Both agents connect
as their host node, bound as the manifest says (guest node 0), a second batch goes through, and
its copies are measured on guest node 0, by the agents and by the guest's Shmem counters.

Over 9p the guest sees other inode numbers than the host (Linux's 9p adds 2): the batch gets
through only because a remote agent's file identities are compared without the inode
(docs/protocol.md, "File identities"). A run takes about 30 s on an idle 2-core host (guest
boot to init 4 s, the agents connected 15-45 s after boot under TCG, the batch 5-10 s).

Needs what test_numa_vm.py needs (qemu-system-x86, busybox-static, the Debian kernel fetched
once into tests/numa_vm/.cache/). `python -m tests.numa_vm.remote` runs the same outside pytest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.planner.k8s import agent_args
from tests import early
from tests.numa_vm import remote, vm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        shutil.which(vm.QEMU) is None,
        reason=f"{vm.QEMU} not installed (Debian package qemu-system-x86)",
    ),
]

NODES = (0, 1)
ROWS = 50_000
PAGE_KB = 4
MIN_FRACTION = 0.99
# Shmem that moves for reasons of its own meanwhile (the sampler reads the per-node counters
# without folding the per-CPU deltas first, which lag by a few dozen pages).
SLACK_KB = 256


SEED = vm.ROOT / "config" / "layout.seed.toml"


def manifest_commands() -> dict[int, list[str]]:
    """Each node's agent container command (command + args) from the DaemonSet YAML that the
    real `coordinatorctl plan --k8s` writes for the seed layout."""
    out = Path(tempfile.mkdtemp(prefix="nc-k8s-"))
    try:
        plan = ["plan", "--layout", str(SEED), "--k8s", str(out)]
        subprocess.run(
            [sys.executable, "-m", "coordinator.ctl.main", *plan],
            cwd=vm.ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
        commands = {}
        for node in NODES:
            daemonset = yaml.safe_load((out / f"agent-node{node}.yaml").read_text())
            [container] = daemonset["spec"]["template"]["spec"]["containers"]
            commands[node] = [*container.get("command", []), *container.get("args", [])]
        return commands
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run() -> dict[str, Any]:
    return remote.run(rows=ROWS, timeout=900, k8s=manifest_commands())


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


def test_guest_has_two_numa_nodes_one_cpu_each(found: dict[str, Any]) -> None:
    topo = found["guest"]["topology"]
    assert (topo["nodes"], topo["cpus"]) == ([0, 1], {"0": "0", "1": "1"})


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
    assert found["guest"]["stopped_by"] == "host"  # neither had exited before
    assert found["guest"]["exit"] == {"0": 0, "1": 0}
    assert found["coordinator_exit"] == 0


def batch_pages(found: dict[str, Any]) -> int:
    """Pages the batch's files take in a tmpfs: each rounded up to whole pages."""
    return sum(-(-size // (PAGE_KB * 1024)) for size in found["files"].values())


def test_the_batch_is_done_with_its_rows_in_postgresql(found: dict[str, Any]) -> None:
    row = found["ledger"]
    assert (row["state"], row["error"], row["degraded"]) == ("done", None, False), row["error"]
    assert row["rows"] == ROWS
    assert row["models_present"] == remote.MODELS
    n_pairs = len(remote.MODELS) * (len(remote.MODELS) - 1) // 2
    assert found["counts"] == {"aggregates": ROWS, "items": ROWS, "pairs": n_pairs}


def test_the_batch_is_in_the_lake_as_published_and_gone_from_staging(
    found: dict[str, Any],
) -> None:
    row = found["ledger"]
    folder = row["lake_path"].removeprefix(found["lake_root"] + "/")
    assert folder.startswith("batches/date=") and folder.endswith(f"/batch={remote.BATCH_ID}")
    lake = found["lake_files"]
    names = [f"{m}.parquet" for m in remote.MODELS] + ["aggregates.parquet"]
    names += [f"crosscheck_{m}.parquet" for m in remote.MODELS]
    assert sorted(lake) == sorted(f"{folder}/{n}" for n in names)
    for name, digest in found["published_sha256"].items():
        assert lake[f"{folder}/{name}"] == digest, name
    assert found["lake_aggregates_rows"] == {f"{folder}/aggregates.parquet": ROWS}
    assert found["staging_left"] == []


@pytest.mark.parametrize("node", NODES)
def test_each_node_staged_the_whole_batch_into_its_own_memory(
    found: dict[str, Any], node: int
) -> None:
    """Measured in the guest by the agent (move_pages over its copies, in its Staged reply),
    recorded by the daemon in the ledger row's placement and timings."""
    p = found["ledger"]["placement"][str(node)]
    assert (p["node"], p["method"]) == (node, "move_pages")
    assert p["pages"] == p["local_pages"] == batch_pages(found)
    assert p["fraction"] >= MIN_FRACTION
    assert p["nodes"] == {str(node): p["pages"]}
    assert set(p["files"]) == set(found["files"])
    assert all(f["fraction"] >= MIN_FRACTION for f in p["files"].values()), p["files"]
    assert "below_min" not in found["ledger"]["placement"]
    assert found["ledger"]["timings"][f"staging_node{node}_ms"] > 0
    [agent] = [a for a in found["status"]["agents"] if a["node"] == node]
    assert agent["last_placement"] == p["fraction"]


@pytest.mark.parametrize("node", NODES)
def test_the_guests_kernel_saw_the_copies_on_each_node_and_saw_them_go(
    found: dict[str, Any], node: int
) -> None:
    """The guest's own per-node Shmem counters: each node held at least the batch's pages at
    once (its agent's copies; the aggregating node its cross-check copies and rows as well),
    and the purges gave everything back."""
    shmem = found["guest"]["shmem_kb"]
    base, peak, last = (shmem[k][str(node)] for k in ("baseline", "peak", "last"))
    assert peak - base >= batch_pages(found) * PAGE_KB - SLACK_KB, shmem
    assert abs(last - base) <= SLACK_KB, shmem


# --- the second phase: the k8s DaemonSets' agent command lines in the same guest -------------


@pytest.fixture(scope="module")
def k8s(found: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = found["k8s"]
    return out


def test_k8s_agents_ran_the_manifests_command_lines(k8s: dict[str, Any]) -> None:
    for node in NODES:
        manifest, ran = k8s["manifest"][str(node)], k8s["commands"][str(node)]
        assert manifest[:4] == ["numactl", "--membind=0", "--cpunodebind=0", "staging-agent"]
        assert len(ran) == len(manifest)
        changed = [i for i, (a, b) in enumerate(zip(manifest, ran, strict=True)) if a != b]
        # only the values of --config and --connect
        assert [manifest[i - 1] for i in changed] == ["--config", "--connect"], (manifest, ran)
        assert ran[ran.index("--connect") + 1].startswith("tcp://10.0.2.2:")


@pytest.mark.parametrize("node", NODES)
def test_k8s_agent_is_bound_as_its_manifest_says_and_accepted_as_its_host_node(
    found: dict[str, Any], k8s: dict[str, Any], node: int
) -> None:
    args = agent_args(k8s["manifest"][str(node)])
    assert (args.node, args.membind, args.cpunodebind, args.bind_node) == (node, 0, 0, 0)
    guest_cpus = [int(c) for c in found["guest"]["topology"]["cpus"][str(args.cpunodebind)]]
    started = [e for e in k8s["agent_events"][str(node)] if e["event"] == "agent started"]
    # the guest's kernel, asked by the agent: memory bound to the manifest's --membind node, CPUs
    # those of its --cpunodebind node
    assert [(e["policy"], e["mems"], e["cpus"], e["bind_node"]) for e in started] == [
        ("bind", [args.membind], guest_cpus, args.bind_node)
    ]
    port = found["listen"].rsplit(":", 1)[1]
    said = [
        e for e in k8s["agent_events"][str(node)] if e["event"] == "connected to the coordinator"
    ]
    assert [e["at"] for e in said] == [f"tcp://10.0.2.2:{port}"]
    accepted = [
        e
        for e in k8s["coordinator_events"]
        if e["event"] == "agent connected" and e["node"] == node
    ]
    assert [(e["mems"], e["cpus"]) for e in accepted] == [([args.membind], guest_cpus)]
    [agent] = [a for a in k8s["status"]["agents"] if a["node"] == node]
    assert (agent["connected"], agent["policy"], agent["mems"]) == (True, "bind", [args.membind])
    assert k8s["status"]["agents_refused"] == {}


def test_k8s_agents_take_a_batch_to_done(k8s: dict[str, Any]) -> None:
    row = k8s["ledger"]
    assert (row["state"], row["error"], row["degraded"]) == ("done", None, False), row["error"]
    assert row["rows"] == ROWS
    assert k8s["counts"]["aggregates"] == ROWS
    assert k8s["lake_aggregates_rows"] == {
        f"{row['lake_path'].removeprefix(k8s['lake_root'] + '/')}/aggregates.parquet": ROWS
    }
    assert k8s["staging_left"] == []


def test_k8s_agents_stop_cleanly_on_sigterm(found: dict[str, Any]) -> None:
    assert found["guest"]["k8s"]["stopped_by"] == "host"
    assert found["guest"]["k8s"]["exit"] == {"0": 0, "1": 0}


@pytest.mark.parametrize("node", NODES)
def test_k8s_agent_staged_onto_its_bound_guest_node(k8s: dict[str, Any], node: int) -> None:
    bound = agent_args(k8s["manifest"][str(node)]).membind
    p = k8s["ledger"]["placement"][str(node)]
    assert (p["node"], p["method"]) == (bound, "move_pages")
    assert p["pages"] == p["local_pages"] == batch_pages(k8s)
    assert p["nodes"] == {str(bound): p["pages"]}
    assert p["fraction"] >= MIN_FRACTION


def test_the_guests_kernel_saw_both_k8s_agents_copies_on_guest_node_0(
    found: dict[str, Any], k8s: dict[str, Any]
) -> None:
    """Both DaemonSets bind to guest node 0: node 0's Shmem held both agents' copies at once,
    node 1's never held one agent's, and the purges gave everything back."""
    shmem = found["guest"]["k8s"]["shmem_kb"]
    pages_kb = batch_pages(k8s) * PAGE_KB
    rise = {n: shmem["peak"][n] - shmem["baseline"][n] for n in ("0", "1")}
    assert rise["0"] >= 2 * pages_kb - SLACK_KB, shmem
    assert rise["1"] < pages_kb // 2, shmem
    assert all(abs(shmem["last"][n] - shmem["baseline"][n]) <= SLACK_KB for n in ("0", "1")), shmem
