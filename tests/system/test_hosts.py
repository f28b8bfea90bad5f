"""Many hosts, one PostgreSQL: real coordinators as separate processes, each with its own
`[host] id`, staging folder and agents, on one database, one schema and one lake
(docs/operations.md, "Several hosts"; docs/reliability.md, "Fencing")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from coordinator.daemon.ledger import lock_ids, lock_key
from tests.conftest import ROOT, Daemon, Env, wait_until
from tests.faultlib import (
    assert_exactly_once,
    db_rows,
    hooks,
    ledger,
    publish_all,
    quarantined,
    row_counts,
)

LEASE_S = 2.0
MakeHost = Callable[..., Env]


@pytest.fixture
def host_env(env: Env) -> Iterator[MakeHost]:
    """Envs of coordinators on other hosts (or a second one of a host): the test's database,
    schema and lake; a staging folder, tmpfs, runtime and state folder of each host's own."""
    made: list[Path] = []
    by_host: dict[str, Env] = {}

    def make(host: str, *, twin: bool = False, **sections: dict[str, Any]) -> Env:
        base = by_host.get(host)
        run = Path(tempfile.mkdtemp(prefix="nc-run-", dir="/tmp"))
        made.append(run)
        if base is None:
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
            tmpfs = Path(tempfile.mkdtemp(prefix="nc-test-", dir=shm))
            state = Path(tempfile.mkdtemp(prefix="nc-state-", dir="/tmp"))
            made.extend([tmpfs, state])
            root = env.root / host
            staging = root / "staging"
            staging.mkdir(parents=True)
        else:  # a second coordinator of the same host: its staging and tmpfs, its own sockets
            assert twin
            staging, tmpfs, state = base.staging, base.tmpfs, base.state
            root = base.root / f"twin-{run.name}"  # its own log
            root.mkdir()
        config = root / f"etc-{run.name}" / "coordinator.toml"
        config.parent.mkdir()
        e = Env(
            root=root,
            staging=staging,
            lake=env.lake,
            tmpfs=tmpfs,
            run=run,
            state=state,
            schema=env.schema,
            dsn=env.dsn,
            config=config,
        )
        e.write_config(host={"id": host, "lease_s": LEASE_S}, **sections)
        by_host.setdefault(host, e)
        return e

    yield make
    for p in made:
        shutil.rmtree(p, ignore_errors=True)


def ctl(*argv: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def leader_row(env: Env, host: str) -> dict[str, Any]:
    [row] = db_rows(env, "SELECT * FROM {s}.leaders WHERE host_id = $1", host)
    return row


def lock_pid(env: Env, host: str) -> int | None:
    classid, objid = lock_ids(lock_key(env.schema, host))
    rows = db_rows(
        env,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
        classid,
        objid,
    )
    return rows[0]["pid"] if rows else None


def terminate(env: Env, pid: int) -> None:
    async def q() -> None:
        conn = await asyncpg.connect(env.dsn)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()

    asyncio.run(q())


def standby(d: Daemon) -> bool:
    try:
        return d.status()["daemon"]["state"] == "standby"
    except Exception:
        return False


def test_three_hosts_each_do_their_own_batches_once_and_refuse_anothers_id(
    env: Env, host_env: MakeHost
) -> None:
    hosts = {h: host_env(h) for h in ("host-a", "host-b", "host-c")}
    daemons = {h: Daemon(e) for h, e in hosts.items()}
    try:
        for d in daemons.values():
            d.start(wait=False)
        for d in daemons.values():
            d.wait_ready()
        for h, d in daemons.items():
            s = d.status()
            assert s["daemon"]["host"] == h and s["database"]["leader"]
            assert s["database"]["epoch"] == 1  # each host's first leader
        published = {}
        for i, (h, e) in enumerate(hosts.items()):
            for j in range(2):
                b = f"{h}-batch-{j}"
                published[b] = (h, publish_all(e, b, seed=700 + 10 * i + j))
        for b, (h, _) in published.items():
            assert daemons[h].wait_state(b, {"done", "failed"})["state"] == "done"
        for b, (h, data) in published.items():
            assert_exactly_once(hosts[h], b, published=data)
            assert ledger(env, b)["host_id"] == h
        # Each coordinator sees only its host's batches; --host reads another's.
        for h, e in hosts.items():
            code, out, err = ctl("batches", "--socket", str(e.socket), "--json")
            assert code == 0, err
            own = sorted(r["batch_id"] for r in json.loads(out))
            assert own == [f"{h}-batch-0", f"{h}-batch-1"]
            assert daemons[h].show("host-c-batch-0" if h != "host-c" else "host-a-batch-0") is None
        code, out, err = ctl("batches", "--socket", str(hosts["host-a"].socket), "--host", "host-b")
        assert code == 0, err
        assert "host-b-batch-0" in out and "host-b-batch-1" in out and "host-a-batch" not in out
        code, out, _ = ctl("batches", "--socket", str(hosts["host-a"].socket), "--host", "nobody")
        assert code == 0 and "(no batches of host nobody)" in out
        code, out, _ = ctl("status", "--socket", str(hosts["host-b"].socket))
        assert "host: host-b" in out and "epoch 1" in out

        # A batch id host-a already used, published on host-b: refused, naming both hosts.
        before = ledger(env, "host-a-batch-0")
        reused = publish_all(hosts["host-b"], "host-a-batch-0", seed=799)
        wait_until(
            lambda: not (hosts["host-b"].staging / "host-a-batch-0").exists(),
            30,
            "host-b to quarantine the reused batch id",
        )
        moved = quarantined(hosts["host-b"], "host-a-batch-0")
        assert sorted(n.split(".parquet")[0] for n in moved) == sorted(reused)
        for _, reason in moved.values():
            assert "host-a-batch-0" in reason and "host-a" in reason and "host-b" in reason
        log = daemons["host-b"].log.read_text()
        assert "batch id taken by another host" in log
        assert ledger(env, "host-a-batch-0") == before  # the other host's row untouched
        assert row_counts(env, "host-a-batch-0") == (200, 200, 21, 21)  # nothing written twice
        assert len(db_rows(env, "SELECT * FROM {s}.batches")) == 6
    finally:
        for d in daemons.values():
            d.cleanup()


def test_a_leader_whose_lock_session_is_terminated_is_replaced_and_nothing_is_lost(
    env: Env, host_env: MakeHost
) -> None:
    a_env = host_env("host-a", twin=False)
    twin_env = host_env("host-a", twin=True)
    b_env = host_env("host-b")
    # host-a's agent holds the first batch mid-copy until the gate opens (at once afterwards).
    gate = a_env.root / "gate"
    a = Daemon(a_env, extra_env=hooks(stage_pause_s=50, stage_pause_until=str(gate))).start()
    b = Daemon(b_env).start()
    twin = Daemon(twin_env).start(wait=False)
    try:
        wait_until(lambda: standby(twin), 30, "the second coordinator of host-a to stand by")
        first = leader_row(env, "host-a")
        pid = lock_pid(env, "host-a")
        assert pid == first["holder_pid"]
        b_pid = lock_pid(env, "host-b")
        ids = [f"term-{i}" for i in range(3)]
        published = {ids[0]: publish_all(a_env, ids[0], seed=801)}
        a.wait_state(ids[0], {"staging"}, timeout=30)
        terminate(env, pid)  # the lock session of host-a's leader, mid-batch
        gate.touch()
        published[ids[1]] = publish_all(a_env, ids[1], seed=802)

        # Either the leader takes its lock again (same epoch: nobody led between) or the
        # standby takes it (a new epoch) and the old leader stops: never both.
        def settled() -> Daemon | None:
            new_pid = lock_pid(env, "host-a")
            if new_pid is None or new_pid == pid:
                return None
            for d in (a, twin):
                try:
                    s = d.status()
                except Exception:
                    continue
                if s["database"]["leader"] and s["daemon"]["ready"]:
                    return d
            return None

        leader = wait_until(settled, 60, "host-a to have a leader again")
        row = leader_row(env, "host-a")
        if leader is a:
            assert row["epoch"] == first["epoch"]
        else:
            assert row["epoch"] == first["epoch"] + 1
            assert a.proc is not None and a.proc.wait(30) == 1
        published[ids[2]] = publish_all(a_env, ids[2], seed=803)
        for b_id in ids:
            assert leader.wait_state(b_id, {"done", "failed"}, timeout=90)["state"] == "done"
            assert_exactly_once(a_env, b_id, published=published[b_id])
        assert lock_pid(env, "host-b") == b_pid  # the other host's leader never noticed
        assert leader_row(env, "host-b")["epoch"] == 1
    finally:
        for d in (twin, a, b):
            d.cleanup()


def test_a_leader_stopped_inside_its_commit_past_its_lease_is_fenced_when_it_wakes(
    env: Env, host_env: MakeHost
) -> None:
    a_env = host_env("host-a")
    twin_env = host_env("host-a", twin=True)
    a = Daemon(a_env, extra_env=hooks(commit_pause_s=4.0)).start()
    twin = Daemon(twin_env).start(wait=False)
    try:
        wait_until(lambda: standby(twin), 30, "the second coordinator of host-a to stand by")
        assert leader_row(env, "host-a")["epoch"] == 1
        published = publish_all(a_env, "fenced-1", seed=901)
        wait_until(
            lambda: "test hook: pausing at commit" in a.log.read_text(),
            60,
            "host-a's leader to be inside its commit",
        )
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)  # inside the commit's transaction, epoch checked
        try:
            # Past the lease, the standby ends the stopped leader's sessions, bumps the epoch
            # and commits the batch itself.
            twin.wait_ready(60)
            row = leader_row(env, "host-a")
            assert row["epoch"] == 2 and row["holder_pid"] == lock_pid(env, "host-a")
            assert twin.status()["database"]["epoch"] == 2
            assert twin.wait_state("fenced-1", {"done", "failed"}, 90)["state"] == "done"
            assert "leader silent past its lease" in twin.log.read_text()
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # The old leader wakes inside its commit: refused by the epoch, it steps down.
        assert a.proc.wait(30) == 1
        log = a.log.read_text()
        assert "fenced" in log and "epoch 2, ours 1" in log
        assert "batch committed" not in log
        assert_exactly_once(a_env, "fenced-1", published=published)
        assert ledger(env, "fenced-1")["host_id"] == "host-a"
        # The new leader goes on.
        more = publish_all(a_env, "fenced-2", seed=902)
        assert twin.wait_state("fenced-2", {"done", "failed"}, 60)["state"] == "done"
        assert_exactly_once(a_env, "fenced-2", published=more)
    finally:
        for d in (twin, a):
            d.cleanup()


def test_a_hostname_that_is_no_host_id_stops_the_coordinator_not_the_agent(env: Env) -> None:
    """In a UTS namespace whose hostname is "(none)" (a bare guest's): with host.id unset the
    coordinator refuses to start, naming host.id; the agent, which needs no host id, reads the
    same file and gets as far as its own checks."""
    py = sys.executable
    cfg = str(env.config)

    def in_uts(*cmd: str) -> subprocess.CompletedProcess[str]:
        # (the hostname tool refuses such a name; the kernel takes it)
        code = (
            'import os, socket, sys; socket.sethostname("(none)"); '
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        return subprocess.run(
            ["unshare", "-u", py, "-c", code, *cmd],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )

    daemon = in_uts(py, "-m", "coordinator.daemon", "--config", cfg)
    assert daemon.returncode == 1, daemon.stderr
    assert "host.id: expected a name" in daemon.stderr and "set host.id" in daemon.stderr
    assert "found '(none)'" in daemon.stderr
    # The agent gets past the config to its binding check (not bound here: exit 3).
    agent = in_uts(py, "-m", "agents.agent", "--node", "0", "--config", cfg)
    assert "host.id" not in agent.stderr, agent.stderr
    assert agent.returncode == 3, agent.stderr


def _get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH: status and body, a 503 as well as a 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_only_the_leader_is_ready_and_the_standby_becomes_ready_when_it_takes_over(
    env: Env, host_env: MakeHost
) -> None:
    """/ready (the k8s Deployment's readinessProbe) follows leadership; /live (its
    livenessProbe) answers on both replicas."""
    ports = {"leader": _port(), "twin": _port()}
    a_env = host_env("host-a", metrics={"listen": f"127.0.0.1:{ports['leader']}"})
    twin_env = host_env("host-a", twin=True, metrics={"listen": f"127.0.0.1:{ports['twin']}"})
    a = Daemon(a_env).start()
    twin = Daemon(twin_env).start(wait=False)
    try:
        wait_until(lambda: standby(twin), 30, "the second coordinator of host-a to stand by")
        assert _get(ports["leader"], "/ready") == (
            200,
            "ready: running, the leader of host 'host-a', serving agents\n",
        )
        assert _get(ports["twin"], "/ready") == (
            503,
            "not ready: standby: another coordinator holds the leader lock of host 'host-a'; "
            "this one waits\n",
        )
        assert _get(ports["leader"], "/live") == (200, "alive: running\n")
        assert _get(ports["twin"], "/live") == (200, "alive: standby\n")
        assert a.stop() == 0  # the leader goes; the standby takes the lock
        wait_until(
            lambda: _get(ports["twin"], "/ready")[0] == 200, 60, "the standby to become ready"
        )
        assert _get(ports["twin"], "/ready")[1].startswith("ready: running, the leader of")
        assert twin.status()["database"]["leader"] is True
    finally:
        for d in (twin, a):
            d.cleanup()
