"""The whole flow against the real thing: coordinatord, agents under numactl, watchfiles on real
folders, PostgreSQL. Each test publishes with the SDK, as an SLM would."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from agents import slm
from tests.conftest import MODELS, ROOT, Env, wait_until
from tests.faultlib import looked_again

ROWS = 300


def tables(seed: int, rows: int = ROWS) -> dict[str, pa.Table]:
    from coordinator.ctl.demo import synthetic_batch

    return synthetic_batch(rows, seed)[1]


def publish_all(env: Env, batch_id: str, seed: int, models: list[str] = MODELS) -> None:
    t = tables(seed)
    order = list(models)
    random.Random(seed).shuffle(order)
    for m in order:
        slm.publish(env.staging, batch_id, m, t[m])


def db_rows(env: Env, sql: str, *args: object) -> list[dict[str, object]]:
    async def q() -> list[dict[str, object]]:
        conn = await env.db()
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(q())


def test_batch_completes_with_rows_in_postgres_and_files_in_lake(env, daemon):
    d = daemon().start()
    publish_all(env, "b-001", seed=1)
    row = d.wait_state("b-001", {"done", "failed", "degraded"})
    assert row["state"] == "done", row["error"]
    assert row["rows"] == ROWS
    n = db_rows(
        env,
        f'SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM "{env.schema}".aggregates'
        " WHERE batch_id = $1",
        "b-001",
    )[0]
    assert n == {"n": ROWS, "d": ROWS}
    pairs = db_rows(
        env, f'SELECT * FROM "{env.schema}".model_agreement WHERE batch_id = $1', "b-001"
    )
    assert len(pairs) == 21  # 7 choose 2
    lake = Path(row["lake_path"])
    names = sorted(p.name for p in lake.iterdir())
    assert names == sorted(
        [f"{m}.parquet" for m in MODELS]
        + [f"crosscheck_{m}.parquet" for m in MODELS]
        + ["aggregates.parquet"]
    )
    agg = pq.read_table(lake / "aggregates.parquet")
    assert agg.num_rows == ROWS
    # Staging and node-local copies are gone only after the lake and the database have it.
    assert not (env.staging / "b-001").exists()
    assert not (env.tmpfs / "node0" / "b-001").exists()
    assert set(row["timings"]) >= {
        "barrier_wait_ms",
        "staging_ms",
        "crosscheck_ms",
        "aggregate_ms",
        "commit_ms",
        "archive_ms",
    }
    assert row["staged_bytes"]["0"] == sum((lake / f"{m}.parquet").stat().st_size for m in MODELS)


def test_batch_with_a_missing_model_waits_then_fires_when_it_arrives(env, daemon):
    d = daemon().start()
    t = tables(2)
    for m in MODELS[:-1]:
        slm.publish(env.staging, "b-miss", m, t[m])
    wait_until(
        lambda: any(b["batch_id"] == "b-miss" for b in d.status()["batches"]),
        20,
        "the batch to be seen",
    )
    # The daemon looks at the folder again (reconciliation, every 1 s): it must not fire
    # without slm-7.
    looked_again(d, "b-miss", times=3)
    status = d.status()
    [b] = [b for b in status["batches"] if b["batch_id"] == "b-miss"]
    assert b["state"] == "waiting"
    assert b["missing"] == ["slm-7"]
    assert d.show("b-miss")["state"] == "waiting"
    slm.publish(env.staging, "b-miss", "slm-7", t["slm-7"])
    assert d.wait_state("b-miss", {"done", "failed"})["state"] == "done"


def test_files_published_before_start_and_in_any_order_are_all_found(env, daemon):
    # Two complete batches and half of a third exist before the daemon starts.
    publish_all(env, "pre-1", seed=3)
    publish_all(env, "pre-2", seed=4)
    t = tables(5)
    for m in MODELS[3:]:
        slm.publish(env.staging, "pre-3", m, t[m])
    d = daemon().start()
    for m in reversed(MODELS[:3]):
        slm.publish(env.staging, "pre-3", m, t[m])
    for b in ("pre-1", "pre-2", "pre-3"):
        assert d.wait_state(b, {"done", "failed"})["state"] == "done"
    total = db_rows(env, f'SELECT count(*) AS n FROM "{env.schema}".aggregates')[0]["n"]
    assert total == 3 * ROWS


def test_temp_files_and_unknown_names_never_count(env, daemon):
    d = daemon().start()
    t = tables(6)
    for m in MODELS[:-1]:
        slm.publish(env.staging, "b-tmp", m, t[m])
    folder = env.staging / "b-tmp"
    # The last model's file exists only under its dot-temp name, plus a stray unknown file.
    pq.write_table(t["slm-7"], folder / ".slm-7.parquet.tmp")
    (folder / "notes.txt").write_text("not a result")
    looked_again(d, "b-tmp")
    assert d.show("b-tmp")["state"] == "waiting"
    assert d.status()["watcher"]["rejected"]
    (folder / ".slm-7.parquet.tmp").rename(folder / "slm-7.parquet")
    assert d.wait_state("b-tmp", {"done", "failed"})["state"] == "done"
    lake = Path(d.show("b-tmp")["lake_path"])
    assert not (lake / "notes.txt").exists()


def test_batches_overlap(env, daemon):
    d = daemon().start()
    for i in range(4):
        publish_all(env, f"ov-{i}", seed=10 + i)
    rows = [d.wait_state(f"ov-{i}", {"done", "failed"}) for i in range(4)]
    assert [r["state"] for r in rows] == ["done"] * 4
    # At least two batches were in the pipeline at once: some batch became ready before the
    # previous one finished.
    spans = sorted((r["ready_at"], r["finished_at"]) for r in rows)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


def test_status_shows_agent_binding_and_config(env, daemon):
    d = daemon().start()
    s = d.status()
    assert s["daemon"]["state"] == "running"
    assert s["config"]["files"] == [str(env.config)]
    [a] = s["agents"]
    assert a["connected"] and a["policy"] == "bind" and a["mems"] == [0]
    assert s["database"]["leader"] is True
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "status", "--socket", str(env.socket)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "coordinatord — running" in out.stdout and "bind" in out.stdout


def test_agent_refuses_to_run_unbound(env):
    # Without numactl the memory policy is the default one: the agent must refuse (exit 3).
    r = subprocess.run(
        [sys.executable, "-m", "agents.agent", "--node", "0", "--config", str(env.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 3
    assert "expected bind to node 0" in r.stderr
    # Interleaved is not bound either.
    r = subprocess.run(
        [
            "numactl",
            "--interleave=0",
            sys.executable,
            "-m",
            "agents.agent",
            "--node",
            "0",
            "--config",
            str(env.config),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 3 and "interleave" in r.stderr
    # A node that is not in the config is refused with its name.
    r = subprocess.run(
        [
            "numactl",
            "--membind=0",
            sys.executable,
            "-m",
            "agents.agent",
            "--node",
            "5",
            "--config",
            str(env.config),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 3 and "node 5" in r.stderr


def test_bound_agent_says_hello_with_its_binding(env, daemon):
    d = daemon(with_agents=False).start()
    proc = subprocess.Popen(
        [
            "numactl",
            "--membind=0",
            "--cpunodebind=0",
            sys.executable,
            "-m",
            "agents.agent",
            "--node",
            "0",
            "--config",
            str(env.config),
        ],
        cwd=ROOT,
    )
    try:
        agent = wait_until(
            lambda: [a for a in d.status()["agents"] if a["connected"]], 60, "the agent to connect"
        )[0]
        assert agent["pid"] == proc.pid
        assert agent["policy"] == "bind" and agent["mems"] == [0]
    finally:
        proc.terminate()
        proc.wait(30)


def test_watchfiles_backend_completes_batches_including_ones_present_at_start(env, daemon):
    """barrier.backend = "watchfiles" (the user's watcher library) fires the same barrier."""
    env.write_config(barrier={"backend": "watchfiles", "reconcile_s": 30.0})
    publish_all(env, "wf-pre", seed=41)
    d = daemon().start()
    publish_all(env, "wf-live", seed=42)
    for b in ("wf-pre", "wf-live"):
        assert d.wait_state(b, {"done", "failed"})["state"] == "done"
    # With reconciliation 30 s away, the live batch was found through watchfiles' events.
    assert d.status()["watcher"]["events"] > 0
