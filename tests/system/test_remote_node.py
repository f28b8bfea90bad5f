"""A node whose agent runs in another kernel (`[[node]] remote = true`), with its own view of the
folders (`[[node]] staging`, `lake`).

The other kernel is stood in for by a mount namespace of this one (the two-node QEMU guest in
tests/numa_vm runs the agents in a real other kernel): node 1's agent runs under `unshare -m`
with a private tmpfs at its node folder, so the coordinator cannot read a byte the agent keeps in
memory, and with staging and the lake bind-mounted under other paths while the coordinator's
paths are hidden from it, so the agent reaches them only through its own [[node]] paths. A batch
that node 1 aggregates completes only if the rows came through staging and every path on the
wire was relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.core.batch import aggregate_node
from tests.conftest import MODELS, ROOT, Daemon, Env
from tests.faultlib import FINAL, assert_exactly_once, files_under, ledger, publish_all
from tests.one_host import HOST_NODE, write_numactl

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("numactl") is None,
    reason="needs unshare (util-linux) and numactl",
)

NODES = {0: MODELS[:4], 1: MODELS[4:]}


class TwoNodeDaemon(Daemon):
    """The real daemon, through the one-host launcher (tests/one_host.py)."""

    module = "tests.one_host"


def batch_aggregated_on(node: int, prefix: str) -> str:
    """A batch id whose first aggregation goes to `node`."""
    return next(
        f"{prefix}-{i}" for i in range(1000) if aggregate_node(f"{prefix}-{i}", (0, 1), 0) == node
    )


def remote_config(env: Env, views: Path) -> None:
    """Nodes 0 and 1; node 1 remote, seeing staging and the lake under `views`."""
    write = env.write_config(nodes={0: NODES[0]}, agents={"numactl": str(write_numactl(env.root))})
    q = json.dumps
    with write.open("a") as f:
        f.write(
            "[[node]]\nid = 1\n"
            f"models = {q(NODES[1])}\n"
            "remote = true\n"
            f"staging = {q(str(views / 'staging'))}\n"
            f"lake = {q(str(views / 'lake'))}\n"
        )


def start_remote_agent(
    env: Env, views: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Node 1's agent in a mount namespace of its own: a private tmpfs at its node folder,
    staging and the lake under `views`, the coordinator's staging and lake paths hidden
    (`extra_env`: test hooks, as a Daemon's)."""
    node_dir = env.tmpfs / "node1"
    for p in (node_dir, views / "staging", views / "lake", env.staging, env.lake):
        p.mkdir(parents=True, exist_ok=True)
    script = " && ".join(
        [
            "mount --make-rprivate /",
            f"mount -t tmpfs -o size=256m nc-remote {node_dir}",
            f"mount --bind {env.staging} {views / 'staging'}",
            f"mount --bind {env.lake} {views / 'lake'}",
            f"mount -t tmpfs -o size=1m,mode=0500 hidden {env.staging}",
            f"mount -t tmpfs -o size=1m,mode=0500 hidden {env.lake}",
            # The real agent, no stand-in: node 1's agent bound to this kernel's node, as a
            # k8s DaemonSet's is to its VM's guest node 0 (--bind-node, docs/layout.md).
            f"exec numactl --membind={HOST_NODE} --cpunodebind={HOST_NODE} {sys.executable}"
            f" -m agents.agent --node 1 --bind-node {HOST_NODE} --config {env.config}",
        ]
    )
    log = (env.root / "remote-agent.log").open("ab")
    try:
        return subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, **(extra_env or {})},
        )
    finally:
        log.close()


@pytest.fixture
def remote(env: Env, tmp_path: Path) -> Iterator[tuple[TwoNodeDaemon, subprocess.Popen[bytes]]]:
    views = tmp_path / "agent-view"
    remote_config(env, views)
    d = TwoNodeDaemon(env)
    agent: subprocess.Popen[bytes] | None = None
    try:
        d.start(wait=False)
        agent = start_remote_agent(env, views)
        d.wait_ready()  # both agents connected: node 1's from its own namespace
        yield d, agent
    finally:  # the daemon and the agent go whatever failed on the way
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        d.cleanup()


def test_a_remote_node_aggregates_through_staging_and_relative_paths(
    env: Env, remote: tuple[TwoNodeDaemon, subprocess.Popen[bytes]]
) -> None:
    d, agent = remote
    bid = batch_aggregated_on(1, "remote")
    published = publish_all(env, bid, seed=1301)
    row = d.wait_state(bid, FINAL, timeout=90)
    assert row["state"] == "done", (row["error"], d.tail())
    timings = ledger(env, bid)["timings"]
    timings = json.loads(timings) if isinstance(timings, str) else timings
    assert "aggregate_node1_ms" in timings  # node 1 aggregated it
    assert_exactly_once(env, bid, published=published)
    # Node 1's copies were measured on the node its agent is bound to in its own kernel.
    placement = ledger(env, bid)["placement"]
    placement = json.loads(placement) if isinstance(placement, str) else placement
    assert placement["1"]["node"] == HOST_NODE
    assert placement["1"]["fraction"] >= 0.99, placement["1"]
    [agent1] = [a for a in d.status()["agents"] if a["node"] == 1]
    assert (agent1["policy"], agent1["mems"]) == ("bind", [HOST_NODE])
    # The agent's memory was its own: nothing of it ever showed in the coordinator's view.
    assert files_under(env.tmpfs / "node1") == []
    assert agent.poll() is None


def test_with_agents_starts_no_agent_for_a_remote_node(
    env: Env, remote: tuple[TwoNodeDaemon, subprocess.Popen[bytes]]
) -> None:
    d, _ = remote
    # supervise starts every local agent before the daemon serves status (service.run).
    lines = [json.loads(ln) for ln in d.log.read_text().splitlines() if ln.startswith("{")]
    started = [
        ln for ln in lines if ln.get("event") == "agent started" and ln.get("pid") and "cmd" in ln
    ]
    assert [s["node"] for s in started] == [0], started


def _agent(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """The real staging-agent under numactl bound to this host's node, refused at start."""
    return subprocess.run(
        [
            *("numactl", f"--membind={HOST_NODE}", f"--cpunodebind={HOST_NODE}"),
            *(sys.executable, "-m", "agents.agent", "--config", str(env.config), *args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_bind_node_is_refused_where_it_cannot_hold(env: Env, tmp_path: Path) -> None:
    remote_config(env, tmp_path / "agent-view")
    # node 1 bound to node 0 without saying so: its binding check expects node 1
    proc = _agent(env, "--node", "1")
    assert proc.returncode == 3, proc.stderr
    assert "expected bind to node 1" in proc.stderr
    # a local node's agent runs in the coordinator's kernel: no other node to bind
    proc = _agent(env, "--node", "0", "--bind-node", "1")
    assert proc.returncode == 3, proc.stderr
    assert "--bind-node 1 differs from --node 0, but node 0 is not remote = true" in proc.stderr
    # bound to one node, claiming another in its own kernel
    proc = _agent(env, "--node", "1", "--bind-node", "1")
    assert proc.returncode == 3, proc.stderr
    assert "expected bind to node 1" in proc.stderr
    proc = _agent(env, "--node", "1", "--bind-node", "-1")
    assert proc.returncode == 2
    assert "--bind-node: -1 is not a NUMA node number" in proc.stderr
