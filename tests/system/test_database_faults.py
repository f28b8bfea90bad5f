"""PostgreSQL going away and a second coordinator: exactly once, whatever the database does."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import asyncpg

from coordinator.daemon import embedded_pg
from coordinator.daemon.ledger import lock_key
from tests.conftest import Env, wait_until
from tests.faultlib import hooks
from tests.system.test_flow import ROWS, publish_all


def count_rows(dsn: str, schema: str) -> dict[str, tuple[int, int]]:
    async def q() -> dict[str, tuple[int, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                f'SELECT batch_id, count(*) AS n, count(DISTINCT item_id) AS d FROM "{schema}"'
                ".aggregates GROUP BY batch_id"
            )
        finally:
            await conn.close()
        return {r["batch_id"]: (r["n"], r["d"]) for r in rows}

    return asyncio.run(q())


def embedded_env(env: Env) -> None:
    env.write_config(database={"dsn": "", "schema": env.schema, "retry_max_s": 1.0})


def test_postgres_restarted_mid_flow_commits_every_batch_exactly_once(env, daemon):
    embedded_env(env)
    d = daemon().start()
    dsn = d.status()["database"]["dsn"]
    ids = [f"pgr-{i}" for i in range(6)]
    for i, b in enumerate(ids):
        publish_all(env, b, seed=100 + i)
        if i == 2:
            # An immediate shutdown aborts whatever transaction is open, like a crash.
            embedded_pg.stop(env.state, mode="immediate")
            embedded_pg.start(env.state)
    for b in ids:
        assert d.wait_state(b, {"done", "failed"}, timeout=90)["state"] == "done"
    assert count_rows(dsn, env.schema) == dict.fromkeys(ids, (ROWS, ROWS))


def test_postgres_down_for_a_while_reports_degraded_keeps_staging_then_commits(env, daemon):
    embedded_env(env)
    d = daemon().start()
    dsn = d.status()["database"]["dsn"]
    embedded_pg.stop(env.state, mode="fast")
    ids = [f"down-{i}" for i in range(3)]
    for i, b in enumerate(ids):
        publish_all(env, b, seed=200 + i)
    # The daemon says why it is degraded, and batches still move through staging and
    # cross-check from node-local memory while the database is away.
    s = wait_until(
        lambda: (s := d.status())["daemon"]["state"] == "degraded" and s,
        30,
        "status to say degraded",
    )
    assert s["database"]["connected"] is False and s["database"]["last_error"]
    wait_until(
        lambda: (
            {
                b["batch_id"]
                for b in d.status()["batches"]
                if b["state"] in ("crosschecked", "aggregating")
            }
            == set(ids)
        ),
        60,
        "batches to get past staging while the database is down",
    )
    assert not any((env.staging / b).exists() is False for b in ids)  # nothing removed yet
    time.sleep(2.0)
    embedded_pg.start(env.state)
    for b in ids:
        assert d.wait_state(b, {"done", "failed"}, timeout=90)["state"] == "done"
    assert d.status()["daemon"]["state"] == "running"
    assert count_rows(dsn, env.schema) == dict.fromkeys(ids, (ROWS, ROWS))


def test_second_coordinator_waits_in_standby_and_takes_over_when_the_leader_stops(env, daemon):
    a = daemon().start()
    publish_all(env, "lead-1", seed=300)
    assert a.wait_state("lead-1", {"done", "failed"})["state"] == "done"
    # B shares database and staging but has its own runtime folder.
    import tempfile
    from pathlib import Path

    from tests.conftest import Daemon

    run_b = Path(tempfile.mkdtemp(prefix="nc-runb-", dir="/tmp"))
    env_b = Env(**{**env.__dict__, "run": run_b, "config": env.root / "etc-b" / "coordinator.toml"})
    env_b.config.parent.mkdir()
    env_b.write_config()
    b = Daemon(env_b, with_agents=True).start(wait=False)
    try:

        def standby() -> bool:
            try:
                return b.status()["daemon"]["state"] == "standby"
            except Exception:
                return False

        wait_until(standby, 30, "B to report standby")
        s = b.status()
        assert s["daemon"]["ready"] is False and s["database"]["leader"] is False
        publish_all(env, "lead-2", seed=301)
        assert a.wait_state("lead-2", {"done", "failed"})["state"] == "done"
        assert a.stop(signal.SIGTERM) == 0
        b.wait_ready(60)
        publish_all(env, "lead-3", seed=302)
        assert b.wait_state("lead-3", {"done", "failed"})["state"] == "done"
        assert count_rows(env.dsn, env.schema) == dict.fromkeys(
            ("lead-1", "lead-2", "lead-3"), (ROWS, ROWS)
        )
    finally:
        b.cleanup()


def test_losing_the_lock_connection_to_another_holder_stops_writes(env, daemon):
    # A batch is in flight (held mid-copy) when the lock is lost.
    d = daemon(extra_env=hooks(stage_pause_s=1.0)).start()
    publish_all(env, "in-flight", seed=303)
    d.wait_state("in-flight", {"staging"}, timeout=30)

    async def steal() -> asyncpg.Connection:
        conn = await asyncpg.connect(env.dsn)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"numa-coordinator-leader:{env.schema}:{socket.gethostname()}"[:63],
        )
        key = lock_key(env.schema, socket.gethostname())
        for _ in range(100):
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                return conn
            await asyncio.sleep(0.02)
        raise AssertionError("could not take the lock after terminating the leader's session")

    loop = asyncio.new_event_loop()
    try:
        thief = loop.run_until_complete(steal())
        # The daemon finds the lock held elsewhere and stops rather than write as a non-leader.
        assert d.proc is not None
        rc = d.proc.wait(30)
        assert rc == 1
        assert "another coordinator holds the leader lock" in d.log.read_text()
        # The batch in flight was not committed by the daemon that lost the lock ...
        assert "in-flight" not in count_rows(env.dsn, env.schema)
    finally:
        loop.run_until_complete(thief.close())
        loop.close()
    # ... and once the lock is free, the next leader finishes it, exactly once.
    d2 = daemon().start()
    assert d2.wait_state("in-flight", {"done", "failed"}, timeout=90)["state"] == "done"
    assert count_rows(env.dsn, env.schema) == {"in-flight": (ROWS, ROWS)}
