"""The soak of several hosts: three coordinators, each with its own `[host] id`, staging folder
and agents (host-a with a second coordinator in standby), on one PostgreSQL schema and one
lake. A chaos loop, in random order and at random moments, `kill -9`s a coordinator, `kill -9`s
an agent, restarts PostgreSQL, terminates a leader's lock session, and SIGSTOPs host-a's leader
past its lease (its standby takes over) before SIGCONT wakes it fenced. A coordinator that
exits is started again, as systemd would. At the end every batch must be done exactly once, by
its own host: nothing lost, nothing duplicated, nothing left behind.

`make test` runs SOAK_HOSTS_BATCHES=30 (the default); `make soak HOSTS_N=300` runs it longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agents import slm
from coordinator.core.errors import ControlError
from coordinator.ctl.client import call
from coordinator.daemon import embedded_pg
from coordinator.daemon.ledger import lock_ids, lock_key
from tests.conftest import MODELS, Daemon, Env, wait_until
from tests.soak.test_soak import batches_for, iceberg_mismatches
from tests.system.test_flow import tables

BATCHES = int(os.environ.get("SOAK_HOSTS_BATCHES", "30"))
ROWS = 120
HOSTS = ("host-a", "host-b", "host-c")
LEASE_S = 2.0
CHAOS = ["daemon_kill9", "agent_kill9", "postgres_restart", "lock_terminate", "leader_sigstop"]


@pytest.fixture
def shared_pg() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL of this soak's own (it is restarted by the chaos): (DSN, state folder)."""
    state = Path(tempfile.mkdtemp(prefix="nc-soakpg-", dir="/tmp"))
    state.chmod(0o755)
    dsn, _ = embedded_pg.start(state)
    try:
        yield dsn, state
    finally:
        embedded_pg.stop(state, mode="immediate")
        shutil.rmtree(state, ignore_errors=True)


def host_envs(
    env: Env, dsn: str, lake_format: str = "parquet"
) -> tuple[dict[str, Env], Env, list[Path]]:
    """One Env per host (its staging, tmpfs, runtime folder) and host-a's second coordinator."""
    made: list[Path] = []
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())

    def one(host: str, root: Path, staging: Path, tmpfs: Path) -> Env:
        run = Path(tempfile.mkdtemp(prefix="nc-run-", dir="/tmp"))
        made.append(run)
        root.mkdir(parents=True, exist_ok=True)
        e = Env(
            root=root,
            staging=staging,
            lake=env.lake,
            tmpfs=tmpfs,
            run=run,
            state=env.state,
            schema=env.schema,
            dsn=dsn,
            config=root / "etc" / "coordinator.toml",
        )
        e.config.parent.mkdir()
        e.write_config(
            host={"id": host, "lease_s": LEASE_S},
            database={"dsn": dsn, "schema": env.schema, "retry_max_s": 1.0},
            barrier={"reconcile_s": 1.0, "settle_s": 5.0},
            lake={"format": lake_format},
        )
        return e

    envs = {}
    for h in HOSTS:
        tmpfs = Path(tempfile.mkdtemp(prefix="nc-test-", dir=shm))
        made.append(tmpfs)
        staging = env.root / h / "staging"
        staging.mkdir(parents=True)
        envs[h] = one(h, env.root / h, staging, tmpfs)
    a = envs["host-a"]
    twin = one("host-a", env.root / "host-a-twin", a.staging, a.tmpfs)
    return envs, twin, made


def status(d: Daemon) -> dict[str, Any] | None:
    try:
        return call(d.env.socket, "status", timeout=2)  # type: ignore[no-any-return]
    except ControlError:
        return None


def leader_of(daemons: list[Daemon]) -> Daemon | None:
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        s = status(d)
        if s and s["database"]["leader"] and s["daemon"]["ready"]:
            return d
    return None


def db(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def q() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(q())


@pytest.mark.parametrize("lake_format", ["parquet", "iceberg"])
def test_soak_of_three_hosts_under_chaos_loses_nothing_and_duplicates_nothing(
    env: Env, shared_pg: tuple[str, Path], lake_format: str
) -> None:
    dsn, pg_state = shared_pg
    s = f'"{env.schema}"'
    envs, twin_env, made = host_envs(env, dsn, lake_format)
    daemons: dict[str, list[Daemon]] = {h: [Daemon(e)] for h, e in envs.items()}
    daemons["host-a"].append(Daemon(twin_env))
    everyone = [d for ds in daemons.values() for d in ds]
    rng = random.Random(int(os.environ.get("SOAK_SEED", "11")))
    per_host = batches_for(lake_format, BATCHES) // len(HOSTS)
    ids = {h: [f"soak-{h}-{i:05d}" for i in range(per_host)] for h in HOSTS}
    done_publishing = threading.Event()
    chaos_log = dict.fromkeys(CHAOS, 0)
    try:
        for ds in daemons.values():
            ds[0].start()
        daemons["host-a"][1].start(wait=False)  # the standby of host-a

        def producer() -> None:
            for i in range(per_host):
                for k, h in enumerate(HOSTS):
                    t = tables(6000 + 10 * i + k, ROWS)
                    order = list(MODELS)
                    rng_p = random.Random(10 * i + k)
                    rng_p.shuffle(order)
                    for m in order:
                        slm.publish(envs[h].staging, ids[h][i], m, t[m])
                time.sleep(random.Random(i).uniform(0.3, 1.0))
            done_publishing.set()

        def restart_exited() -> None:
            # systemd's Restart=: a coordinator that exited (killed, fenced) starts again.
            for d in everyone:
                if d.proc is not None and d.proc.poll() is not None:
                    d.start(wait=False)

        pub = threading.Thread(target=producer)
        pub.start()
        actions: list[str] = []
        try:
            # Until everything is published and every kind of fault happened at least once.
            while not done_publishing.is_set() or min(chaos_log.values()) == 0:
                time.sleep(rng.uniform(0.5, 1.5))
                restart_exited()
                if not actions:  # every kind of fault in each round, in a random order
                    actions = list(CHAOS)
                    rng.shuffle(actions)
                action = actions.pop()
                host = rng.choice(HOSTS)
                leader = leader_of(daemons[host])
                if action == "daemon_kill9" and leader is not None:
                    leader.kill9()
                elif action == "agent_kill9" and leader is not None:
                    pid = next(iter((status(leader) or {}).get("agents") or []), {}).get("pid")
                    if not pid:
                        continue
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                elif action == "postgres_restart":
                    embedded_pg.stop(pg_state, mode="immediate")
                    time.sleep(rng.uniform(0.0, 1.0))
                    embedded_pg.start(pg_state)
                elif action == "lock_terminate":
                    classid, objid = lock_ids(lock_key(env.schema, host))
                    with contextlib.suppress(Exception):
                        db(
                            dsn,
                            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE granted"
                            " AND locktype = 'advisory' AND classid::bigint = $1"
                            " AND objid::bigint = $2 AND objsubid = 1",
                            classid,
                            objid,
                        )
                elif action == "leader_sigstop":
                    a = leader_of(daemons["host-a"])
                    if a is None or a.proc is None:
                        continue
                    os.kill(a.proc.pid, signal.SIGSTOP)
                    try:
                        # Past the lease the standby takes over (or, if it is down itself,
                        # nobody: then the stopped leader simply goes on after SIGCONT).
                        others = [d for d in daemons["host-a"] if d is not a]
                        t_end = time.monotonic() + 3 * LEASE_S + 5
                        while time.monotonic() < t_end and leader_of(others) is None:
                            time.sleep(0.2)
                    finally:
                        os.kill(a.proc.pid, signal.SIGCONT)
                else:
                    continue
                chaos_log[action] += 1
        finally:
            pub.join()

        # Calm after the storm: every batch must finish, exactly once, by its own host.
        all_ids = [b for h in HOSTS for b in ids[h]]

        def all_final() -> bool:
            restart_exited()
            try:
                rows = db(dsn, f"SELECT batch_id, state FROM {s}.batches")
            except (OSError, asyncpg.PostgresError):
                return False
            states = {r["batch_id"]: r["state"] for r in rows}
            return all(states.get(b) in ("done", "failed", "degraded") for b in all_ids)

        wait_until(all_final, 60 + per_host * len(HOSTS) * 2.0, "every soak batch to finish")
        ledger = {r["batch_id"]: r for r in db(dsn, f"SELECT * FROM {s}.batches")}
        counts = {
            r["batch_id"]: (r["n"], r["d"])
            for r in db(
                dsn,
                f"SELECT batch_id, count(*) AS n, count(DISTINCT item_id) AS d FROM {s}.aggregates"
                " GROUP BY batch_id",
            )
        }
        owner = {b: h for h in HOSTS for b in ids[h]}
        lost = [b for b in all_ids if ledger[b]["state"] != "done" or b not in counts]
        duplicated = [b for b, (n, distinct) in counts.items() if n != distinct or n != ROWS]
        wrong_host = [b for b in all_ids if ledger[b]["host_id"] != owner[b]]
        if lake_format == "iceberg":
            # One lake and one catalog for the three hosts: their commits race on the
            # tables' rows, and each loser prepares again.
            lake_bad, temp_in_lake = iceberg_mismatches(envs["host-a"], dsn, all_ids, ROWS)
        else:
            lake_files: dict[str, int] = {}
            for p in Path(env.lake).rglob("*"):
                if p.is_file():
                    batch = p.parent.name.removeprefix("batch=")
                    lake_files[batch] = lake_files.get(batch, 0) + 1
            lake_bad = [b for b in all_ids if lake_files.get(b) != 2 * len(MODELS) + 1]
            temp_in_lake = list(Path(env.lake).rglob(".*"))
        left_staging = [
            p.name for e in envs.values() for p in e.staging.iterdir() if not p.name.startswith(".")
        ]
        left_tmpfs = [p for e in envs.values() for p in e.tmpfs.rglob("*") if p.is_file()]
        epochs = {r["host_id"]: r["epoch"] for r in db(dsn, f"SELECT * FROM {s}.leaders")}
        print(
            f"\nsoak of hosts: {len(all_ids)} batches on {len(HOSTS)} hosts, "
            f"{len(all_ids) * ROWS} rows; chaos {chaos_log}; epochs {epochs}; "
            f"lost {len(lost)}, duplicated {len(duplicated)}, wrong host {len(wrong_host)}, "
            f"lake mismatches {len(lake_bad)}, left in staging {len(left_staging)}, "
            f"left in tmpfs {len(left_tmpfs)}"
        )
        assert sum(chaos_log.values()) > 0
        assert lost == [], lost
        assert duplicated == [], duplicated
        assert wrong_host == [], wrong_host
        assert lake_bad == [], lake_bad
        assert temp_in_lake == []
        assert left_staging == []
        assert left_tmpfs == []
    finally:
        for d in everyone:
            if d.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.proc.pid, signal.SIGCONT)
            d.cleanup()
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
