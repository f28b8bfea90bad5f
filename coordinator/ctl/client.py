"""The control client: one request to the daemon's control socket, one answer back
(docs/protocol.md §4). `coordinatorctl`, the demo and the benchmark ask through it; the server is
`coordinator.daemon.control`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from coordinator.core.errors import ControlError, DaemonNotRunning, StateUnknown


def call(path: Path, cmd: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """Blocking client: send one request, return `data`.

    DaemonNotRunning: nothing listens at `path`. StateUnknown: no (whole) answer within
    `timeout`. ControlError: the daemon answered with an error, or the socket is not ours to use.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    buf = bytearray()
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise DaemonNotRunning(f"no daemon listening on {path} ({e.strerror})") from None
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied (the socket is for root and the service's group)"
            ) from None
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered early (a refusal, say) and closed: read the answer
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise StateUnknown(f"{path}: no answer within {timeout:g} s") from None
    except OSError as e:
        if buf.endswith(b"\n"):
            pass  # the reply is whole; a reset after it changes nothing
        elif isinstance(e, ConnectionError):
            raise StateUnknown(f"{path}: connection lost before the answer ({e})") from None
        else:
            raise ControlError(f"{path}: {e}") from None
    finally:
        s.close()
    if not buf:
        raise StateUnknown(f"{path}: the daemon closed the connection without an answer")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise StateUnknown(f"{path}: malformed answer") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise StateUnknown(f"{path}: malformed answer")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error")))
    return reply.get("data")
