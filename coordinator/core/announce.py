"""Publish announcements: the PostgreSQL NOTIFY a producer may send after each publish, so a
coordinator whose kernel hears nothing of the write (staging on NFS, a VM guest's shared folder)
looks at the batch at once (`barrier.backend = "notify"`, docs/protocol.md, "Announcing a
publish").

The channel is the schema's (`channel`); the payload is `<batch_id>/<model>/<size>` (`encode`,
`decode`). An announcement only says "look at this batch folder now": the coordinator decides
from the folder what counts, so a payload that names a batch that is not there, a model that is
not configured, or a wrong size costs one look and nothing else. Pure: no I/O here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from coordinator.core.config import NAME_RE

# PostgreSQL cuts identifiers at NAMEDATALEN - 1 bytes, and pg_notify refuses a longer channel.
MAX_CHANNEL = 63
SUFFIX = "_published"
# The payload limit of NOTIFY is 8000 bytes; two names of at most 128 characters and a size
# stay far below it.
MAX_PAYLOAD = 8000


def channel(schema: str) -> str:
    """The schema's announcement channel: `<schema>_published`. A schema too long for that
    (more than 53 characters) keeps its first 44 characters and gets 8 hex digits of its CRC-32
    before the suffix, so two long schemas never share a channel by their common prefix."""
    name = schema + SUFFIX
    if len(name.encode()) <= MAX_CHANNEL:
        return name
    return f"{schema[:44]}_{zlib.crc32(schema.encode()):08x}{SUFFIX}"


@dataclass(frozen=True)
class Announcement:
    """One publish, as announced: the batch, the model, and the file's size in bytes as the
    producer saw it after its rename (informative only: the coordinator reads the folder)."""

    batch_id: str
    model: str
    size: int


def encode(batch_id: str, model: str, size: int) -> str:
    """The payload `<batch_id>/<model>/<size>`; ValueError naming the field that is not valid."""
    _check_name("batch_id", batch_id)
    _check_name("model", model)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"announcement size {size!r} is not a byte count (an integer >= 0)")
    return f"{batch_id}/{model}/{size}"


def decode(payload: str) -> Announcement:
    """Read a payload back; ValueError naming what is wrong with it (the payload quoted)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"announcement payload of {len(payload)} characters is too long")
    parts = payload.split("/")
    if len(parts) != 3:
        raise ValueError(
            f"announcement payload {payload[:200]!r} is not <batch_id>/<model>/<size> "
            f"({len(parts)} part(s) separated by '/')"
        )
    batch_id, model, size = parts
    try:
        _check_name("batch_id", batch_id)
        _check_name("model", model)
    except ValueError as e:
        raise ValueError(f"announcement payload {payload[:200]!r}: {e}") from None
    if not size.isascii() or not size.isdigit():
        raise ValueError(
            f"announcement payload {payload[:200]!r}: size {size!r} is not a byte count"
        )
    return Announcement(batch_id, model, int(size))


def _check_name(kind: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} does not match {NAME_RE.pattern}")
