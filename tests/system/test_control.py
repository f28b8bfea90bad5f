"""The control socket: the request decoder (fuzzed), the peer allow-list, and a server that
survives whatever a client sends. The server runs in-process against a small stand-in daemon
(the live daemon gets the same abuse at the end)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.errors import ControlError, DaemonNotRunning, ProtocolError, StateUnknown
from coordinator.core.protocol import MAX_MESSAGE
from coordinator.ctl.client import call
from coordinator.daemon import control
from coordinator.daemon.control import (
    CMDS,
    AllowList,
    ControlServer,
    Peer,
    decode_request,
)

# --- the decoder (pure) ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def check_decoded(req: dict[str, Any]) -> None:
    """What every decoded request guarantees to the dispatcher."""
    assert req["cmd"] in CMDS
    if req["cmd"] == "batches":
        assert isinstance(req["limit"], int) and 1 <= req["limit"] <= 10_000
        assert req["state"] is None or isinstance(req["state"], str)
    if req["cmd"] == "show":
        assert isinstance(req["batch_id"], str) and req["batch_id"]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_decoder_turns_any_bytes_into_a_request_or_a_protocol_error(line):
    try:
        req = decode_request(line)
    except ProtocolError:
        return
    check_decoded(req)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([*sorted(CMDS), "_block_loop", "nope", ""]),
    st.dictionaries(
        st.sampled_from(["limit", "state", "batch_id", "seconds", "req", "x"]), json_values
    ),
)
def test_decoder_checks_every_argument_of_every_command(cmd, args):
    line = json.dumps({**args, "cmd": cmd}).encode()
    try:
        req = decode_request(line)
    except ProtocolError as e:
        assert str(e)  # says what is wrong
        return
    check_decoded(req)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"cmd": 3}', "no string field 'cmd'"),
        (b'{"cmd": "shutdown"}', "unknown message type 'shutdown'"),
        (b'{"cmd": "batches", "limit": 0}', "limit must be an integer 1..10000"),
        (b'{"cmd": "batches", "limit": true}', "limit must be an integer"),
        (b'{"cmd": "batches", "state": "nope"}', "unknown state 'nope'"),
        (b'{"cmd": "show"}', "show needs a batch_id"),
        (b'{"cmd": "show", "batch_id": "../etc"}', "not a batch id"),
        (b'{"cmd": "_block_loop", "seconds": 1}', "unknown message type '_block_loop'"),
        (b"x" * (MAX_MESSAGE + 1), "exceeds"),
    ],
)
def test_decoder_error_says_what_is_wrong(line, error):
    with pytest.raises(ProtocolError, match=error):
        decode_request(line)


def test_block_loop_is_a_command_only_with_test_hooks_and_takes_bounded_seconds():
    line = b'{"cmd": "_block_loop", "seconds": 1.5}'
    assert decode_request(line, test_hooks=True) == {"cmd": "_block_loop", "seconds": 1.5}
    for bad in (0, -1, 61, "2", True, None):
        with pytest.raises(ProtocolError, match="seconds must be"):
            decode_request(
                json.dumps({"cmd": "_block_loop", "seconds": bad}).encode(), test_hooks=True
            )


def test_batches_defaults_to_the_last_20_of_any_state():
    assert decode_request(b'{"cmd": "batches"}') == {
        "cmd": "batches",
        "limit": 20,
        "state": None,
        "host": None,
    }


def test_batches_of_another_host_takes_a_checked_host_id():
    line = b'{"cmd": "batches", "host": "node-b.example"}'
    assert decode_request(line)["host"] == "node-b.example"
    for bad in ("", "a/b", "x" * 64, 7, True):
        with pytest.raises(ProtocolError, match="host must be a host id"):
            decode_request(json.dumps({"cmd": "batches", "host": bad}).encode())


# --- the allow-list (pure) -------------------------------------------------------------------


def test_allow_list_admits_listed_uids_and_members_of_listed_groups_only():
    allow = AllowList(uids=frozenset({0, 990}), gids=frozenset({991}))
    assert allow.allows(Peer(pid=1, uid=0, gid=0))
    assert allow.allows(Peer(pid=1, uid=990, gid=5))
    assert allow.allows(Peer(pid=1, uid=1000, gid=991))  # primary group
    assert allow.allows(Peer(pid=1, uid=1000, gid=1000, groups=frozenset({4, 991})))
    assert not allow.allows(Peer(pid=1, uid=1000, gid=1000, groups=frozenset({4, 27})))


# --- an in-process server --------------------------------------------------------------------


class FakeLedger:
    is_open = True

    async def list(
        self, *, limit: int, state: str | None, host: str | None = None
    ) -> list[dict[str, Any]]:
        return [{"batch_id": f"b{i}", "state": state or "done"} for i in range(limit)]

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        return {"batch_id": batch_id, "state": "done"} if batch_id == "b1" else None


class FakeMetrics:
    def exposition(self) -> bytes:
        return b"# HELP x\nx 1\n"


class FakeDaemon:
    """Just what ControlServer reads from a daemon."""

    def __init__(self) -> None:
        self.state = "running"
        self.ledger: FakeLedger | None = FakeLedger()
        self.fail_status = False
        self.reloads = 0
        self.metrics = FakeMetrics()

    def status_json(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return {"daemon": {"state": self.state}}

    async def reload(self) -> dict[str, Any]:
        self.reloads += 1
        return {"at": time.time(), "ok": True, "error": ""}


@pytest.fixture
def server() -> Iterator[tuple[Path, FakeDaemon, ControlServer]]:
    # Under /tmp: short enough for a socket path, and reachable for another uid once opened.
    run = Path(tempfile.mkdtemp(prefix="nc-ctl-", dir="/tmp"))
    run.chmod(0o750)
    path = run / "control.sock"
    fake = FakeDaemon()
    srv = ControlServer(fake, request_timeout=0.5, max_connections=4)  # type: ignore[arg-type]
    with start_blocking_portal("asyncio") as portal:
        task, _ = portal.start_task(srv.serve, path)
        try:
            yield path, fake, srv
        finally:
            task.cancel()
            shutil.rmtree(run, ignore_errors=True)


def raw(path: Path, payload: bytes, *, timeout: float = 5.0, eof: bool = False) -> bytes:
    """Send raw bytes (then EOF if `eof`); return all the server sends back before it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if eof:
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def test_socket_is_0660_and_answers_ping(server):
    path, _, _ = server
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert call(path, "ping") == "pong"


def test_malformed_oversized_and_slow_requests_get_an_error_and_the_server_goes_on(server):
    path, _, srv = server
    assert b"not JSON" in raw(path, b"\x00\xff garbage\n")
    assert b"expected a JSON object" in raw(path, b"[1, 2]\n")
    assert b"unknown message type" in raw(path, b'{"cmd": "rm -rf"}\n')
    assert b"line longer than" in raw(path, b"{" * (MAX_MESSAGE + 70_000))
    # Slow loris: half a request, then nothing; the server gives up after its timeout.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b'{"cmd": "st')
        assert b"request too slow" in s.recv(4096)
    # Closed before a whole line: no answer, no harm.
    assert raw(path, b'{"cmd": "ping"', eof=True) == b""
    assert srv.bad == 5
    assert call(path, "ping") == "pong"


def test_any_bytes_on_the_socket_get_a_json_reply_or_none_and_the_server_goes_on(server):
    path, _, _ = server

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=300) | st.builds(lambda b: b + b"\n", st.binary(max_size=300)))
    def check(payload: bytes) -> None:
        reply = raw(path, payload, eof=True)
        if b"\n" in payload:
            lines = reply.splitlines()
            assert len(lines) == 1, reply
            assert isinstance(json.loads(lines[0])["ok"], bool)
        else:
            assert reply == b""  # no whole line, no answer

    check()
    assert call(path, "ping") == "pong"


def test_a_failure_while_answering_is_an_error_reply_not_a_dead_server(server):
    path, fake, _ = server
    fake.fail_status = True
    with pytest.raises(ControlError, match="internal error: RuntimeError: status exploded"):
        call(path, "status")
    fake.fail_status = False
    assert call(path, "status") == {"daemon": {"state": "running"}}


def test_ledger_commands_say_so_while_the_ledger_is_not_open(server):
    path, fake, _ = server
    fake.ledger = None
    fake.state = "connecting"
    with pytest.raises(ControlError, match=r"ledger is not open yet \(daemon connecting\)"):
        call(path, "batches")
    assert call(path, "status") == {"daemon": {"state": "connecting"}}


def test_batches_show_and_reload_reach_the_daemon(server):
    path, fake, _ = server
    assert [r["batch_id"] for r in call(path, "batches", limit=3, state="failed")] == [
        "b0",
        "b1",
        "b2",
    ]
    assert call(path, "show", batch_id="b1")["state"] == "done"
    with pytest.raises(ControlError, match="no batch 'b9' in the ledger"):
        call(path, "show", batch_id="b9")
    assert call(path, "reload")["ok"] is True
    assert fake.reloads == 1


def test_metrics_returns_the_exposition_text(server):
    path, _, _ = server
    assert call(path, "metrics") == "# HELP x\nx 1\n"


def test_connections_beyond_the_limit_are_told_busy(server):
    path, _, _ = server
    idle = []
    try:
        for _ in range(4):  # max_connections=4 in the fixture: fill every slot
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            idle.append(s)
        time.sleep(0.1)  # let the server accept them
        assert b"busy: too many connections" in raw(path, b'{"cmd": "ping"}\n')
    finally:
        for s in idle:
            s.close()
    time.sleep(0.6)  # the idle ones time out (0.5 s) and free their slots
    assert call(path, "ping") == "pong"


CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"cmd": "ping"}\\n')
print(s.recv(4096).decode().strip())
"""


def run_client_as(path: Path, uid: int, gid: int, groups: list[int]) -> str:
    """Ping from a process of another uid; the system Python, which any user can run."""
    r = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", CLIENT, str(path)],
        user=uid,
        group=gid,
        extra_groups=groups,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="machine fact: not root (the test runs a client as another uid)"
)
@pytest.mark.skipif(
    not os.access("/usr/bin/python3", os.X_OK), reason="no /usr/bin/python3 (Debian python3)"
)
def test_peer_credentials_refuse_other_users_and_admit_the_socket_group(server):
    path, _, srv = server
    # Open the file permissions wide, so that only the SO_PEERCRED check stands in the way.
    path.parent.chmod(0o755)
    path.chmod(0o666)
    sock_gid = path.stat().st_gid
    outsider = json.loads(run_client_as(path, 65534, 65534, []))
    assert outsider == {"ok": False, "error": "uid 65534 is not allowed"}
    assert srv.refused == 1
    member = json.loads(run_client_as(path, 65534, 65534, [sock_gid]))
    assert member == {"ok": True, "data": "pong"}


# --- the client ------------------------------------------------------------------------------


def test_client_says_not_running_when_nothing_listens(tmp_path):
    with pytest.raises(DaemonNotRunning):
        call(tmp_path / "absent.sock", "ping")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a crashed daemon leaves it
    with pytest.raises(DaemonNotRunning):
        call(stale, "ping")


def test_client_says_state_unknown_when_no_answer_comes(tmp_path):
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(StateUnknown, match=r"no answer within 0\.3 s"):
            call(path, "ping", timeout=0.3)


def test_client_says_state_unknown_on_a_garbled_answer(tmp_path):
    import threading

    path = tmp_path / "garbled.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"<html>\n")

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(StateUnknown, match="malformed answer"):
            call(path, "ping", timeout=10)
        t.join()


def test_request_timeout_default_is_what_the_protocol_doc_says():
    assert control.REQUEST_TIMEOUT_S == 5.0


# --- the live daemon -------------------------------------------------------------------------


def test_live_daemon_socket_modes_and_it_survives_garbage_oversized_and_slow_clients(env, daemon):
    import threading

    d = daemon(with_agents=False).start()
    assert stat.S_IMODE(env.run.stat().st_mode) == 0o750
    assert stat.S_IMODE(env.socket.stat().st_mode) == 0o660
    replies: dict[str, bytes] = {}

    def slow_loris() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(env.socket))
            for ch in b'{"cmd": "sta':  # a byte every 0.5 s, never a whole line in time
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    break
                time.sleep(0.5)
            replies["slow"] = s.recv(4096)

    t = threading.Thread(target=slow_loris)
    t.start()
    replies["garbage"] = raw(env.socket, os.urandom(4096) + b"\n")
    replies["oversized"] = raw(env.socket, b"[" * (MAX_MESSAGE + 1024))
    replies["half"] = raw(env.socket, b'{"cmd": "status"', eof=True)
    t.join(60)
    assert b'"ok": false' in replies["garbage"]
    assert b"line longer than" in replies["oversized"]
    assert replies["half"] == b""
    assert b"request too slow" in replies["slow"]
    assert d.proc is not None and d.proc.poll() is None
    assert d.status()["daemon"]["pid"] == d.proc.pid
