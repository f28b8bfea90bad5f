"""The line-delimited JSON wire format: encode/decode and the framed reader."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.errors import ProtocolError
from coordinator.core.protocol import AGENT_TYPES, MAX_MESSAGE, LineReader, decode, encode


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- encode / decode -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "hello", "node": 0, "binding": {"policy": "bind", "mems": [0]}},
        {"type": "stage", "req": 7, "batch_id": "b-1", "files": ["slm-1.parquet"]},
        {"type": "error", "req": 0, "message": "line one\nline two \u00e9 \u2603"},
        {"type": "heartbeat", "score": 0.25, "ok": True, "none": None},
    ],
)
def test_encode_then_decode_round_trips(msg: dict[str, Any]) -> None:
    line = encode(msg)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # embedded newlines are escaped: one message, one line
    assert decode(line, types=AGENT_TYPES) == msg


def test_encode_refuses_a_message_over_the_limit() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"type": "stage", "blob": "x" * MAX_MESSAGE})


def test_decode_accepts_a_line_without_its_newline() -> None:
    assert decode(b'{"type":"purge","req":3}') == {"type": "purge", "req": 3}


def test_decode_reads_the_kind_from_another_key_when_told() -> None:
    assert decode(b'{"op":"status","req":1}', key="op") == {"op": "status", "req": 1}
    with pytest.raises(ProtocolError, match="'op'"):
        decode(b'{"type":"status"}', key="op")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json", "not JSON"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b'{"type": "hello"', "not JSON"),
        (b"\xff\xfe\xfa", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"hello"', "expected a JSON object"),
        (b"42", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b"{}", "no string field 'type'"),
        (b'{"req": 1}', "no string field 'type'"),
        (b'{"type": 3}', "no string field 'type'"),
        (b'{"type": null}', "no string field 'type'"),
        (b'{"type": "hello", "req": "1"}', "'req' must be an integer"),
        (b'{"type": "hello", "req": true}', "'req' must be an integer"),
        (b'{"type": "hello", "req": 1.5}', "'req' must be an integer"),
    ],
)
def test_decode_says_what_is_wrong(line: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(line, types=AGENT_TYPES)


def test_decode_refuses_an_unknown_type_only_when_types_are_given() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 'launch'"):
        decode(b'{"type":"launch"}', types=AGENT_TYPES)
    assert decode(b'{"type":"launch"}') == {"type": "launch"}


def test_decode_refuses_an_oversize_line_before_parsing_it() -> None:
    line = encode({"type": "hello", "pad": "x" * (MAX_MESSAGE - 100)})[:-1]
    assert len(line) <= MAX_MESSAGE
    assert decode(line)["type"] == "hello"
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b" " * (MAX_MESSAGE - len(line) + 1) + line)


def test_decode_refuses_deeply_nested_json_with_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode(b"[" * 200_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_raises_nothing_but_protocol_error_on_arbitrary_bytes(data: bytes) -> None:
    try:
        msg = decode(data, types=AGENT_TYPES)
    except ProtocolError:
        return
    assert isinstance(msg, dict) and msg["type"] in AGENT_TYPES


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode())
)
def test_decode_raises_nothing_but_protocol_error_on_arbitrary_json(data: bytes) -> None:
    try:
        decode(data, types=AGENT_TYPES)
    except ProtocolError:
        pass


# --- LineReader ----------------------------------------------------------------------------


class ChunkStream(ByteReceiveStream):
    """A byte stream fed from a memory object stream, one chunk per item, honouring max_bytes."""

    def __init__(self, chunks: MemoryObjectReceiveStream[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.pending:
            self.pending = await self.chunks.receive()  # EndOfStream when the sender closes
        out, self.pending = self.pending[:max_bytes], self.pending[max_bytes:]
        return out

    async def aclose(self) -> None:
        await self.chunks.aclose()


async def read_all(chunks: Iterable[bytes]) -> list[bytes]:
    """Feed `chunks` through a LineReader and return every line until end of stream."""
    send, receive = anyio.create_memory_object_stream[bytes](1000)
    async with send:
        for c in chunks:
            send.send_nowait(c)
    async with receive:
        reader = LineReader(ChunkStream(receive))
        lines = []
        while (line := await reader.readline()) is not None:
            lines.append(line)
    return lines


@pytest.mark.anyio
async def test_line_reader_splits_lines_within_one_chunk() -> None:
    assert await read_all([b"one\ntwo\n\nthree\n"]) == [b"one", b"two", b"", b"three"]


@pytest.mark.anyio
async def test_line_reader_joins_a_line_split_across_chunks() -> None:
    data = encode({"type": "hello", "req": 1}) + encode({"type": "staged", "req": 1})
    chunks = [data[i : i + 1] for i in range(len(data))]  # one byte at a time
    lines = await read_all(chunks)
    assert [decode(line) for line in lines] == [
        {"type": "hello", "req": 1},
        {"type": "staged", "req": 1},
    ]


@pytest.mark.anyio
async def test_line_reader_returns_none_at_end_of_stream() -> None:
    # A trailing fragment without its newline is not a message.
    assert await read_all([b"whole\npart"]) == [b"whole"]
    assert await read_all([]) == []


@pytest.mark.anyio
async def test_line_reader_refuses_a_line_that_never_ends() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1000)
    async with send:
        for _ in range(MAX_MESSAGE // 65536 + 2):
            send.send_nowait(b"x" * 65536)
    reader = LineReader(ChunkStream(receive))
    with pytest.raises(ProtocolError, match="longer than"):
        await reader.readline()
    await receive.aclose()


@pytest.mark.anyio
async def test_line_reader_passes_a_line_of_exactly_the_limit() -> None:
    line = b"y" * MAX_MESSAGE
    assert await read_all([line[:700_000], line[700_000:] + b"\nnext\n"]) == [line, b"next"]


@pytest.mark.anyio
async def test_line_reader_refuses_a_line_just_over_the_limit() -> None:
    line = b"z" * (MAX_MESSAGE + 1000)
    with pytest.raises(ProtocolError):
        await read_all([line[: MAX_MESSAGE - 10], line[MAX_MESSAGE - 10 :] + b"\n"])


@pytest.mark.anyio
async def test_line_reader_over_a_real_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "p.sock"
    messages = [{"type": "heartbeat", "req": i, "pad": "p" * (i * 5000)} for i in range(40)]
    got: list[dict[str, Any]] = []
    listener = await anyio.create_unix_listener(path)
    async with listener:

        async def serve() -> None:
            conn = await listener.accept()
            async with conn:
                reader = LineReader(conn)
                while (line := await reader.readline()) is not None:
                    got.append(decode(line, types=AGENT_TYPES))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                client = await anyio.connect_unix(path)
                async with client:
                    await client.send(b"".join(encode(m) for m in messages))
    assert got == messages
