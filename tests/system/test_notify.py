"""systemd's notify protocol, as a real coordinatord speaks it to a datagram socket that stands in
for systemd: READY=1 only when it can serve, STATUS= lines, RELOADING=1 + MONOTONIC_USEC then
READY=1 around a reload, WATCHDOG=1 from the event loop, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.ctl.client import call
from coordinator.daemon import notify
from tests.conftest import ROOT, wait_until


class FakeSystemd:
    """A datagram socket that records every notify message with the time it arrived."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nc-notify-", dir="/tmp"))
        self.path = self.dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()

    def since(self, t: float) -> list[tuple[float, list[str]]]:
        return [(at, lines) for at, lines in list(self.messages) if at >= t]

    def wait_for(self, line: str, after: float = 0.0, timeout: float = 60.0) -> float:
        """Wait for a message holding `line` (or starting with it); return when it came."""

        def seen() -> float | None:
            for at, lines in self.since(after):
                if any(x == line or x.startswith(line) for x in lines):
                    return at
            return None

        return float(wait_until(seen, timeout, f"notify message {line!r}"))

    def pings(self) -> list[float]:
        return [at for at, lines in list(self.messages) if "WATCHDOG=1" in lines]


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    s = FakeSystemd()
    try:
        yield s
    finally:
        s.close()


def test_notify_protocol_from_ready_through_reload_watchdog_and_stop(env, daemon, systemd):
    d = daemon(
        with_agents=False,
        extra_env={
            "NOTIFY_SOCKET": str(systemd.path),
            "WATCHDOG_USEC": "200000",  # pings every 0.1 s
            "NUMA_COORDINATOR_TEST_HOOKS": '{"test": true}',
        },
    ).start(wait=False)
    ready_at = systemd.wait_for("READY=1")

    # READY=1 means it can serve: socket bound, watcher armed, database reachable, leader.
    assert call(env.socket, "ping", timeout=5) == "pong"
    s = call(env.socket, "status", timeout=5)
    assert s["daemon"]["state"] == "running"
    assert s["watcher"]["armed"] is True
    assert s["database"]["connected"] is True and s["database"]["leader"] is True
    before_ready = [x for at, lines in systemd.messages if at < ready_at for x in lines]
    assert any(x.startswith("STATUS=") for x in before_ready), before_ready
    [ready] = [lines for at, lines in systemd.messages if at == ready_at]
    assert any(x.startswith("STATUS=running") for x in ready), ready

    wait_until(lambda: len([t for t in systemd.pings() if t > ready_at]) >= 3, 30, "pings")

    # A reload: RELOADING=1 with the monotonic clock, then READY=1 again.
    t0 = time.monotonic()
    usec0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    r = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "reload", "--socket", str(env.socket)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    usec1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert r.returncode == 0, r.stderr
    reloading_at = systemd.wait_for("RELOADING=1", after=t0)
    [reloading] = [lines for at, lines in systemd.messages if at == reloading_at]
    [mono] = [x for x in reloading if x.startswith("MONOTONIC_USEC=")]
    assert usec0 <= int(mono.removeprefix("MONOTONIC_USEC=")) <= usec1
    systemd.wait_for("READY=1", after=reloading_at)

    # A blocked event loop sends no pings for as long as it is blocked.
    t_block = time.monotonic()
    assert call(env.socket, "_block_loop", seconds=3, timeout=60) == {"blocked_s": 3.0}
    t_unblock = time.monotonic()
    wait_until(lambda: any(t > t_unblock for t in systemd.pings()), 30, "pings to resume")
    window = [t for t in systemd.pings() if t_block - 1.5 <= t <= t_unblock + 5]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert max(gaps) >= 2.0, gaps  # blocked 3 s: no ping in between
    # ... while they flowed right before it (every 0.1 s; 3 in 1.5 s is generous).
    assert len([t for t in window if t < t_block]) >= 3, window

    # SIGTERM: STOPPING=1, then a clean exit.
    t_stop = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    systemd.wait_for("STOPPING=1", after=t_stop, timeout=10)


# --- notify.py alone -------------------------------------------------------------------------


def test_notify_is_a_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"nc-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1", "STATUS=x") is True
        assert s.recv(1024) == b"READY=1\nSTATUS=x"


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_named_pid(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None


# --- before READY=1 --------------------------------------------------------------------------


def unreachable_database(env) -> None:
    """Point the config at a PostgreSQL that is not there: the daemon stays 'connecting'."""
    env.write_config(
        database={
            "dsn": f"postgresql://postgres@/postgres?host={env.root}/no-such-server",
            "schema": env.schema,
        }
    )


def test_status_answers_while_the_daemon_is_still_connecting_and_it_is_not_ready(
    env, daemon, systemd
):
    unreachable_database(env)
    d = daemon(with_agents=False, extra_env={"NOTIFY_SOCKET": str(systemd.path)})
    d.start(wait=False)
    s = wait_until(
        lambda: _status_or_none(env.socket), 60, "the control socket to answer while connecting"
    )
    assert s["daemon"]["state"] == "connecting"
    assert s["daemon"]["ready"] is False
    assert s["database"]["connected"] is False
    systemd.wait_for("STATUS=database unreachable")
    assert not any("READY=1" in lines for _, lines in systemd.messages)
    d.kill9()


# SIGTERM while the daemon waits for its database (or in standby) must stop it, as systemd
# expects within TimeoutStopSec; the daemon waits on _open_database, not on its stop event.
def test_sigterm_while_connecting_stops_the_daemon(env, daemon, systemd):
    unreachable_database(env)
    d = daemon(with_agents=False, extra_env={"NOTIFY_SOCKET": str(systemd.path)})
    d.start(wait=False)
    wait_until(lambda: _status_or_none(env.socket), 60, "the control socket to answer")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    try:
        code = d.proc.wait(10)
    except subprocess.TimeoutExpired:
        d.kill9()
        raise AssertionError("still running 10 s after SIGTERM") from None
    assert code == 0
    systemd.wait_for("STOPPING=1", timeout=5)


# A reload before the daemon is ready must not tell systemd READY=1 (systemd would take the
# service as started while the database is still unreachable): before READY=1 a reload sends
# only STATUS=.
def test_a_reload_while_connecting_does_not_send_ready(env, daemon, systemd):
    unreachable_database(env)
    d = daemon(with_agents=False, extra_env={"NOTIFY_SOCKET": str(systemd.path)})
    d.start(wait=False)
    wait_until(lambda: _status_or_none(env.socket), 60, "the control socket to answer")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (_status_or_none(env.socket) or {}).get("config", {}).get("generation") == 2,
        30,
        "the reload while connecting",
    )
    # The reload's own datagram: what it sends in place of READY=1 while not ready
    # (reload.py: _notify_reloaded). Once it is read, anything sent with it has been read too.
    systemd.wait_for("STATUS=running: config reloaded", timeout=30)
    d.kill9()
    sent = [x for _, lines in systemd.messages for x in lines]
    assert "READY=1" not in sent and "RELOADING=1" not in sent, sent


def _status_or_none(path: Path) -> dict | None:
    from coordinator.core.errors import ControlError

    try:
        return call(path, "status", timeout=5)  # type: ignore[no-any-return]
    except ControlError:
        return None
