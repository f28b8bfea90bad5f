"""Producers whose writes the daemon's kernel does not hear (staging on NFS, a VM guest's shared
folder): `barrier.backend = "notify"` (the SDK announces each publish with NOTIFY, the daemon
LISTENs) and `"poll"`, against a real daemon, its agent and PostgreSQL.

The other kernel is played by FUSE: the daemon's staging is a bindfs mount of an "export"
folder, and the producers write into the export itself. The writes reach the mount (FUSE asks
the export on every lookup) but raise no inotify event on it, as a write on an NFS server raises
none on its clients. (A bind mount, even in another mount namespace, would not do: inotify
watches the inode, and a bind mount shares it; the first test checks the premise.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg
import pytest

from agents import notifier, slm
from coordinator.core.announce import channel
from coordinator.daemon import listen as listen_module
from coordinator.daemon.listen import application_name
from coordinator.daemon.scanner import Stats
from coordinator.daemon.watch import RESCAN, Inotify
from tests.conftest import MACHINE_FACT, MODELS, Env, wait_until
from tests.faultlib import (
    FINAL,
    assert_exactly_once,
    ledger,
    ledger_ids,
    sdk_publish,
    staging_leftovers,
    tables,
)

NEVER = 3600.0  # a reconcile_s no test outlives: a batch that fires was not found by that scan


@dataclass
class Remote:
    """The producers' side of a staging folder the daemon sees through FUSE."""

    export: Path  # where producers write (the "other host")
    env: Env

    def publish_all(self, batch_id: str, seed: int, **notify: object) -> dict[str, bytes]:
        """Publish a whole synthetic batch into the export; `notify=` as publish takes it."""
        t = tables(seed)
        out = {}
        for m in MODELS:
            out[m] = sdk_publish(self.export, batch_id, m, t[m], **notify)
        return out


@pytest.fixture
def remote(env: Env) -> Iterator[Remote]:
    """env.staging becomes a bindfs (FUSE) mount of a fresh export folder, unmounted after the
    test's daemons are stopped (request this fixture before `daemon`)."""
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs not found: install the Debian package bindfs (make test does)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip(f"{MACHINE_FACT} this machine has no /dev/fuse")
    export = env.root / "export"
    export.mkdir()
    # No attribute or entry caching: every look through the mount asks the export.
    opts = "attr_timeout=0,entry_timeout=0,negative_timeout=0"
    done = subprocess.run(
        ["bindfs", "-o", opts, str(export), str(env.staging)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"{MACHINE_FACT} this user may not mount a FUSE file system: {done.stderr}")
    try:
        yield Remote(export, env)
    finally:
        notifier.close_shared()
        subprocess.run(["umount", "-l", str(env.staging)], check=False)


def watcher(d: object) -> dict:
    return d.status()["watcher"]  # type: ignore[attr-defined, no-any-return]


def listen_pid(env: Env) -> int:
    """The backend pid of the daemon's LISTEN connection, once it is there."""

    async def q() -> int | None:
        conn = await env.db()
        try:
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                application_name(env.schema),
            )
        finally:
            await conn.close()

    return int(wait_until(lambda: asyncio.run(q()), 20, "the daemon's LISTEN connection"))


def notify_raw(env: Env, *payloads: str) -> None:
    """Send payloads on the test schema's channel as any client could."""

    async def send() -> None:
        conn = await env.db()
        try:
            for p in payloads:
                await conn.execute("SELECT pg_notify($1, $2)", channel(env.schema), p)
        finally:
            await conn.close()

    asyncio.run(send())


# -- the premise ----------------------------------------------------------------------------------


def test_writes_into_the_export_raise_no_inotify_event_on_the_mount(remote: Remote) -> None:
    staging = remote.env.staging
    ino = Inotify(staging)
    try:
        ino.add_existing()
        slm.publish(remote.export, "unheard", "slm-1", tables(1)["slm-1"], notify=False)
        # The write is there through the mount ...
        assert (staging / "unheard" / "slm-1.parquet").is_file()
        # ... yet the only event that comes is the one made through the mount afterwards.
        (staging / "heard").mkdir()
        seen: set[object] = set()
        t_end = time.monotonic() + 10
        while "heard" not in seen and time.monotonic() < t_end:
            select.select([ino.fd], [], [], 0.2)
            seen |= ino.read()[0]
        assert seen == {"heard"}
    finally:
        ino.close()


# -- notify ------------------------------------------------------------------------------------


def test_announced_batches_fire_with_neither_an_event_nor_a_scan(
    remote: Remote, daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = remote.env
    env.write_config(barrier={"backend": "notify", "reconcile_s": NEVER})
    d = daemon().start()
    listen_pid(env)
    # A notifier object of the producer's own, one connection for its publishes.
    with notifier.PgNotifier(env.dsn, env.schema) as n:
        first = remote.publish_all("ann-1", seed=11, notify=n)
        assert (n.sent, n.failed) == (7, 0)
    assert d.wait_state("ann-1", FINAL)["state"] == "done"
    # The environment's notifier, as a producer configured by its deployment would use.
    monkeypatch.setenv(notifier.DSN_ENV, env.dsn)
    monkeypatch.setenv(notifier.SCHEMA_ENV, env.schema)
    second = remote.publish_all("ann-2", seed=12)
    assert d.wait_state("ann-2", FINAL)["state"] == "done"
    assert_exactly_once(env, "ann-1", published=first)
    assert_exactly_once(env, "ann-2", published=second)
    w = watcher(d)
    assert w["armed"] is True
    assert w["events"] >= 14  # the announcements
    # Neither batch waited for the reconciliation scan: none has begun.
    assert w["reconcile_scans"] == 0
    assert staging_leftovers(env) == []


def test_lost_announcements_are_found_by_the_rescan_after_the_listen_reconnects(
    remote: Remote, daemon
) -> None:
    env = remote.env
    env.write_config(barrier={"backend": "notify", "reconcile_s": NEVER})
    d = daemon().start()
    pid = listen_pid(env)
    # Published without announcements: nothing tells the daemon.
    published = remote.publish_all("lost-1", seed=21, notify=False)
    t_cut = time.time()

    async def cut() -> bool:
        conn = await env.db()
        try:
            return bool(await conn.fetchval("SELECT pg_terminate_backend($1)", pid))
        finally:
            await conn.close()

    assert asyncio.run(cut())
    assert d.wait_state("lost-1", FINAL)["state"] == "done"
    assert_exactly_once(env, "lost-1", published=published)
    # First seen after the cut: the rescan that follows the new LISTEN found it.
    assert ledger(env, "lost-1")["first_seen"].timestamp() >= t_cut
    wait_until(lambda: watcher(d)["armed"], 20, "the LISTEN to be back")
    w = watcher(d)
    assert w["watcher_restarts"] == 1
    assert w["reconcile_scans"] == 0
    assert listen_pid(env) != pid
    # And it hears announcements again.
    again = remote.publish_all("lost-2", seed=22, notify=_notifier(env))
    assert d.wait_state("lost-2", FINAL)["state"] == "done"
    assert_exactly_once(env, "lost-2", published=again)


def _notifier(env: Env) -> notifier.PgNotifier:
    return notifier.shared(env.dsn, env.schema)


def test_unannounced_batches_still_fire_at_the_reconciliation_scan(remote: Remote, daemon) -> None:
    env = remote.env
    env.write_config(barrier={"backend": "notify", "reconcile_s": 0.5})
    d = daemon().start()
    published = remote.publish_all("quiet-1", seed=31, notify=False)
    assert d.wait_state("quiet-1", FINAL)["state"] == "done"
    assert_exactly_once(env, "quiet-1", published=published)
    assert "barrier completed by reconciliation" in d.log.read_text()
    assert watcher(d)["events"] == 0


def test_bad_announcements_cost_a_look_and_nothing_else(remote: Remote, daemon) -> None:
    env = remote.env
    env.write_config(barrier={"backend": "notify", "reconcile_s": NEVER})
    d = daemon().start()
    listen_pid(env)
    t = tables(41)
    published = {}
    for m in MODELS[:6]:
        published[m] = sdk_publish(remote.export, "half", m, t[m], notify=False)
    bad = [
        "garbage",  # not batch/model/size
        "../slm-1/10",  # not a batch name
        ".quarantine/slm-1/10",  # nor this
        "half/slm-1/x",  # not a size
    ]
    harmless = [
        "nowhere/slm-1/10",  # a batch that is not there
        "half/not-a-model/10",  # a model that is not configured
        f"half/{MODELS[6]}/99999999",  # a model that is not there yet, and a size that lies
    ]
    notify_raw(env, *bad, *harmless)
    wait_until(lambda: watcher(d)["events"] >= len(bad) + len(harmless), 20, "every notification")
    # The scan decided: the batch is seen, with the model that is missing still missing.
    b = wait_until(
        lambda: next((b for b in d.status()["batches"] if b["batch_id"] == "half"), None),
        20,
        "the batch to be seen",
    )
    assert b["state"] == "waiting" and b["missing"] == [MODELS[6]]
    published[MODELS[6]] = sdk_publish(
        remote.export, "half", MODELS[6], t[MODELS[6]], notify=_notifier(env)
    )
    assert d.wait_state("half", FINAL)["state"] == "done"
    assert_exactly_once(env, "half", published=published)
    assert ledger_ids(env) == {"half"}
    assert not (env.staging / ".quarantine").exists()
    log = d.log.read_text()
    assert log.count("ignored an announcement") == len(bad)
    assert d.proc.poll() is None


# -- poll ---------------------------------------------------------------------------------------


def test_the_poll_backend_fires_batches_without_events_or_reconciliation(
    remote: Remote, daemon
) -> None:
    env = remote.env
    env.write_config(barrier={"backend": "poll", "poll_s": 0.2, "reconcile_s": NEVER})
    d = daemon().start()
    published = remote.publish_all("poll-1", seed=51, notify=False)
    assert d.wait_state("poll-1", FINAL)["state"] == "done"
    assert_exactly_once(env, "poll-1", published=published)
    w = watcher(d)
    assert (w["events"], w["reconcile_scans"]) == (0, 0)
    assert "barrier completed by reconciliation" not in d.log.read_text()


# -- the SDK's notifier against the real server ---------------------------------------------------


def test_the_notifier_sends_the_payload_and_redials_a_connection_the_server_ended(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    heard: list[tuple[str, str]] = []

    async def run() -> None:
        listener = await asyncpg.connect(pg_dsn)
        await listener.add_listener(channel(schema), lambda *a: heard.append((a[2], a[3])))
        admin = await asyncpg.connect(pg_dsn)
        n = notifier.PgNotifier(pg_dsn, schema)
        try:
            t = tables(61)
            p1 = await asyncio.to_thread(slm.publish, tmp_path, "b1", "slm-1", t["slm-1"], notify=n)
            # The server ends the notifier's idle connection; the next publish dials anew.
            pids = await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                f"numa-coordinator-publish:{schema}",
            )
            assert len(pids) == 1
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
            p2 = await asyncio.to_thread(slm.publish, tmp_path, "b1", "slm-2", t["slm-2"], notify=n)
            for _ in range(200):
                if len(heard) == 2:
                    break
                await asyncio.sleep(0.05)
            assert heard == [
                (channel(schema), f"b1/slm-1/{p1.stat().st_size}"),
                (channel(schema), f"b1/slm-2/{p2.stat().st_size}"),
            ]
            assert (n.sent, n.failed) == (2, 0)
        finally:
            n.close()
            await listener.close()
            await admin.close()

    asyncio.run(run())


class FreezingProxy:
    """A Unix-socket proxy in front of PostgreSQL whose `freeze()` makes every connection open
    then go silent (what it is sent is swallowed, nothing comes back, nothing is closed), as a
    link that died without a word; connections made after it pass as before."""

    def __init__(self, dsn: str, folder: Path) -> None:
        u = urllib.parse.urlsplit(dsn)
        q = urllib.parse.parse_qs(u.query)
        host = q.get("host", [u.hostname or ""])[0]
        port = int(q.get("port", [u.port or 5432])[0])
        self.target: tuple[str, int] = (host, port)
        self.folder = folder
        self.generation = 0
        user = urllib.parse.quote(u.username or "")
        pw = f":{urllib.parse.quote(u.password)}" if u.password else ""
        self.dsn = f"postgresql://{user}{pw}@/{u.path.lstrip('/')}?host={folder}&port=5432"
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(
            self._handle, str(self.folder / ".s.PGSQL.5432")
        )

    def freeze(self) -> None:
        self.generation += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        gen = self.generation
        host, port = self.target
        self.writers.append(writer)
        if host.startswith("/"):
            up_r, up_w = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_r, up_w = await asyncio.open_connection(host, port)
        self.writers.append(up_w)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                if self.generation == gen:
                    w.write(data)
                    await w.drain()
            w.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def close(self) -> None:
        """Stop listening and close every connection, frozen ones included."""
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()


def test_the_notifier_redials_once_when_its_connection_goes_silent(
    pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    heard: list[str] = []
    sock = Path(tempfile.mkdtemp(prefix="nc-proxy-", dir="/tmp"))

    async def run() -> None:
        proxy = FreezingProxy(pg_dsn, sock)
        await proxy.start()
        listener = await asyncpg.connect(pg_dsn)
        await listener.add_listener(channel(schema), lambda *a: heard.append(a[3]))
        n = notifier.PgNotifier(proxy.dsn, schema, timeout_s=0.5, retry_after_s=3600)
        try:
            t = tables(71)
            await asyncio.to_thread(slm.publish, tmp_path, "b1", "slm-1", t["slm-1"], notify=n)
            proxy.freeze()  # the notifier's connection still looks open, and is dead
            await asyncio.to_thread(slm.publish, tmp_path, "b1", "slm-2", t["slm-2"], notify=n)
            for _ in range(200):
                if len(heard) == 2:
                    break
                await asyncio.sleep(0.05)
            assert [h.rsplit("/", 1)[0] for h in heard] == ["b1/slm-1", "b1/slm-2"]
            assert (n.sent, n.failed) == (2, 0)
        finally:
            await asyncio.to_thread(n.close)
            await listener.close()
            await proxy.close()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(sock, ignore_errors=True)


async def until(pred: Callable[[], object], what: str) -> None:
    """Poll `pred` on the loop for up to 10 s; fail naming `what`."""
    t_end = time.monotonic() + 10.0
    while not pred():
        if time.monotonic() > t_end:
            pytest.fail(f"timed out after 10 s waiting for {what}")
        await asyncio.sleep(0.02)


def test_the_listen_retries_until_the_database_answers_and_redials_a_silent_connection(
    pg_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listen_module, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(listen_module, "KEEPALIVE_TIMEOUT_S", 0.5)
    sock = Path(tempfile.mkdtemp(prefix="nc-proxy-", dir="/tmp"))
    marks: list[set[object]] = []
    stats = Stats()

    async def run() -> None:
        proxy = FreezingProxy(pg_dsn, sock)  # not started yet: no database behind its DSN
        async with anyio.create_task_group() as tg:
            await tg.start(
                functools.partial(listen_module.listen, retry_max_s=0.4),
                proxy.dsn,
                None,
                schema,
                marks.append,
                stats,
            )
            # Started all the same (the daemon's first scan goes on), and not armed.
            assert stats.armed is False and marks == []
            await proxy.start()
            await until(lambda: stats.armed, "the LISTEN once the database answers")
            # What was announced before it listened is lost: it asks for a rescan.
            assert marks == [{RESCAN}] and stats.watcher_restarts == 1
            proxy.freeze()  # the connection looks open and is dead: the keep-alive finds out
            await until(lambda: stats.watcher_restarts == 2, "the LISTEN to be made again")
            await until(lambda: stats.armed, "the LISTEN to be armed again")
            assert marks == [{RESCAN}, {RESCAN}]
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute("SELECT pg_notify($1, $2)", channel(schema), "b7/slm-1/5")
            finally:
                await conn.close()
            await until(lambda: len(marks) == 3, "the announcement")
            assert marks[2] == {"b7"} and stats.events == 1
            tg.cancel_scope.cancel()
        await proxy.close()
        await asyncio.sleep(0)  # the transports' own close runs on the next turn

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(sock, ignore_errors=True)
