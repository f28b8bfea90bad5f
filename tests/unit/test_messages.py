"""The agent socket's typed messages: the wire form they keep, and what decode refuses."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import messages
from coordinator.core.errors import ProtocolError
from coordinator.core.messages import (
    TYPES,
    Aggregate,
    Aggregated,
    Archive,
    Archived,
    Crosscheck,
    Crosschecked,
    Error,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Purge,
    Purged,
    Reply,
    Request,
    Stage,
    Staged,
    decode,
    encode,
    from_dict,
)
from coordinator.core.protocol import AGENT_TYPES, MAX_MESSAGE

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
PLACEMENT = {
    "fraction": 1.0,
    "pages": 9,
    "local_pages": 9,
    "node": 0,
    "method": "move_pages",
    "nodes": {"0": 9},
    "seconds": 0.001,
    "files": {"slm-1.parquet": {"fraction": 1.0, "pages": 9}},
}
SUMMARY = {
    "rows": 2,
    "agreement": [["slm-1", "slm-2", 0.5, 2]],
    "fleiss_kappa": 0.0,
    "consensus_agreement": {"slm-1": 1.0, "slm-2": None},
    "models": ["slm-1", "slm-2"],
}

# Each message as a value, and the JSON object the code wrote for it before these types
# existed: the same keys in the same order (the hub added `req` last to a request, the agent
# `req` and `node` last to a reply).
CASES: list[tuple[Message, dict[str, Any]]] = [
    (
        Hello(
            node=0,
            pid=4711,
            version="0.1.0",
            models=("slm-1", "slm-2"),
            tmpfs="/dev/shm/numa-coordinator/node0",
            staged_batches=("b0",),
            policy="bind",
            mems=(0,),
            cpus=(0, 1, 36, 37),
        ),
        {
            "type": "hello",
            "node": 0,
            "pid": 4711,
            "version": "0.1.0",
            "models": ["slm-1", "slm-2"],
            "tmpfs": "/dev/shm/numa-coordinator/node0",
            "staged_batches": ["b0"],
            "policy": "bind",
            "mems": [0],
            "cpus": [0, 1, 36, 37],
        },
    ),
    (
        Heartbeat(node=1, time=1795878000.25, tmpfs_used=0, tmpfs_free=67108864000),
        {
            "type": "heartbeat",
            "node": 1,
            "time": 1795878000.25,
            "tmpfs_used": 0,
            "tmpfs_free": 67108864000,
        },
    ),
    (
        Stage(
            batch_id="b1",
            files=("slm-1.parquet", "slm-2.parquet"),
            idents={"slm-1.parquet": (11, 2048, 1795878000123456789)},
            req=7,
        ),
        {
            "type": "stage",
            "batch_id": "b1",
            "files": ["slm-1.parquet", "slm-2.parquet"],
            "idents": {"slm-1.parquet": [11, 2048, 1795878000123456789]},
            "req": 7,
        },
    ),
    (
        Staged(
            batch_id="b1",
            bytes=4096,
            seconds=0.031,
            files={"slm-1.parquet": {"bytes": 4096, "seconds": 0.015}},
            tmpfs_free=67066920960,
            placement=PLACEMENT,
            req=7,
            node=0,
        ),
        {
            "type": "staged",
            "batch_id": "b1",
            "bytes": 4096,
            "seconds": 0.031,
            "files": {"slm-1.parquet": {"bytes": 4096, "seconds": 0.015}},
            "tmpfs_free": 67066920960,
            "placement": PLACEMENT,
            "req": 7,
            "node": 0,
        },
    ),
    (
        Crosscheck(batch_id="b1", models=("slm-1", "slm-2"), req=9),
        {"type": "crosscheck", "batch_id": "b1", "models": ["slm-1", "slm-2"], "req": 9},
    ),
    (
        Crosschecked(
            batch_id="b1",
            outputs={"slm-1": "crosscheck_slm-1.parquet"},
            idents={"slm-1": (12, 1024, 1795878000223456789)},
            seconds=0.12,
            req=9,
            node=0,
        ),
        {
            "type": "crosschecked",
            "batch_id": "b1",
            "outputs": {"slm-1": "crosscheck_slm-1.parquet"},
            "idents": {"slm-1": [12, 1024, 1795878000223456789]},
            "seconds": 0.12,
            "req": 9,
            "node": 0,
        },
    ),
    (
        Aggregate(
            batch_id="b1",
            models=("slm-1", "slm-2"),
            idents={"crosscheck_slm-1.parquet": (12, 1024, 1795878000223456789)},
            rows_via="staging",
            req=10,
        ),
        {
            "type": "aggregate",
            "batch_id": "b1",
            "models": ["slm-1", "slm-2"],
            "idents": {"crosscheck_slm-1.parquet": [12, 1024, 1795878000223456789]},
            "rows_via": "staging",
            "req": 10,
        },
    ),
    (
        Aggregated(
            batch_id="b1",
            summary=SUMMARY,
            rows_csv="b1/aggregates.csv",
            parquet="b1/aggregates.parquet",
            seconds=0.08,
            rows_ident=(41, 300, 1795878000223456789),
            rows_sha256="ab" * 32,
            req=10,
            node=1,
        ),
        {
            "type": "aggregated",
            "batch_id": "b1",
            "summary": SUMMARY,
            "rows_csv": "b1/aggregates.csv",
            "parquet": "b1/aggregates.parquet",
            "seconds": 0.08,
            "rows_ident": [41, 300, 1795878000223456789],
            "rows_sha256": "ab" * 32,
            "req": 10,
            "node": 1,
        },
    ),
    (
        Archive(
            batch_id="b1",
            date="2026-11-28",
            models=("slm-1",),
            idents={"slm-1.parquet": (11, 2048, 1795878000123456789)},
            req=11,
        ),
        {
            "type": "archive",
            "batch_id": "b1",
            "date": "2026-11-28",
            "models": ["slm-1"],
            "idents": {"slm-1.parquet": [11, 2048, 1795878000123456789]},
            "req": 11,
        },
    ),
    (
        Archived(
            batch_id="b1",
            lake_path="batches/date=2026-11-28/batch=b1",
            bytes=8192,
            seconds=0.2,
            req=11,
            node=1,
        ),
        {
            "type": "archived",
            "batch_id": "b1",
            "lake_path": "batches/date=2026-11-28/batch=b1",
            "bytes": 8192,
            "seconds": 0.2,
            "req": 11,
            "node": 1,
        },
    ),
    (
        Purge(batch_id="b1", req=12),
        {"type": "purge", "batch_id": "b1", "req": 12},
    ),
    (
        Purged(batch_id="b1", bytes=41943040, req=12, node=0),
        {"type": "purged", "batch_id": "b1", "bytes": 41943040, "req": 12, "node": 0},
    ),
    (
        Error(
            step="stage",
            code="nospace",
            message="1048576 bytes free, batch needs 41943040",
            batch_id="b1",
            req=8,
            node=1,
        ),
        {
            "type": "error",
            "step": "stage",
            "code": "nospace",
            "message": "1048576 bytes free, batch needs 41943040",
            "batch_id": "b1",
            "req": 8,
            "node": 1,
        },
    ),
    (
        Ping(time=1795878000.5),
        {"type": "ping", "time": 1795878000.5},
    ),
]
IDS = [msg.TYPE for msg, _ in CASES]


def wire(obj: dict[str, Any]) -> bytes:
    """A message as the code wrote it before: protocol.encode's json.dumps, one line."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def test_every_type_of_the_protocol_has_a_class_and_a_case() -> None:
    assert set(TYPES) == AGENT_TYPES
    assert sorted(IDS) == sorted(AGENT_TYPES)
    for kind, cls in TYPES.items():
        assert cls.TYPE == kind


@pytest.mark.parametrize(("msg", "obj"), CASES, ids=IDS)
def test_encode_writes_the_bytes_the_code_wrote_before(msg: Message, obj: dict[str, Any]) -> None:
    assert encode(msg) == wire(obj)


@pytest.mark.parametrize(("msg", "obj"), CASES, ids=IDS)
def test_decode_round_trips(msg: Message, obj: dict[str, Any]) -> None:
    got = decode(wire(obj))
    assert type(got) is type(msg)
    assert got == msg
    assert decode(encode(msg)) == msg
    assert encode(got) == wire(obj)


def test_the_protocol_doc_examples_decode() -> None:
    lines = re.findall(r"^(\{\"type\":.*\})$", DOCS.read_text(), re.M)
    assert len(lines) >= 10
    for line in lines:
        msg = decode(line.encode())
        assert msg.TYPE == json.loads(line)["type"]


# -- what is optional ---------------------------------------------------------------------------


def test_a_request_without_req_or_idents_decodes_and_keeps_its_form() -> None:
    msg = decode(b'{"type":"stage","batch_id":"b1","files":["a.parquet"]}')
    assert msg == Stage(batch_id="b1", files=("a.parquet",))
    assert isinstance(msg, Stage) and msg.req is None and msg.idents == {}
    # Without a req the key is left out (the hub always sets one); idents is always written.
    assert encode(msg) == b'{"type":"stage","batch_id":"b1","files":["a.parquet"],"idents":{}}\n'


def test_a_reply_without_req_decodes_and_is_written_with_null() -> None:
    msg = decode(b'{"type":"purged","batch_id":"b1","bytes":0,"node":2}')
    assert msg == Purged(batch_id="b1", bytes=0, node=2)
    assert encode(msg) == b'{"type":"purged","batch_id":"b1","bytes":0,"req":null,"node":2}\n'


def test_staged_without_placement_leaves_the_key_out() -> None:
    msg = Staged(batch_id="b1", bytes=0, seconds=0.0, files={}, tmpfs_free=1, req=1, node=0)
    assert b"placement" not in encode(msg)
    assert decode(encode(msg)) == msg
    assert isinstance(decode(encode(msg)), Staged)


def test_an_error_for_no_batch_carries_null() -> None:
    msg = Error(step="purge", code="failed", message="boom", batch_id=None, req=1, node=0)
    assert b'"batch_id":null' in encode(msg)
    assert decode(encode(msg)) == msg


def test_a_whole_number_of_seconds_is_a_number() -> None:
    line = b'{"type":"archived","batch_id":"b","lake_path":"/l","bytes":1,"seconds":2,"node":0}'
    got = decode(line)
    assert isinstance(got, Archived) and got.seconds == 2


def test_keys_a_type_does_not_know_are_ignored() -> None:
    msg = decode(b'{"type":"purge","batch_id":"b1","req":3,"later":{"x":1}}')
    assert msg == Purge(batch_id="b1", req=3)


# -- what is refused ----------------------------------------------------------------------------


def required_fields() -> list[tuple[str, str]]:
    return [
        (cls.TYPE, f.name) for cls in TYPES.values() for f in messages._SCHEMAS[cls] if f.required
    ]


def all_fields() -> list[tuple[str, str]]:
    return [(cls.TYPE, f.name) for cls in TYPES.values() for f in messages._SCHEMAS[cls]]


def case(kind: str) -> dict[str, Any]:
    return dict(next(obj for msg, obj in CASES if msg.TYPE == kind))


def test_the_fields_a_message_may_leave_out() -> None:
    optional = sorted(set(all_fields()) - set(required_fields()))
    assert optional == [
        ("aggregate", "idents"),
        ("aggregate", "req"),
        ("aggregate", "rows_via"),
        ("aggregated", "copied_absent"),
        ("aggregated", "copied_bytes"),
        ("aggregated", "copied_remote"),
        ("aggregated", "peak_rss"),
        ("aggregated", "ranges"),
        ("aggregated", "read_bytes"),
        ("aggregated", "read_remote"),
        ("aggregated", "req"),
        ("archive", "bases"),
        ("archive", "idents"),
        ("archive", "req"),
        ("archive", "summary"),
        ("archived", "commits"),
        ("archived", "req"),
        ("crosscheck", "req"),
        ("crosschecked", "decode_cpu_s"),
        ("crosschecked", "idents"),
        ("crosschecked", "peak_rss"),
        ("crosschecked", "ranges"),
        ("crosschecked", "read_bytes"),
        ("crosschecked", "read_remote"),
        ("crosschecked", "req"),
        ("error", "req"),
        ("purge", "req"),
        ("purged", "req"),
        ("stage", "idents"),
        ("stage", "req"),
        ("staged", "compressed_bytes"),
        ("staged", "copied_absent"),
        ("staged", "copied_remote"),
        ("staged", "decoded_bytes"),
        ("staged", "encode_cpu_s"),
        ("staged", "peak_rss"),
        ("staged", "placement"),
        ("staged", "req"),
        ("staged", "source_nodes"),
    ]


@pytest.mark.parametrize(("kind", "name"), required_fields())
def test_a_missing_field_is_a_protocol_error_naming_type_and_field(kind: str, name: str) -> None:
    obj = case(kind)
    del obj[name]
    with pytest.raises(ProtocolError, match=rf"^{kind}: field '{name}' is missing$"):
        decode(wire(obj))


def wrong_value(hint: Any) -> object:
    """A value of no type `hint` allows: a number where text is wanted, else text."""
    allowed = typing.get_args(hint) or (hint,)
    return 5 if str in allowed else "x"


@pytest.mark.parametrize(("kind", "name"), all_fields())
def test_a_mistyped_field_is_a_protocol_error_naming_type_and_field(kind: str, name: str) -> None:
    hint = next(f.hint for f in messages._SCHEMAS[TYPES[kind]] if f.name == name)
    obj = case(kind) | {name: wrong_value(hint)}
    if name == "req":  # framing checks req for every message, before its type is known
        with pytest.raises(ProtocolError, match="field 'req' must be an integer"):
            decode(wire(obj))
        return
    with pytest.raises(ProtocolError, match=rf"^{kind}: field '{name}': expected .+, found "):
        decode(wire(obj))


def test_the_error_says_what_was_expected_and_what_was_found() -> None:
    obj = case("staged") | {"bytes": "x"}
    with pytest.raises(ProtocolError) as e:
        decode(wire(obj))
    assert str(e.value) == "staged: field 'bytes': expected int, found 'x'"


@pytest.mark.parametrize(
    ("kind", "name", "value", "expected"),
    [
        ("staged", "bytes", True, "int"),  # a JSON boolean is not a count
        ("staged", "bytes", 1.5, "int"),
        ("staged", "seconds", None, "number"),
        ("staged", "seconds", False, "number"),
        ("staged", "placement", [1], "object or null"),
        ("hello", "node", "0", "int"),
        ("hello", "cpus", [0, "1"], "list of int"),
        ("hello", "models", "slm-1", "list of str"),
        ("hello", "staged_batches", [None], "list of str"),
        ("stage", "files", ["a.parquet", 3], "list of str"),
        ("stage", "idents", {"a.parquet": [1, 2]}, r"object of \[int, int, int\]"),
        ("stage", "idents", {"a.parquet": [1, 2, "3"]}, r"object of \[int, int, int\]"),
        ("stage", "idents", {"a.parquet": [1, 2, 3, 4]}, r"object of \[int, int, int\]"),
        ("stage", "idents", [], r"object of \[int, int, int\]"),
        ("crosschecked", "outputs", {"slm-1": 1}, "object of str"),
        ("crosschecked", "idents", {"slm-1": None}, r"object of \[int, int, int\]"),
        ("aggregated", "summary", [], "object"),
        ("error", "batch_id", 5, "str or null"),
        (
            "error",
            "step",
            "restage",
            "one of 'stage', 'crosscheck', 'aggregate', 'archive', 'purge'",
        ),
        ("error", "step", 1, "one of 'stage'"),
        ("aggregate", "rows_via", "/tmp", "one of 'tmpfs', 'staging'"),
        ("error", "node", None, "int"),
    ],
)
def test_nested_and_subtle_mistypes_are_refused(
    kind: str, name: str, value: object, expected: str
) -> None:
    obj = case(kind) | {name: value}
    with pytest.raises(ProtocolError, match=rf"^{kind}: field '{name}': expected {expected}, "):
        decode(wire(obj))


def test_a_long_value_is_cut_short_in_the_error() -> None:
    obj = case("archived") | {"lake_path": ["p" * 100_000]}
    with pytest.raises(ProtocolError) as e:
        decode(wire(obj))
    assert len(str(e.value)) < 200 and str(e.value).endswith("...")


@pytest.mark.parametrize("kind", ["launch", "Stage", "", "stage "])
def test_an_unknown_type_is_a_protocol_error_naming_it(kind: str) -> None:
    with pytest.raises(ProtocolError, match=f"unknown message type {re.escape(repr(kind))}"):
        decode(wire({"type": kind, "batch_id": "b1"}))
    with pytest.raises(ProtocolError, match=f"unknown message type {re.escape(repr(kind))}"):
        from_dict({"type": kind})


def test_framing_errors_stay_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(b"{")
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Purged(batch_id="x" * MAX_MESSAGE, bytes=0, node=0))


# -- the values the hub and the agent use -------------------------------------------------------


def test_each_request_names_the_reply_it_gets() -> None:
    requests = [cls for cls in TYPES.values() if issubclass(cls, Request)]
    assert sorted(c.TYPE for c in requests) == [
        "aggregate",
        "archive",
        "crosscheck",
        "purge",
        "stage",
    ]
    for cls in requests:
        assert issubclass(cls.REPLY, Reply)
        assert (
            cls.REPLY.TYPE
            == {
                "stage": "staged",
                "crosscheck": "crosschecked",
                "aggregate": "aggregated",
                "archive": "archived",
                "purge": "purged",
            }[cls.TYPE]
        )
        # The type the checker sees (Request[Staged]) is the one the hub checks at run time.
        (base,) = (b for b in cls.__orig_bases__ if typing.get_origin(b) is Request)  # type: ignore[attr-defined]
        assert typing.get_args(base) == (cls.REPLY,)


def test_messages_are_immutable_values() -> None:
    msg = Purge(batch_id="b1")
    with pytest.raises(AttributeError):
        msg.batch_id = "b2"  # type: ignore[misc]
    assert msg == Purge(batch_id="b1") and msg != Purge(batch_id="b1", req=1)


# -- anything at all ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(AGENT_TYPES)),
    st.dictionaries(
        st.sampled_from(sorted({name for _, name in all_fields()} | {"extra"})), json_values
    ),
)
def test_decode_gives_a_message_or_a_protocol_error_for_any_object(
    kind: str, fields: dict[str, Any]
) -> None:
    line = json.dumps({"type": kind, **fields}).encode()
    try:
        msg = decode(line)
    except ProtocolError:
        return
    assert msg.TYPE == kind
    assert decode(encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CASES), st.data())
def test_decode_of_a_valid_message_with_one_field_replaced_never_raises_anything_else(
    case_: tuple[Message, dict[str, Any]], data: st.DataObject
) -> None:
    _, obj = case_
    name = data.draw(st.sampled_from(sorted(obj)))
    obj = obj | {name: data.draw(json_values)}
    try:
        decode(json.dumps(obj).encode())
    except ProtocolError:
        pass


def test_the_iceberg_lake_fields_go_on_the_wire_only_when_set_and_round_trip() -> None:
    """The plain lake's archive and archived keep their wire form; the Iceberg lake's bases,
    summary and commits travel and come back as they were (a pair as a tuple)."""
    plain = messages.Archive(batch_id="b", date="2024-05-01", models=("m",))
    assert b"bases" not in messages.encode(plain) and b"summary" not in messages.encode(plain)
    msg = messages.Archive(
        batch_id="b",
        date="2024-05-01",
        models=("m",),
        bases={"aggregates": "file:///l/a/metadata/00000-x.metadata.json"},
        summary={"rows": 1},
    )
    assert messages.decode(messages.encode(msg)) == msg
    reply = messages.Archived(
        batch_id="b",
        lake_path="batches/date=2024-05-01/batch=b",
        bytes=1,
        seconds=0.5,
        node=0,
        commits={"aggregates": ("file:///old.metadata.json", "file:///new.metadata.json")},
    )
    assert messages.decode(messages.encode(reply)) == reply
    bad = messages.to_dict(reply) | {"commits": {"aggregates": ["only one"]}}
    with pytest.raises(ProtocolError, match="archived: field 'commits'"):
        messages.from_dict(bad)


def test_every_request_type_is_a_step_an_error_can_name() -> None:
    """The agent writes `Error(step=msg.TYPE)` for any request: each request's TYPE must be
    one of StepName's values, or the coordinator could not decode the agent's error."""
    requests = {cls.TYPE for cls in messages.TYPES.values() if issubclass(cls, messages.Request)}
    assert requests == set(typing.get_args(messages.StepName))
