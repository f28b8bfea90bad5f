"""The control socket: `coordinatorctl` asks, the daemon answers (docs/protocol.md).

Requests are one JSON line `{"cmd": ..., ...}`; replies are one JSON line `{"ok": true, "data":
...}` or `{"ok": false, "error": "..."}`. A malformed, oversized or slow request gets an error
reply or is dropped; it never takes the daemon down.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus

from coordinator.errors import ControlError, DaemonNotRunning, ProtocolError
from coordinator.protocol import LineReader, decode, encode

if TYPE_CHECKING:
    from coordinator.daemon import Daemon

log = structlog.get_logger("coordinator.control")

REQUEST_TIMEOUT_S = 5.0
CMDS = frozenset({"status", "batches", "show", "reload", "ping"})


def peer_uid(stream: SocketStream) -> int | None:
    """The uid of the process on the other end (SO_PEERCRED)."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves the control socket for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def serve(self, path: Path, *, task_status: TaskStatus[None]) -> None:
        """Bind the socket (0660) and answer requests."""
        path.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(path)
        os.chmod(path, 0o660)
        task_status.started()
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            uid = peer_uid(stream)
            if uid is not None and uid not in (0, os.getuid()):
                await stream.send(encode({"ok": False, "error": f"uid {uid} is not allowed"}))
                return
            try:
                with anyio.fail_after(REQUEST_TIMEOUT_S):
                    line = await LineReader(stream).readline()
                if line is None:
                    return
                req = decode(line, types=CMDS, key="cmd")
                data = await self.answer(req)
                reply: dict[str, Any] = {"ok": True, "data": data}
            except TimeoutError:
                reply = {"ok": False, "error": "request too slow"}
            except (ProtocolError, ControlError) as e:
                reply = {"ok": False, "error": str(e)}
            try:
                await stream.send(json.dumps(reply, default=str).encode() + b"\n")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def answer(self, req: dict[str, Any]) -> Any:
        """Dispatch one request."""
        cmd = req["cmd"]
        d = self.d
        if cmd == "ping":
            return "pong"
        if cmd == "status":
            return d.status()
        if cmd == "reload":
            return await d.reload()
        assert d.ledger is not None
        if cmd == "batches":
            limit = req.get("limit", 20)
            state = req.get("state")
            if not isinstance(limit, int) or not 1 <= limit <= 10_000:
                raise ProtocolError("limit must be an integer 1..10000")
            if state is not None and not isinstance(state, str):
                raise ProtocolError("state must be a string")
            return await d.ledger.list(limit=limit, state=state)
        if cmd == "show":
            batch_id = req.get("batch_id")
            if not isinstance(batch_id, str):
                raise ProtocolError("show needs a batch_id")
            row = await d.ledger.get(batch_id)
            if row is None:
                raise ControlError(f"no batch {batch_id!r} in the ledger")
            return row
        raise ProtocolError(f"unknown command {cmd!r}")


def call(path: Path, cmd: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """Blocking client: send one request, return `data` or raise ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonNotRunning(f"no daemon listening on {path} ({e.strerror})") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:.0f} s") from None
    except OSError as e:
        raise ControlError(f"{path}: {e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: malformed reply") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply["data"]
