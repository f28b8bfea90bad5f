"""The wire format of the agent and control sockets: one JSON object per line (docs/protocol.md).

Pure encode/decode plus a small framed reader over an anyio byte stream. A message is a JSON
object with a string field `type`; requests carry an integer `req` that the reply repeats. The
agent socket's messages are read and written as typed values by `coordinator.core.messages`,
on top of this framing.
"""

from __future__ import annotations

import json
from typing import Any

from anyio.abc import ByteReceiveStream

from coordinator.core.errors import ProtocolError

MAX_MESSAGE = 1 << 20  # 1 MiB: far above any real message, small enough to bound memory.

AGENT_TYPES = frozenset(
    {
        "hello",
        "stage",
        "staged",
        "crosscheck",
        "crosschecked",
        "aggregate",
        "aggregated",
        "archive",
        "archived",
        "purge",
        "purged",
        "heartbeat",
        "error",
        "ping",
    }
)


def encode(msg: dict[str, Any]) -> bytes:
    """One message as a line of JSON."""
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    return data


def decode(
    line: bytes, *, types: frozenset[str] | None = None, key: str = "type"
) -> dict[str, Any]:
    """Parse one line into a message whose kind is field `key`; ProtocolError says what is wrong."""
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    try:
        msg = json.loads(line)
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a JSON object, found {type(msg).__name__}")
    kind = msg.get(key)
    if not isinstance(kind, str):
        raise ProtocolError(f"message has no string field {key!r}")
    if types is not None and kind not in types:
        raise ProtocolError(f"unknown message type {kind!r}")
    req = msg.get("req")
    if req is not None and (isinstance(req, bool) or not isinstance(req, int)):
        raise ProtocolError(f"field 'req' must be an integer, found {req!r}")
    return msg


class LineReader:
    """Split a byte stream into lines, refusing any line longer than MAX_MESSAGE."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream."""
        import anyio

        while True:
            i = self.buf.find(b"\n")
            if i > MAX_MESSAGE or (i < 0 and len(self.buf) > MAX_MESSAGE):
                raise ProtocolError(f"line longer than {MAX_MESSAGE} bytes")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_MESSAGE:
                raise ProtocolError(f"line longer than {MAX_MESSAGE} bytes")
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            self.buf += chunk
