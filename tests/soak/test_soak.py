"""The soak: many batches through the real daemon while a chaos loop kills the daemon and its
agents at random moments and restarts PostgreSQL. At the end the database and the lake must
match what the producer published: nothing lost, nothing duplicated, nothing left behind.

`make test` runs SOAK_BATCHES=50 (the default); `make soak N=1000` runs the same code longer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

from agents import slm
from coordinator.daemon import embedded_pg
from tests.conftest import MODELS, Env, wait_until
from tests.system.test_database_faults import count_rows
from tests.system.test_flow import tables

BATCHES = int(os.environ.get("SOAK_BATCHES", "50"))
ROWS = 120


def test_soak_under_chaos_loses_nothing_and_duplicates_nothing(env: Env, daemon):
    env.write_config(
        database={"dsn": "", "schema": env.schema, "retry_max_s": 1.0},
        barrier={"reconcile_s": 1.0, "settle_s": 5.0},
    )
    d = daemon().start()
    dsn = d.status()["database"]["dsn"]
    rng = random.Random(int(os.environ.get("SOAK_SEED", "7")))
    ids = [f"soak-{i:05d}" for i in range(BATCHES)]
    done_publishing = threading.Event()
    chaos_log: dict[str, int] = {"daemon_kill9": 0, "agent_kill9": 0, "postgres_restart": 0}

    def producer() -> None:
        for i, b in enumerate(ids):
            t = tables(5000 + i, ROWS)
            order = list(MODELS)
            rng_p = random.Random(i)
            rng_p.shuffle(order)
            for m in order:
                slm.publish(env.staging, b, m, t[m])
            time.sleep(rng_p.uniform(0.05, 0.3))
        done_publishing.set()

    pub = threading.Thread(target=producer)
    pub.start()
    actions: list[str] = []
    try:
        while not done_publishing.is_set():
            time.sleep(rng.uniform(0.5, 1.5))
            if not actions:  # every kind of fault in each round, in a random order
                actions = ["daemon_kill9", "agent_kill9", "postgres_restart"]
                rng.shuffle(actions)
            action = actions.pop()
            if action == "daemon_kill9":
                d.kill9()
                d.start()
            elif action == "agent_kill9":
                try:
                    pid = d.status()["agents"][0].get("pid")
                except Exception:
                    pid = None
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
            else:
                embedded_pg.stop(env.state, mode="immediate")
                time.sleep(rng.uniform(0.0, 1.0))
                embedded_pg.start(env.state)
            chaos_log[action] += 1
    finally:
        pub.join()

    # Calm after the storm: everything published must finish, exactly once.
    def all_final() -> bool:
        states = {b: (d.show(b) or {}).get("state") for b in ids}
        return all(s in ("done", "failed", "degraded") for s in states.values())

    wait_until(all_final, 60 + BATCHES * 2.0, "every soak batch to finish")
    states = {b: d.show(b)["state"] for b in ids}
    rows = count_rows(dsn, env.schema)
    lost = [b for b in ids if states[b] != "done" or b not in rows]
    duplicated = [b for b, (n, distinct) in rows.items() if n != distinct or n != ROWS]
    lake_files: dict[str, int] = {}
    for p in Path(env.lake).rglob("*"):
        if p.is_file():
            batch = p.parent.name.removeprefix("batch=")
            lake_files[batch] = lake_files.get(batch, 0) + 1
    lake_bad = [b for b in ids if lake_files.get(b) != 2 * len(MODELS) + 1]
    temp_in_lake = list(Path(env.lake).rglob(".*"))
    left_staging = [p.name for p in env.staging.iterdir() if not p.name.startswith(".")]
    left_tmpfs = [p for p in env.tmpfs.rglob("*") if p.is_file()]
    print(
        f"\nsoak: {BATCHES} batches, {BATCHES * ROWS} rows; chaos {chaos_log}; "
        f"lost {len(lost)}, duplicated {len(duplicated)}, lake mismatches {len(lake_bad)}, "
        f"left in staging {len(left_staging)}, left in tmpfs {len(left_tmpfs)}"
    )
    assert sum(chaos_log.values()) > 0
    assert lost == [], lost
    assert duplicated == [], duplicated
    assert lake_bad == [], {b: lake_files.get(b) for b in lake_bad}
    assert temp_in_lake == []
    assert left_staging == []
    assert left_tmpfs == []
