"""The hub against a scripted agent on a real Unix socket: typed requests, typed replies, and
each error code raised as the exception the table names."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from coordinator.core.errors import (
    ERROR_CODES,
    AgentError,
    CoordinatorError,
    NoSpaceError,
    ParquetError,
    ProtocolError,
)
from coordinator.core.messages import (
    Heartbeat,
    Hello,
    Ping,
    Purge,
    Stage,
    Staged,
    decode,
    encode,
)
from coordinator.core.protocol import LineReader
from coordinator.daemon.hub import Hub


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


HELLO = Hello(
    node=0,
    pid=4711,
    version="0",
    models=("slm-1",),
    tmpfs="/dev/shm/x/node0",
    staged_batches=("old-1",),
    policy="bind",
    mems=(0,),
    cpus=(0, 1),
)

# What the fake agent answers to a request's JSON object: lines of bytes to send back.
Answer = Callable[[dict[str, Any]], list[bytes]]


@dataclass
class Rig:
    hub: Hub
    seen: list[dict[str, Any]]  # the requests as the agent received them, one JSON object each
    answer: list[Answer]  # set [0] to change how the agent answers


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    hub = Hub()
    sock = tmp_path / "agents.sock"
    r = Rig(hub, [], [lambda req: []])

    async def agent(stream: SocketStream) -> None:
        reader = LineReader(stream)
        while (line := await reader.readline()) is not None:
            req = json.loads(line)
            r.seen.append(req)
            for out in r.answer[0](req):
                await stream.send(out)

    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve, sock)
        async with await anyio.connect_unix(sock) as stream:
            await stream.send(encode(HELLO))
            await hub.wait_for(0, 5.0)
            tg.start_soon(agent, stream)
            yield r
            tg.cancel_scope.cancel()


def staged(request: dict[str, Any], **over: Any) -> bytes:
    """A `staged` reply to `request` as the agent writes it, with fields replaced by `over`."""
    obj = {
        "type": "staged",
        "batch_id": request["batch_id"],
        "bytes": 10,
        "seconds": 0.5,
        "files": {},
        "tmpfs_free": 100,
        "req": request["req"],
        "node": 0,
    }
    return json.dumps({**obj, **over}).encode() + b"\n"


async def within(aw: Awaitable[Any]) -> Any:
    with anyio.fail_after(5):
        return await aw


@pytest.mark.anyio
async def test_a_request_goes_out_as_today_and_its_reply_comes_back_typed(rig: Rig) -> None:
    rig.answer[0] = lambda req: [staged(req)]
    msg = Stage(batch_id="b1", files=("slm-1.parquet",), idents={"slm-1.parquet": (1, 2, 3)})
    reply = await within(rig.hub.request(0, msg, within_s=5))
    assert isinstance(reply, Staged)
    assert (reply.bytes, reply.seconds, reply.placement) == (10, 0.5, None)
    [sent] = rig.seen
    assert list(sent) == ["type", "batch_id", "files", "idents", "req"]
    assert sent["idents"] == {"slm-1.parquet": [1, 2, 3]} and isinstance(sent["req"], int)
    assert reply.req == sent["req"]


@pytest.mark.anyio
async def test_the_hello_and_heartbeats_are_kept_typed(rig: Rig) -> None:
    conn = rig.hub.agents[0]
    assert conn.hello == HELLO
    assert conn.hello.staged_batches == ("old-1",)  # what the daemon's purge reads
    d = rig.hub.describe((0, 1))
    assert d[0]["pid"] == 4711 and d[0]["cpus"] == [0, 1] and d[0]["tmpfs_free"] is None
    assert d[1] == {"node": 1, "connected": False, "restarts": 0}
    beat = Heartbeat(node=0, time=1.0, tmpfs_used=5, tmpfs_free=6)
    rig.answer[0] = lambda req: [encode(beat), staged(req)]
    await within(rig.hub.request(0, Stage(batch_id="b1", files=()), within_s=5))
    assert conn.heartbeat == beat
    assert rig.hub.describe((0,))[0]["tmpfs_free"] == 6


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("nospace", NoSpaceError),
        ("invalid", ParquetError),
        ("failed", AgentError),
        ("?", AgentError),
    ],
)
@pytest.mark.anyio
async def test_an_error_reply_raises_what_its_code_names(
    rig: Rig, code: str, raised: type[CoordinatorError]
) -> None:
    def error(req: dict[str, Any]) -> list[bytes]:
        obj = {
            "type": "error",
            "step": req["type"],
            "code": code,
            "message": "it broke",
            "batch_id": req["batch_id"],
            "req": req["req"],
            "node": 0,
        }
        return [json.dumps(obj).encode() + b"\n"]

    rig.answer[0] = error
    with pytest.raises(raised) as e:
        await within(rig.hub.request(0, Purge(batch_id="b1"), within_s=5))
    assert type(e.value) is raised
    assert str(e.value) == "agent on node 0: purge failed: it broke"
    assert code == "?" or raised is {r.code: r.raised_as for r in ERROR_CODES}[code]


@pytest.mark.anyio
async def test_a_reply_of_another_type_is_a_protocol_error(rig: Rig) -> None:
    rig.answer[0] = lambda req: [staged(req)]
    with pytest.raises(ProtocolError, match="agent on node 0: purge answered with staged"):
        await within(rig.hub.request(0, Purge(batch_id="b1"), within_s=5))


@pytest.mark.anyio
async def test_a_malformed_reply_drops_the_agent_and_fails_the_step(rig: Rig) -> None:
    rig.answer[0] = lambda req: [staged(req, bytes="x")]
    with pytest.raises(AgentError, match="agent on node 0 disconnected during the step"):
        await within(rig.hub.request(0, Stage(batch_id="b1", files=()), within_s=5))
    assert 0 not in rig.hub.agents


@pytest.mark.anyio
async def test_a_reply_to_no_request_is_ignored(rig: Rig) -> None:
    def late_then_real(req: dict[str, Any]) -> list[bytes]:
        return [staged(req, req=req["req"] + 1000), staged(req, req=None), staged(req)]

    rig.answer[0] = late_then_real
    reply = await within(rig.hub.request(0, Stage(batch_id="b1", files=()), within_s=5))
    assert reply.req == rig.seen[0]["req"]
    assert 0 in rig.hub.agents


@pytest.mark.anyio
async def test_the_hub_pings_each_agent_at_once_and_then_every_period(tmp_path: Path) -> None:
    hub = Hub(ping_s=0.2)
    sock = tmp_path / "agents.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve, sock)
        async with await anyio.connect_unix(sock) as stream:
            await stream.send(encode(HELLO))
            reader = LineReader(stream)
            t0 = anyio.current_time()
            times = []
            for _ in range(3):
                line = await within(reader.readline())
                assert line is not None
                assert isinstance(decode(line), Ping)
                times.append(anyio.current_time() - t0)
            assert times[0] < 0.15  # the first at once, after the hello is accepted
            assert 0.35 < times[2] < 1.5
            tg.cancel_scope.cancel()  # before the close: anyio's Unix stream races a cancel


@pytest.mark.anyio
async def test_a_first_line_that_is_not_a_hello_is_refused_and_counted(tmp_path: Path) -> None:
    hub = Hub(ping_s=0.2)
    sock = tmp_path / "agents.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(hub.serve, sock)
        beat = encode(Heartbeat(node=0, time=1.0, tmpfs_used=0, tmpfs_free=0))
        for line in (b"nonsense\n", beat):
            async with await anyio.connect_unix(sock) as stream:
                await stream.send(line)
                assert await within(LineReader(stream).readline()) is None  # closed, no ping
        assert hub.refused == {"hello": 2} and hub.agents == {}
        tg.cancel_scope.cancel()
