"""The agent socket's messages as typed values (docs/protocol.md §3).

One frozen dataclass per message type: its fields are the JSON object's keys, in the order they
go on the wire, and its TYPE is the object's `type`. `encode` writes a message as one line (framed
by `protocol.encode`); `decode` reads one back (framed by `protocol.decode`) and checks that every
field is present, unless it has a default, and of its type before it builds the value. What is
wrong is a ProtocolError naming the message type and the field, e.g. "staged: field 'bytes':
expected int, found 'x'". Keys a type does not know are ignored. A JSON array is a tuple here.

A request (`Request`, coordinator → agent) carries `req`, the hub's request id, and names its
reply type in REPLY. The agent's reply (`Reply`: that type, or `Error`) repeats `req` and adds
the agent's `node`; both go last on the wire. `Hello` and `Heartbeat` are the agent's own,
`Ping` (the keep-alive) is the coordinator's.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from coordinator.core import protocol
from coordinator.core.errors import ProtocolError

__all__ = [
    "Aggregate",
    "Aggregated",
    "Archive",
    "Archived",
    "Crosscheck",
    "Crosschecked",
    "Error",
    "Heartbeat",
    "Hello",
    "Message",
    "Ping",
    "Purge",
    "Purged",
    "Reply",
    "Request",
    "RowsVia",
    "Stage",
    "Staged",
    "StepName",
    "decode",
    "encode",
    "from_dict",
    "to_dict",
]

# Field metadata: the key is left out of the wire form while the value is None.
_OMIT_NONE: Mapping[str, bool] = {"omit_none": True}

# Where an aggregating agent writes the rows CSV (Aggregate.rows_via).
RowsVia = Literal["tmpfs", "staging"]
# The type of a request, as an Error names the step that failed.
StepName = Literal["stage", "crosscheck", "aggregate", "archive", "purge"]

# [inode, size, mtime_ns] of a file, as a barrier counted it or an agent wrote it.
Ident = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message on the agent socket."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """An agent's answer to one request."""

    req: int | None = None  # the request's id (null when the request had none)
    node: int  # the node of the agent that answers


R = TypeVar("R", bound=Reply)


@dataclass(frozen=True, kw_only=True)
class Request(Message, Generic[R]):
    """A step the coordinator asks of an agent for one batch; the agent answers with a REPLY
    or an Error."""

    REPLY: ClassVar[type[Reply]]
    batch_id: str
    req: int | None = field(default=None, metadata=_OMIT_NONE)  # set by the hub when sent


# -- the agent's own ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """The agent's first line: who it is, how it is bound, and what its tmpfs holds."""

    TYPE = "hello"
    node: int
    pid: int
    version: str
    models: tuple[str, ...]  # this node's models
    tmpfs: str
    staged_batches: tuple[str, ...]  # batch folders in its tmpfs (purged if not in flight)
    policy: str  # the kernel's view of its binding: memory policy, nodes, CPUs
    mems: tuple[int, ...]
    cpus: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Sent every `agents.heartbeat_s`: the agent is alive, and how full its tmpfs is."""

    TYPE = "heartbeat"
    node: int
    time: float  # Unix seconds
    tmpfs_used: int
    tmpfs_free: int


# -- the coordinator's own -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    """Sent by the coordinator every `agents.heartbeat_s`: over TCP an agent closes a
    connection on which nothing arrived for `agents.dead_after_s`. It needs no answer."""

    TYPE = "ping"
    time: float  # Unix seconds


# -- replies -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Staged(Reply):
    """The batch's files are in the node's tmpfs."""

    TYPE = "staged"
    batch_id: str
    bytes: int  # copied by this request
    seconds: float
    files: dict[str, Any]  # name -> {"bytes", "seconds"}
    tmpfs_free: int
    # Where the copies' pages are (docs/numa.md); absent when the measurement failed.
    placement: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)
    # Of `bytes`, those whose source pages (staging's page cache, looked at just before each
    # copy) were on another node, and those not in memory at all; the bytes copied by the
    # node of their source pages (docs/numa.md §2). Absent when the look failed.
    copied_remote: int | None = field(default=None, metadata=_OMIT_NONE)
    copied_absent: int | None = field(default=None, metadata=_OMIT_NONE)
    source_nodes: dict[str, int] | None = field(default=None, metadata=_OMIT_NONE)
    # The batch's files as their footers tell: column chunks stored and decompressed, and the
    # writers' CPU seconds (only when every file recorded them).
    compressed_bytes: int | None = field(default=None, metadata=_OMIT_NONE)
    decoded_bytes: int | None = field(default=None, metadata=_OMIT_NONE)
    encode_cpu_s: float | None = field(default=None, metadata=_OMIT_NONE)
    # The agent's resident-set high-water mark during the step (agents.accounting).
    peak_rss: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Crosschecked(Reply):
    """The node's cross-check results are published into staging."""

    TYPE = "crosschecked"
    batch_id: str
    outputs: dict[str, str]  # model -> file name
    idents: dict[str, Ident] = field(default_factory=dict)  # model -> the file it wrote
    seconds: float
    # The node-local copies it read, and of them the bytes not on this node's pages (looked
    # at just before the read; expected 0); the process's CPU seconds reading them
    # (decompression and Parquet decoding); its peak RSS. Absent when not measured.
    read_bytes: int | None = field(default=None, metadata=_OMIT_NONE)
    read_remote: int | None = field(default=None, metadata=_OMIT_NONE)
    decode_cpu_s: float | None = field(default=None, metadata=_OMIT_NONE)
    peak_rss: int | None = field(default=None, metadata=_OMIT_NONE)
    # In how many ranges of item ids it worked (1: the whole batch at once; agents.ranges).
    ranges: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Aggregated(Reply):
    """The batch is aggregated; its rows are in two files in the node's tmpfs."""

    TYPE = "aggregated"
    batch_id: str
    summary: dict[str, Any]  # AggregateSummary.to_wire()
    # Relative paths, never a peer's absolute one: rows_csv under the root the request's
    # `rows_via` named, parquet under the node's tmpfs.
    rows_csv: str
    parquet: str
    seconds: float
    # The rows CSV as the agent wrote it: [inode, size, mtime_ns] (the inode as its kernel
    # numbers it) and the SHA-256 of its bytes; the coordinator COPYs it only if it still is
    # that file with those bytes (coordinator.core.rowsfile).
    rows_ident: Ident
    rows_sha256: str
    # The cross-check files it copied from staging (all, the other nodes' among them: this
    # step's cross-node transfer), of them the bytes on another node's pages and not in
    # memory; the copies the vote read and of them the bytes not on this node (expected 0);
    # its peak RSS. Absent when not measured.
    copied_bytes: int | None = field(default=None, metadata=_OMIT_NONE)
    copied_remote: int | None = field(default=None, metadata=_OMIT_NONE)
    copied_absent: int | None = field(default=None, metadata=_OMIT_NONE)
    read_bytes: int | None = field(default=None, metadata=_OMIT_NONE)
    read_remote: int | None = field(default=None, metadata=_OMIT_NONE)
    peak_rss: int | None = field(default=None, metadata=_OMIT_NONE)
    # In how many ranges of item ids it worked (1: the whole batch at once; agents.ranges).
    ranges: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Archived(Reply):
    """The batch is in the lake."""

    TYPE = "archived"
    batch_id: str
    lake_path: str  # relative to the lake's root: batches/date=YYYY-MM-DD/batch=<id>
    bytes: int
    seconds: float
    # Iceberg lake: table -> [the metadata location it started from, the one it wrote ("" when
    # the table already held the batch)]; the coordinator swaps them in (docs/lake.md).
    commits: dict[str, tuple[str, str]] | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Purged(Reply):
    """The batch's node-local copies are gone."""

    TYPE = "purged"
    batch_id: str
    bytes: int  # freed


@dataclass(frozen=True, kw_only=True)
class Error(Reply):
    """A step failed; `code` says whether a retry can help (errors.ERROR_CODES)."""

    TYPE = "error"
    step: StepName  # the request's type
    code: str
    message: str
    batch_id: str | None


# -- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Stage(Request[Staged]):
    """Copy the batch's files into the node's tmpfs."""

    TYPE = "stage"
    REPLY = Staged
    files: tuple[str, ...]  # final names, <model>.parquet
    idents: dict[str, Ident] = field(default_factory=dict)  # name -> as the barrier counted it


@dataclass(frozen=True, kw_only=True)
class Crosscheck(Request[Crosschecked]):
    """Cross-check the node's models against all present models."""

    TYPE = "crosscheck"
    REPLY = Crosschecked
    models: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Aggregate(Request[Aggregated]):
    """Aggregate the whole batch from its cross-check results."""

    TYPE = "aggregate"
    REPLY = Aggregated
    models: tuple[str, ...]
    # crosscheck_<m>.parquet -> as the second barrier counted it
    idents: dict[str, Ident] = field(default_factory=dict)
    # Where the rows CSV goes for the coordinator's COPY: "tmpfs" (the node's tmpfs, which the
    # coordinator reads on the same kernel) or "staging" (the batch's staging folder, for an
    # agent in another kernel: [[node]] remote).
    rows_via: RowsVia = "tmpfs"


@dataclass(frozen=True, kw_only=True)
class Archive(Request[Archived]):
    """Copy the batch into the lake."""

    TYPE = "archive"
    REPLY = Archived
    date: str  # YYYY-MM-DD, the lake partition
    models: tuple[str, ...]
    idents: dict[str, Ident] = field(default_factory=dict)  # <m>.parquet -> as counted
    # Iceberg lake: table -> its current metadata location (empty: the plain Parquet lake),
    # and the aggregate's summary (the agreement table's rows).
    bases: dict[str, str] | None = field(default=None, metadata=_OMIT_NONE)
    summary: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Purge(Request[Purged]):
    """Drop the batch's node-local copies."""

    TYPE = "purge"
    REPLY = Purged


TYPES: Mapping[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Stage,
        Staged,
        Crosscheck,
        Crosschecked,
        Aggregate,
        Aggregated,
        Archive,
        Archived,
        Purge,
        Purged,
        Heartbeat,
        Error,
        Ping,
    )
}


# -- the wire form -----------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value is not of the type a field wants."""


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any  # the resolved annotation
    required: bool
    omit_none: bool


def _schema(cls: type[Message]) -> tuple[_Field, ...]:
    """The fields of `cls` in wire order: as declared (a request's `batch_id` first), but the
    `req` and `node` of a request or a reply last."""
    hints = typing.get_type_hints(cls)
    envelope = ("req", "node") if issubclass(cls, Request | Reply) else ()
    fs = dataclasses.fields(cls)
    ordered = [f for f in fs if f.name not in envelope] + [f for f in fs if f.name in envelope]
    return tuple(
        _Field(
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            bool(f.metadata.get("omit_none")),
        )
        for f in ordered
    )


_SCHEMAS = {cls: _schema(cls) for cls in TYPES.values()}


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON object of `msg`: `type`, then its fields in wire order."""
    out: dict[str, Any] = {"type": msg.TYPE}
    for f in _SCHEMAS[type(msg)]:
        value = getattr(msg, f.name)
        if value is None and f.omit_none:
            continue
        out[f.name] = value
    return out


def encode(msg: Message) -> bytes:
    """`msg` as one line of JSON; ProtocolError when it exceeds protocol.MAX_MESSAGE."""
    return protocol.encode(to_dict(msg))


def decode(line: bytes) -> Message:
    """Parse one line into a typed message; ProtocolError says what is wrong with it."""
    return from_dict(protocol.decode(line, types=protocol.AGENT_TYPES))


def from_dict(obj: Mapping[str, Any]) -> Message:
    """Build the message a JSON object describes, checking every field; ProtocolError naming
    the type and the field otherwise."""
    kind = obj.get("type")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    values: dict[str, Any] = {}
    for f in _SCHEMAS[cls]:
        if f.name not in obj:
            if f.required:
                raise ProtocolError(f"{kind}: field {f.name!r} is missing")
            continue
        try:
            values[f.name] = _convert(obj[f.name], f.hint)
        except _Mismatch:
            raise ProtocolError(
                f"{kind}: field {f.name!r}: expected {_describe(f.hint)}, "
                f"found {_show(obj[f.name])}"
            ) from None
    return cls(**values)


def _convert(value: object, hint: Any) -> object:
    """`value`, read from JSON, as a value of the type `hint` (an array becomes a tuple);
    _Mismatch when it is not one."""
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is int:
        if type(value) is int:
            return value
        raise _Mismatch
    if hint is float:
        if type(value) is int or type(value) is float:
            return value
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch
    if origin is types.UnionType or origin is typing.Union:
        for arg in args:
            try:
                return _convert(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {k: _convert(v, args[1]) for k, v in value.items()}  # JSON keys are strings
    raise TypeError(f"no wire form for {hint!r}")


def _describe(hint: Any) -> str:
    """A field's type as an error message names it."""
    names = {int: "int", float: "number", str: "str", type(None): "null", Any: "any value"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is types.UnionType or origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    if origin is dict:
        return "object" if args[1] is Any else f"object of {_describe(args[1])}"
    return str(hint)


def _show(value: object) -> str:
    """A value for an error message, cut short: a message may be up to 1 MiB."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
