"""The control socket: `coordinatorctl` asks, the daemon answers (docs/protocol.md §4).

Requests are one JSON line `{"cmd": ..., ...}`; replies are one JSON line `{"ok": true, "data":
...}` or `{"ok": false, "error": "..."}`. Only peers on the allow-list (root, the daemon's own
uid, members of the socket's group) are served. A malformed, oversized or slow request gets an
error reply or is dropped; nothing a client sends takes the daemon down.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from coordinator.core import hooks
from coordinator.core.batch import State
from coordinator.core.config import HOST_ID_RE, NAME_RE
from coordinator.core.errors import ControlError, ProtocolError
from coordinator.core.protocol import LineReader, decode
from coordinator.daemon.ledger import Ledger
from coordinator.daemon.metrics import Metrics

log = structlog.get_logger("coordinator.daemon.control")

REQUEST_TIMEOUT_S = 5.0  # the whole request line must arrive within this
REPLY_TIMEOUT_S = 10.0  # a client that does not read its reply is dropped after this
MAX_CONNECTIONS = 32  # beyond this, new connections get "busy" and are closed
CMDS = frozenset({"status", "batches", "show", "reload", "ping", "metrics"})
TEST_CMDS = frozenset({"_block_loop"})  # only when test hooks are on
MAX_LIMIT = 10_000
MAX_BLOCK_S = 60.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


# -- who may ask ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The credentials of the process on the other end of a Unix socket, from the kernel."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True)
class AllowList:
    """Who may use the control socket: these uids, or any member of these groups."""

    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, peer: Peer) -> bool:
        """True when the peer's uid is listed or its primary or any supplementary group is."""
        return peer.uid in self.uids or peer.gid in self.gids or bool(peer.groups & self.gids)


def default_allow_list(sock_path: Path) -> AllowList:
    """Root, the daemon's own uid, and the group that owns the socket (the service's group)."""
    try:
        gid = os.stat(sock_path).st_gid
    except OSError:
        gid = os.getgid()
    return AllowList(uids=frozenset({0, os.getuid()}), gids=frozenset({gid}))


def peer_credentials(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED (pid, uid, gid) plus SO_PEERGROUPS (supplementary groups) of `sock`'s peer."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    groups: frozenset[int]
    try:
        # Python caps the buffer at 1024 bytes: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        n = len(raw) // 4
        groups = frozenset(struct.unpack(f"{n}I", raw[: 4 * n]))
    except OSError:
        groups = _user_groups(uid, gid)  # an old kernel, or more groups than fit
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


def _user_groups(uid: int, gid: int) -> frozenset[int]:
    """The groups the user database gives `uid` (when the kernel cannot tell)."""
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        return frozenset()


# -- the request decoder (pure) ---------------------------------------------------------------


def decode_request(line: bytes, *, test_hooks: bool = False) -> dict[str, Any]:
    """Parse and check one request line; ProtocolError says what is wrong with it.

    The result has `cmd` and that command's arguments, checked and with their defaults.
    """
    cmds = CMDS | TEST_CMDS if test_hooks else CMDS
    msg = decode(line, types=cmds, key="cmd")
    cmd = msg["cmd"]
    if cmd == "batches":
        limit = msg.get("limit", 20)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ProtocolError(f"limit must be an integer 1..{MAX_LIMIT}")
        state = msg.get("state")
        if state is not None and not isinstance(state, str):
            raise ProtocolError("state must be a string")
        if state is not None and state not in {s.value for s in State}:
            raise ProtocolError(
                f"unknown state {state!r}; expected one of {', '.join(s.value for s in State)}"
            )
        host = msg.get("host")
        if host is not None and (not isinstance(host, str) or not HOST_ID_RE.fullmatch(host)):
            raise ProtocolError(f"host must be a host id, found {str(host)[:100]!r}")
        return {"cmd": cmd, "limit": limit, "state": state, "host": host}
    if cmd == "show":
        batch_id = msg.get("batch_id")
        if not isinstance(batch_id, str):
            raise ProtocolError("show needs a batch_id")
        if not NAME_RE.fullmatch(batch_id):
            raise ProtocolError(f"not a batch id: {batch_id[:200]!r}")
        return {"cmd": cmd, "batch_id": batch_id}
    if cmd == "_block_loop":
        seconds = msg.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds <= MAX_BLOCK_S
        ):
            raise ProtocolError(f"seconds must be a number in (0, {MAX_BLOCK_S:.0f}]")
        return {"cmd": cmd, "seconds": float(seconds)}
    return {"cmd": cmd}


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line; values JSON cannot hold are written with str()."""
    return json.dumps(reply, default=str).encode() + b"\n"


# -- the server -------------------------------------------------------------------------------


class Served(Protocol):
    """What the control socket needs of the daemon it serves."""

    state: str
    ledger: Ledger | None
    metrics: Metrics

    def status_json(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


class ControlServer:
    """Serves the control socket for one daemon."""

    def __init__(
        self,
        daemon: Served,
        *,
        allow: AllowList | None = None,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.d = daemon
        self.allow = allow
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.active = 0
        self.refused = 0  # peers not on the allow-list
        self.bad = 0  # malformed, oversized or slow requests

    async def serve(self, path: Path, *, task_status: TaskStatus[None]) -> None:
        """Bind the socket (0660, in a runtime folder the daemon keeps at 0750) and answer."""
        await anyio.Path(path).unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(path)
        os.chmod(path, 0o660)
        if self.allow is None:
            self.allow = default_allow_list(path)
        task_status.started()
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            if self.active >= self.max_connections:
                await self._send(stream, {"ok": False, "error": "busy: too many connections"})
                return
            self.active += 1
            try:
                await self._serve_one(stream)
            finally:
                self.active -= 1

    async def _serve_one(self, stream: SocketStream) -> None:
        peer = peer_credentials(stream.extra(SocketAttribute.raw_socket))
        assert self.allow is not None
        if peer is None or not self.allow.allows(peer):
            self.refused += 1
            # The request is read anyway (bounded in size and time), so that the peer gets
            # the refusal as its reply rather than a broken pipe.
            with anyio.move_on_after(self.request_timeout):
                try:
                    await LineReader(stream).readline()
                except ProtocolError:
                    pass
            who = f"uid {peer.uid}" if peer else "a peer without credentials"
            log.warning("control request refused", uid=peer.uid if peer else None)
            await self._send(stream, {"ok": False, "error": f"{who} is not allowed"})
            return
        try:
            with anyio.fail_after(self.request_timeout):
                line = await LineReader(stream).readline()
        except TimeoutError:
            self.bad += 1
            await self._send(stream, {"ok": False, "error": "request too slow"})
            return
        except ProtocolError as e:
            self.bad += 1
            await self._send(stream, {"ok": False, "error": str(e)})
            return
        if line is None:
            return  # closed before a whole line: nobody to answer
        reply: dict[str, Any]
        try:
            req = decode_request(line, test_hooks=bool(hooks.hooks()))
            reply = {"ok": True, "data": await self.answer(req)}
        except ProtocolError as e:
            self.bad += 1
            reply = {"ok": False, "error": str(e)}
        except ControlError as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:
            # A bug answering one request must not take the daemon (and its batches) down.
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        await self._send(stream, reply)

    async def _send(self, stream: SocketStream, reply: dict[str, Any]) -> None:
        with anyio.move_on_after(REPLY_TIMEOUT_S):
            try:
                await stream.send(encode_reply(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def answer(self, req: dict[str, Any]) -> Any:
        """Answer one decoded request (see `decode_request`)."""
        cmd = req["cmd"]
        d = self.d
        if cmd == "ping":
            return "pong"
        if cmd == "status":
            return d.status_json()
        if cmd == "reload":
            return await d.reload()
        if cmd == "metrics":
            return d.metrics.exposition().decode()
        if cmd == "_block_loop":
            # Test hook: block the event loop itself, as a runaway computation would, so a
            # test can see the watchdog pings stop.
            time.sleep(req["seconds"])  # noqa: ASYNC251
            return {"blocked_s": req["seconds"]}
        if d.ledger is None or not d.ledger.is_open:
            raise ControlError(f"the ledger is not open yet (daemon {d.state}); try again")
        if cmd == "batches":
            return await d.ledger.list(limit=req["limit"], state=req["state"], host=req["host"])
        if cmd == "show":
            row = await d.ledger.get(req["batch_id"])
            if row is None:
                raise ControlError(f"no batch {req['batch_id']!r} in the ledger")
            return row
        raise ProtocolError(f"unknown command {cmd!r}")
