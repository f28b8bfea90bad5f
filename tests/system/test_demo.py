"""`make demo` (`coordinatorctl demo`): its JSON contract, checked key by key against the real run
on the embedded PostgreSQL, and its exit code when a batch fails.

The demo is run as a user runs it, `coordinatorctl demo ... --json`, with `--state-dir` so the
lake and the database stay afterwards: every reported figure is then recomputed here from what
the run left (the rows in PostgreSQL, the files in the lake) with code of this file, not the
project's (the vote, Fleiss' kappa and the accuracies). The failing run uses what a user can do
to a kept state dir: a `conf.d/` drop-in beside the demo's coordinator.toml (docs/config.md),
here plugging in a cross-check function whose output cannot be aggregated."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import numpy as np
import pyarrow.parquet as pq
import pytest

from coordinator.ctl.demo import MODELS, host_nodes, render, synthetic_batch
from coordinator.daemon import embedded_pg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "numa_coordinator"
ROWS = 400
BATCHES = 2
PHASES = (
    "barrier_wait_ms",
    "staging_ms",
    "crosscheck_ms",
    "aggregate_ms",
    "commit_ms",
    "archive_ms",
    "cleanup_ms",
)
TOP_KEYS = {"batches", "nodes", "state_dir", "database", "lake", "daemon_exit", "ok"}
BATCH_KEYS = {
    "batch_id",
    "state",
    "rows",
    "rows_in_database",
    "consensus_accuracy",
    "model_accuracy",
    "fleiss_kappa",
    "timings_ms",
    "staged_bytes",
    "lake_path",
    "error",
}


def coordinatorctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as `make demo` does (from the repository root, where the
    agents import `tests.plugins`)."""
    script = Path(sys.executable).with_name("coordinatorctl")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "coordinator.ctl"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMA_COORDINATOR_TEST_HOOKS", None)  # the demo runs the production paths
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def demo_json(state: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = coordinatorctl(
        "demo", "--batches", str(BATCHES), "--rows", str(ROWS), "--state-dir", str(state),
        "--json", *extra,
    )  # fmt: skip
    assert proc.stdout.strip(), f"no JSON on stdout (exit {proc.returncode}): {proc.stderr}"
    return proc, json.loads(proc.stdout)


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return anyio.run(run)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any], Path]]:
    state = tmp_path_factory.mktemp("demo") / "state"
    proc, summary = demo_json(state)
    yield proc, summary, state
    embedded_pg.stop(state)


@pytest.fixture(scope="module")
def good_db(good: tuple[Any, dict[str, Any], Path]) -> str:
    """The run's own embedded PostgreSQL, started again on its kept state dir."""
    _, _, state = good
    dsn, _ = embedded_pg.start(state)
    return dsn


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any], Path]]:
    state = tmp_path_factory.mktemp("demo-failed") / "state"
    (state / "conf.d").mkdir(parents=True)
    (state / "conf.d" / "50-plugin.toml").write_text(
        '[crosscheck]\nfunction = "tests.plugins:crosscheck_duplicating_slm3"\n'
    )
    proc, summary = demo_json(state)
    yield proc, summary, state
    embedded_pg.stop(state)


def truth_and_tables(i: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The demo's input for its i-th batch (its generator and seed: the known truth)."""
    return synthetic_batch(ROWS, seed=1000 + i)


def lake_predictions(lake_path: str) -> dict[str, dict[str, str]]:
    """{model: {item_id: prediction}} read from the model files the run archived."""
    out = {}
    for m in MODELS:
        t = pq.read_table(Path(lake_path) / f"{m}.parquet", columns=["item_id", "prediction"])
        ids, preds = t.column("item_id").to_pylist(), t.column("prediction").to_pylist()
        out[m] = dict(zip(ids, preds, strict=True))
    return out


def fleiss_kappa(ratings: list[list[str]]) -> float:
    """Fleiss' kappa of items each rated by the same number of raters (the textbook formula)."""
    n = len(ratings[0])
    cats = sorted({c for r in ratings for c in r})
    counts = [[Counter(r)[c] for c in cats] for r in ratings]
    p_items = [(sum(x * x for x in row) - n) / (n * (n - 1)) for row in counts]
    p_bar = sum(p_items) / len(p_items)
    total = n * len(ratings)
    p_cats = [sum(row[j] for row in counts) / total for j in range(len(cats))]
    p_e = sum(p * p for p in p_cats)
    return (p_bar - p_e) / (1 - p_e)


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# -- A run where every batch is done -------------------------------------------------------------


def test_the_demo_exits_0_with_every_key_of_its_json_contract(good: Any) -> None:
    proc, s, state = good
    assert proc.returncode == 0, proc.stderr
    assert set(s) == TOP_KEYS
    assert s["ok"] is True and s["daemon_exit"] == 0
    assert s["state_dir"] == str(state.resolve())
    assert s["nodes"] == host_nodes() and s["nodes"]
    assert len(s["batches"]) == BATCHES
    for b in s["batches"]:
        assert set(b) == BATCH_KEYS, b.keys()
        assert re.fullmatch(r"demo-\d{8}T\d{6}-\d{3}", b["batch_id"]), b["batch_id"]
        assert b["state"] == "done" and b["error"] is None
        assert b["rows"] == ROWS and b["rows_in_database"] == ROWS
        assert set(b["model_accuracy"]) == set(MODELS)
        assert all(0 <= a <= 1 for a in b["model_accuracy"].values())
        assert is_num(b["consensus_accuracy"]) and 0 <= b["consensus_accuracy"] <= 1
        assert is_num(b["fleiss_kappa"]) and -1 <= b["fleiss_kappa"] <= 1
    assert [b["batch_id"][-3:] for b in s["batches"]] == [f"{i:03d}" for i in range(BATCHES)]
    assert set(s["database"]) == {"dsn", "schema", "embedded", "rows_total"}
    assert s["database"]["schema"] == SCHEMA and s["database"]["embedded"] is True
    assert s["database"]["rows_total"] == BATCHES * ROWS
    assert f"host={state.resolve()}/pgdata" in s["database"]["dsn"]
    assert set(s["lake"]) == {"root", "files"}


def test_every_row_is_in_postgresql_and_the_ledger_says_done(good: Any, good_db: str) -> None:
    _, s, _ = good
    ids = [b["batch_id"] for b in s["batches"]]
    counts = query(
        good_db,
        f"SELECT batch_id, count(*) AS n FROM {SCHEMA}.aggregates WHERE batch_id = ANY($1) "
        "GROUP BY batch_id",
        ids,
    )
    assert {r["batch_id"]: r["n"] for r in counts} == dict.fromkeys(ids, ROWS)
    ledger = query(
        good_db, f"SELECT batch_id, state, rows, lake_path FROM {SCHEMA}.batches ORDER BY batch_id"
    )
    assert [(r["batch_id"], r["state"], r["rows"]) for r in ledger] == [
        (i, "done", ROWS) for i in ids
    ]
    assert [r["lake_path"] for r in ledger] == [b["lake_path"] for b in s["batches"]]


def test_the_reported_accuracies_and_kappa_are_those_of_the_rows_left_behind(
    good: Any, good_db: str
) -> None:
    """Recomputed here: the consensus in PostgreSQL against the known truth, each model's
    archived predictions against it, and Fleiss' kappa over the archived predictions. The
    consensus is the plurality of the seven models wherever one label has the most votes."""
    _, s, _ = good
    for i, b in enumerate(s["batches"]):
        truth, tables = truth_and_tables(i)
        items = tables[MODELS[0]].column("item_id").to_pylist()
        preds = lake_predictions(b["lake_path"])
        assert all(set(p) == set(items) for p in preds.values()), "not the demo's items"
        rows = query(
            good_db,
            f"SELECT item_id, consensus, votes, n_models FROM {SCHEMA}.aggregates "
            "WHERE batch_id = $1",
            b["batch_id"],
        )
        db = {r["item_id"]: r for r in rows}
        hits = sum(db[item]["consensus"] == t for item, t in zip(items, truth, strict=True))
        assert b["consensus_accuracy"] == round(hits / ROWS, 4)
        for m in MODELS:
            right = sum(preds[m][item] == t for item, t in zip(items, truth, strict=True))
            assert b["model_accuracy"][m] == round(right / ROWS, 4), m
        # The point of the ensemble: its consensus beats its best model.
        assert b["consensus_accuracy"] > max(b["model_accuracy"].values())
        plural = 0
        for item in items:
            votes = Counter(preds[m][item] for m in MODELS).most_common()
            assert db[item]["n_models"] == len(MODELS)
            if len(votes) == 1 or votes[0][1] > votes[1][1]:
                plural += 1
                assert (db[item]["consensus"], db[item]["votes"]) == votes[0], item
        assert plural > ROWS * 0.9
        ratings = [[preds[m][item] for m in MODELS] for item in items]
        assert b["fleiss_kappa"] == pytest.approx(fleiss_kappa(ratings), abs=1e-9)


def test_timings_and_staged_bytes_are_positive_per_phase_and_per_node(good: Any) -> None:
    _, s, _ = good
    for b in s["batches"]:
        t = b["timings_ms"]
        assert set(PHASES) <= set(t), set(PHASES) - set(t)
        assert all(is_num(v) and v > 0 for v in t.values()), t
        for n in s["nodes"]:
            for phase in ("staging", "crosscheck"):
                assert is_num(t.get(f"{phase}_node{n}_ms")), (phase, n, t)
        # Each node gets the whole set: the bytes of the seven files, as archived byte for byte.
        model_bytes = sum((Path(b["lake_path"]) / f"{m}.parquet").stat().st_size for m in MODELS)
        assert b["staged_bytes"] == {str(n): model_bytes for n in s["nodes"]}


def test_the_lake_holds_each_batch_whole_where_the_summary_says(good: Any, good_db: str) -> None:
    _, s, state = good
    lake = state.resolve() / "lake"
    assert s["lake"]["root"] == str(lake)
    on_disk = sorted(str(p.relative_to(lake)) for p in lake.rglob("*.parquet"))
    assert s["lake"]["files"] == on_disk
    today = dt.datetime.now(dt.UTC).date()
    expected_files = {f"{m}.parquet" for m in MODELS} | {f"crosscheck_{m}.parquet" for m in MODELS}
    for b in s["batches"]:
        folder = Path(b["lake_path"])
        date = dt.date.fromisoformat(folder.parent.name.removeprefix("date="))
        assert abs((today - date).days) <= 1  # the UTC day of first_seen (a run near midnight)
        assert folder == lake / "batches" / f"date={date}" / f"batch={b['batch_id']}"
        assert {p.name for p in folder.iterdir()} == expected_files | {"aggregates.parquet"}
        agg = pq.read_table(folder / "aggregates.parquet", columns=["item_id", "consensus"])
        rows = query(
            good_db,
            f"SELECT item_id, consensus FROM {SCHEMA}.aggregates WHERE batch_id = $1",
            b["batch_id"],
        )
        assert dict(zip(*agg.to_pydict().values(), strict=True)) == {
            r["item_id"]: r["consensus"] for r in rows
        }


def test_the_text_summary_without_a_state_dir_and_its_folders_removed() -> None:
    proc = coordinatorctl("demo", "--batches", "1", "--rows", "100")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^● demo-\S+  state=done  rows=100 \(in PostgreSQL: 100\)$", out, re.M), out
    assert re.search(r"consensus accuracy [01]\.\d{4}  \(best single model [01]\.\d{4}\)", out)
    assert all(f"{k.removesuffix('_ms')}=" in out for k in PHASES)
    assert re.search(r"staged bytes per node: (node\d+=[1-9]\d*\s*)+$", out, re.M), out
    assert "database: 100 aggregate rows in schema numa_coordinator" in out
    assert out.rstrip().endswith("result: every batch done")
    lake = re.search(r"^lake: 15 Parquet files under (\S+)$", out, re.M)
    assert lake, out
    assert not Path(lake.group(1)).parent.exists(), "the demo left its state folder behind"


# -- A run where the batches fail ----------------------------------------------------------------


def test_a_failed_batch_makes_the_demo_exit_1_with_the_reason_in_its_json(failed: Any) -> None:
    proc, s, _ = failed
    assert proc.returncode == 1, proc.stderr
    assert set(s) == TOP_KEYS and s["ok"] is False and s["daemon_exit"] == 0
    assert len(s["batches"]) == BATCHES
    for b in s["batches"]:
        assert set(b) == BATCH_KEYS
        assert b["state"] == "failed"
        assert "slm-3" in b["error"] and "duplicates" in b["error"], b["error"]
        assert b["rows"] == 0 and b["rows_in_database"] == 0
        assert b["consensus_accuracy"] is None and b["fleiss_kappa"] is None
        assert b["lake_path"] is None
        assert all(0 <= a <= 1 for a in b["model_accuracy"].values())
    assert s["database"]["rows_total"] == 0 and s["lake"]["files"] == []
    text = render(s)
    assert text.rstrip().endswith("result: NOT every batch done")
    assert text.count("no consensus in PostgreSQL") == BATCHES
    assert text.count("error: agent on node") == BATCHES


def test_the_failed_batches_are_failed_in_postgresql_with_no_row(failed: Any) -> None:
    _, s, state = failed
    dsn, _ = embedded_pg.start(state)
    ledger = query(dsn, f"SELECT batch_id, state, error FROM {SCHEMA}.batches ORDER BY batch_id")
    assert [(r["batch_id"], r["state"], r["error"]) for r in ledger] == [
        (b["batch_id"], "failed", b["error"]) for b in s["batches"]
    ]
    assert query(dsn, f"SELECT count(*) AS n FROM {SCHEMA}.aggregates")[0]["n"] == 0


def test_a_daemon_that_cannot_start_makes_the_demo_exit_1_saying_why(tmp_path: Path) -> None:
    """A drop-in the daemon refuses: exit 1, and the daemon's own error in the message (its
    log may be gone with a temporary state dir)."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-quorum.toml").write_text("[batch]\nquorum = 9\n")
    proc = coordinatorctl(
        "demo", "--batches", "1", "--rows", "10", "--state-dir", str(tmp_path), "--json"
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "coordinatord exited with 1 during start-up" in proc.stderr
    assert "batch.quorum: expected an integer in 1..7, found 9" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["--rows", "0"], ["--batches", "0"], ["--rows", "-5"]])
def test_an_empty_demo_is_refused_with_a_message(args: list[str]) -> None:
    proc = coordinatorctl("demo", *args, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "--batches and --rows must be at least 1" in proc.stderr


# -- host_nodes ----------------------------------------------------------------------------------


def _sysfs(root: Path, has_cpu: str | None, has_memory: str | None) -> str:
    node = root / "sys/devices/system/node"
    node.mkdir(parents=True)
    for name, text in (("has_cpu", has_cpu), ("has_memory", has_memory)):
        if text is not None:
            (node / name).write_text(text + "\n")
    return str(root)


@pytest.mark.parametrize(
    ("has_cpu", "has_memory", "nodes"),
    [
        ("0-1", "0-1", [0, 1]),
        ("0-3", "1,3", [1, 3]),  # a node without memory (or CPUs) gets no agent
        ("0", "1", [0]),  # nothing has both: node 0
        ("0-1", None, [0]),  # no sysfs node files: one node
    ],
)
def test_host_nodes_are_those_with_cpus_and_memory(
    tmp_path: Path, has_cpu: str, has_memory: str | None, nodes: list[int]
) -> None:
    assert host_nodes(_sysfs(tmp_path, has_cpu, has_memory)) == nodes
