"""The real coordinatord with two `[[node]]`s (issue 18, item 4): each model is cross-checked
exactly once, by its own node's agent, and an aggregation that fails on one node moves to the
other.

This host may have one NUMA node: both agents are then bound (with real numactl) to node 0,
through the launcher in tests/one_host.py, which relaxes only the two hardware checks (the
daemon's "is every configured node online" and the agent's "am I bound to my node"); the
per-node logic under test is the daemon's and the agents' own. Evidence comes from three
independent places: the cross-check function's own record (which agent process, as which
node, checked which model), the ledger's per-node timings, and the node-local folders.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import MODELS, Daemon, Env, wait_until
from tests.faultlib import FINAL, assert_exactly_once, hooks, ledger, publish_all
from tests.one_host import RECORD_ENV, write_numactl

NODES = {0: MODELS[:4], 1: MODELS[4:]}  # slm-1..4 on node 0, slm-5..7 on node 1
OWNER = {m: n for n, models in NODES.items() for m in models}


class TwoNodeDaemon(Daemon):
    """The real daemon, started through the one-host launcher (tests/one_host.py)."""

    module = "tests.one_host"


@pytest.fixture
def two_nodes(env: Env) -> Iterator[Callable[..., Daemon]]:
    """Factory for a real daemon whose config has nodes 0 and 1, each with its own models."""
    numactl = write_numactl(env.root)
    env.write_config(
        nodes=NODES,
        agents={"numactl": str(numactl)},
        crosscheck={"function": "tests.one_host:recording_crosscheck"},
    )
    made: list[Daemon] = []

    def make(extra_env: dict[str, str] | None = None) -> Daemon:
        record = {RECORD_ENV: str(env.root / "crosschecks.jsonl")}
        d = TwoNodeDaemon(env, extra_env={**record, **(extra_env or {})})
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


def agent_pids(d: Daemon) -> dict[int, int]:
    agents = d.status()["agents"]
    assert [a["node"] for a in agents] == [0, 1], agents
    return {a["node"]: a["pid"] for a in agents}


def crosscheck_records(env: Env) -> list[dict[str, Any]]:
    path = env.root / "crosschecks.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def first_aggregator(batch_id: str) -> int:
    """The node that aggregates a batch first, worked out here: crc32 of the id over [0, 1]."""
    return (0, 1)[zlib.crc32(batch_id.encode()) % 2]


def timings(env: Env, batch_id: str) -> dict[str, float]:
    row = ledger(env, batch_id)
    assert row is not None
    t = row["timings"]
    return json.loads(t) if isinstance(t, str) else t


def assert_no_node_copies(env: Env, batch_id: str) -> None:
    for n in NODES:
        wait_until(
            lambda n=n: not (env.tmpfs / f"node{n}" / batch_id).exists(),
            15,
            f"node {n}'s copies of {batch_id} to be purged",
        )


def assert_each_model_cross_checked_once_on_its_node(env: Env, pids: dict[int, int]) -> None:
    records = crosscheck_records(env)
    counts = Counter(r["model"] for r in records)
    assert counts == Counter(MODELS), f"cross-checks per model: {dict(counts)}"
    for r in records:
        owner = OWNER[r["model"]]
        assert r["node"] == owner, (
            f"{r['model']} (node {owner}'s) cross-checked by node {r['node']}"
        )
        assert r["pid"] == pids[owner], f"{r['model']} cross-checked by pid {r['pid']}, not {pids}"


def test_each_model_is_cross_checked_exactly_once_by_its_own_nodes_agent(env, two_nodes) -> None:
    d = two_nodes().start()
    pids = agent_pids(d)
    assert pids[0] != pids[1]
    pub = publish_all(env, "two-nodes", seed=1841)
    assert d.wait_state("two-nodes", FINAL, timeout=90)["state"] == "done", d.tail()
    assert_each_model_cross_checked_once_on_its_node(env, pids)

    t = timings(env, "two-nodes")
    for n in NODES:  # both nodes staged the batch and cross-checked their share
        assert f"staging_node{n}_ms" in t and f"crosscheck_node{n}_ms" in t, t
    agg = first_aggregator("two-nodes")
    other = 1 - agg
    assert f"aggregate_node{agg}_ms" in t and f"archive_node{agg}_ms" in t, t
    assert f"aggregate_node{other}_ms" not in t and f"archive_node{other}_ms" not in t, t
    row = ledger(env, "two-nodes")
    assert row is not None
    staged = json.loads(row["staged_bytes"])
    assert set(staged) == {"0", "1"} and staged["0"] == staged["1"] > 0
    assert_no_node_copies(env, "two-nodes")
    assert_exactly_once(env, "two-nodes", published=pub)


@pytest.mark.parametrize("batch_id", ["agg-move-a", "agg-move-d"])
def test_an_aggregation_that_fails_on_one_node_moves_to_the_other(
    env, two_nodes, batch_id: str
) -> None:
    """The aggregating agent is killed while its aggregate is written but unanswered (a delay
    hook holds the reply): the retry must ask the other node, whose files are committed and
    archived. Two batch ids, so that each node is the first aggregator once."""
    d = two_nodes(extra_env=hooks(aggregate_pause_s=1.0)).start()
    pids = agent_pids(d)
    first = first_aggregator(batch_id)
    other = 1 - first
    pub = publish_all(env, batch_id, seed=1842)
    local = env.tmpfs / f"node{first}" / batch_id
    wait_until(lambda: (local / "aggregates.parquet").exists(), 60, "the first aggregate's files")
    os.kill(pids[first], signal.SIGKILL)
    assert d.wait_state(batch_id, FINAL, timeout=90)["state"] == "done", d.tail()

    t = timings(env, batch_id)
    assert f"aggregate_node{other}_ms" in t, f"not aggregated on node {other}: {t}"
    assert f"aggregate_node{first}_ms" not in t, t
    assert f"archive_node{other}_ms" in t and f"archive_node{first}_ms" not in t, t
    log = d.log.read_text().splitlines()
    retried = [ln for ln in log if "step failed, retrying" in ln and '"step": "aggregate"' in ln]
    assert retried and f"agent on node {first} disconnected" in retried[0], retried
    committed = [json.loads(ln) for ln in log if '"event": "batch committed"' in ln]
    assert [c["aggregated_on"] for c in committed] == [other], committed
    # The cross-checks were not redone: still one per model, each on its own node.
    assert_each_model_cross_checked_once_on_its_node(env, pids)
    assert_no_node_copies(env, batch_id)
    assert_exactly_once(env, batch_id, published=pub)


def test_the_batch_ids_used_here_put_the_first_aggregation_on_each_node() -> None:
    assert {first_aggregator(b) for b in ("agg-move-a", "agg-move-d")} == {0, 1}
