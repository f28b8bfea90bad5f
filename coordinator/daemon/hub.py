"""The coordinator's side of the agents: the agent socket, request/reply, and supervision.

Agents connect to `runtime_dir/agents.sock`, or over TCP with mutual TLS when `agents.listen` is
tcp://HOST:PORT (`serve_tcp`: a certificate that chains to the CA and names the node the hello
claims; refusals are logged and counted in `refused`), and say hello with their node. The hub
pings each agent every `agents.heartbeat_s`; over TCP a connection silent for
`agents.dead_after_s` is closed. `Hub.request` sends a step to a node's agent and waits for its
reply; if the agent goes away mid-step the waiter gets an AgentError and the batch retries the
step once the agent (restarted by `supervise`, or by systemd) is back.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import anyio
import structlog
from anyio.abc import ByteReceiveStream, ByteStream, SocketStream, TaskStatus
from anyio.streams.tls import TLSAttribute

from coordinator.core import tls
from coordinator.core.config import Config
from coordinator.core.errors import AgentError, ConfigError, ProtocolError, error_for_code
from coordinator.core.messages import (
    Error,
    Heartbeat,
    Hello,
    Ping,
    R,
    Reply,
    Request,
    decode,
    encode,
)
from coordinator.core.protocol import LineReader

log = structlog.get_logger("coordinator.daemon.hub")


@dataclass(frozen=True)
class TcpListen:
    """How the hub listens over TCP (agents.listen = tcp://...)."""

    endpoint: tls.Endpoint
    ssl_context: ssl.SSLContext
    cluster: str
    dead_after_s: float  # also the TLS handshake's time limit

    @classmethod
    def from_config(cls, config: Config) -> TcpListen:
        """From the config's [agents] keys; ConfigError naming the file (and its mode, for a
        key others may read) when a TLS file is missing, unreadable or wrong."""
        a = config.agents
        files = tls.Files(
            a.tls_cert,
            a.tls_key,
            a.tls_ca,
            {w: tls.setting_label(config, f"agents.tls_{w}") for w in ("cert", "key", "ca")},
        )
        return cls(
            tls.parse_endpoint(a.listen), tls.server_context(files), a.cluster, a.dead_after_s
        )


@dataclass
class _Pending:
    event: anyio.Event = field(default_factory=anyio.Event)
    reply: Reply | None = None
    error: Exception | None = None


@dataclass
class AgentConn:
    """One connected agent."""

    node: int
    hello: Hello
    stream: ByteStream
    peer: str = "unix"  # host:port over TCP
    connected_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    heartbeat: Heartbeat | None = None  # the latest
    pending: dict[int, _Pending] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def describe(self) -> dict[str, Any]:
        """What status shows about this agent."""
        beat = self.heartbeat
        return {
            "node": self.node,
            "pid": self.hello.pid,
            "cpus": list(self.hello.cpus),
            "mems": list(self.hello.mems),
            "policy": self.hello.policy,
            "connected": True,
            "connected_at": self.connected_at,
            "peer": self.peer,
            "last_heartbeat_age_s": round(time.time() - self.last_heartbeat, 3),
            "tmpfs_used": beat.tmpfs_used if beat is not None else None,
            "tmpfs_free": beat.tmpfs_free if beat is not None else None,
        }


class Hub:
    """Connections to the staging agents, one per node."""

    def __init__(self, *, ping_s: float | None = None) -> None:
        self.agents: dict[int, AgentConn] = {}
        self.ping_s = ping_s  # the keep-alive period (agents.heartbeat_s); None: no pings
        # Connections refused before they became an agent, by reason (status: agents_refused).
        self.refused: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self.restarts: dict[int, int] = {}
        self._connected = anyio.Event()  # set (and renewed) whenever an agent says hello
        # Called with each new connection (the daemon purges leftover copies through it).
        self.on_hello: Callable[[AgentConn], None] | None = None

    async def serve(self, sock_path: Path, *, task_status: TaskStatus[None]) -> None:
        """Listen on the agent socket."""
        await anyio.Path(sock_path).unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(sock_path)
        os.chmod(sock_path, 0o660)
        task_status.started()
        async with listener:
            await listener.serve(self._handle_unix)

    async def serve_tcp(
        self, tcp: TcpListen, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on tcp://HOST:PORT: each connection makes the TLS handshake (within
        `tcp.dead_after_s`), then says hello for a node its certificate names."""
        try:
            listener = await anyio.create_tcp_listener(
                local_host=tcp.endpoint.host, local_port=tcp.endpoint.port
            )
        except OSError as e:
            raise ConfigError(
                f"agents.listen {tcp.endpoint}: cannot listen: {e.strerror or e}"
            ) from e
        log.info("listening for agents", listen=str(tcp.endpoint), cluster=tcp.cluster)
        task_status.started()
        async with listener:
            await listener.serve(lambda stream: self._handle_tcp(stream, tcp))

    def _refuse(self, peer: str, kind: str, why: str, **kw: Any) -> None:
        self.refused[kind] += 1
        log.warning("agent connection refused", peer=peer, reason=kind, why=why, **kw)

    async def _handle_unix(self, stream: SocketStream) -> None:
        await self._session(stream, stream, peer="unix", tcp=None, peercert=None)

    async def _handle_tcp(self, raw: SocketStream, tcp: TcpListen) -> None:
        peer = tls.peer_address(raw)
        try:
            tls.tune_socket(raw, tcp.dead_after_s)
            stream = await tls.accept(raw, tcp.ssl_context, timeout_s=tcp.dead_after_s)
        except Exception as e:
            kind, why = tls.refusal(e)
            self._refuse(peer, kind, why)
            await anyio.aclose_forcefully(raw)
            return
        peercert = stream.extra(TLSAttribute.peer_certificate)
        received = tls.IdleTimeout(stream, tcp.dead_after_s)
        await self._session(stream, received, peer=peer, tcp=tcp, peercert=peercert)

    async def _session(
        self,
        stream: ByteStream,
        received: ByteReceiveStream,
        *,
        peer: str,
        tcp: TcpListen | None,
        peercert: Mapping[str, Any] | None,
    ) -> None:
        """One agent's connection: its hello (over TCP: for a node its certificate names),
        then its heartbeats and replies until it goes away."""
        reader = LineReader(received)
        conn: AgentConn | None = None
        try:
            try:
                line = await reader.readline()
                if line is None:
                    return
                hello = decode(line)
                if not isinstance(hello, Hello):
                    raise ProtocolError(f"expected hello with a node, got {hello.TYPE}")
            except (ProtocolError, OSError, anyio.BrokenResourceError) as e:
                # OSError: over TCP, a dead connection (nothing arrived) or a TLS error.
                self._refuse(peer, "hello", f"no valid hello: {e or type(e).__name__}")
                return
            if tcp is not None:
                why = tls.check_peer(peercert, tls.node_name(hello.node, tcp.cluster))
                if why is not None:
                    self._refuse(peer, "name", f"claims node {hello.node}: {why}", node=hello.node)
                    return
            conn = AgentConn(node=hello.node, hello=hello, stream=stream, peer=peer)
            old = self.agents.get(conn.node)
            if old is not None:
                self._fail_pending(old, "replaced by a new connection")
                await old.stream.aclose()
            self.agents[conn.node] = conn
            self._connected.set()
            self._connected = anyio.Event()
            if self.on_hello is not None:
                self.on_hello(conn)
            log.info(
                "agent connected",
                node=conn.node,
                pid=hello.pid,
                cpus=list(hello.cpus),
                mems=list(hello.mems),
                peer=peer,
            )
            async with anyio.create_task_group() as tg:
                if self.ping_s:
                    tg.start_soon(self._ping, conn, self.ping_s)
                await self._receive(conn, reader)
                tg.cancel_scope.cancel()
        finally:
            if conn is not None:
                if self.agents.get(conn.node) is conn:
                    del self.agents[conn.node]
                self._fail_pending(conn, "disconnected")
                log.warning("agent disconnected", node=conn.node, peer=peer)
            await anyio.aclose_forcefully(stream)

    async def _receive(self, conn: AgentConn, reader: LineReader) -> None:
        """Heartbeats and replies until the agent goes away (or falls silent over TCP)."""
        try:
            while (line := await reader.readline()) is not None:
                match decode(line):
                    case Heartbeat() as beat:
                        conn.last_heartbeat = time.time()
                        conn.heartbeat = beat
                    case Reply(req=int(req)) as reply if req in conn.pending:
                        pending = conn.pending.pop(req)
                        pending.reply = reply
                        pending.event.set()
                    case msg:
                        # A late reply (after a timeout), or one that answers nothing.
                        log.warning("reply to no request", node=conn.node, msg_type=msg.TYPE)
        except ProtocolError as e:
            log.error("bad message from agent", node=conn.node, error=str(e))
        except tls.DeadConnection as e:
            log.warning(
                "agent connection dead; closing it", node=conn.node, peer=conn.peer, why=str(e)
            )
        except (OSError, anyio.BrokenResourceError) as e:
            log.warning("agent connection failed", node=conn.node, peer=conn.peer, error=repr(e))

    async def _ping(self, conn: AgentConn, every_s: float) -> None:
        """A keep-alive to the agent every `every_s` seconds, the first one at once: over TCP
        the agent closes a connection on which nothing arrived for agents.dead_after_s."""
        while True:
            try:
                async with conn.lock:
                    await conn.stream.send(encode(Ping(time=time.time())))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # the receiving side sees the end and closes the connection
            await anyio.sleep(every_s)

    def _fail_pending(self, conn: AgentConn, why: str) -> None:
        for p in conn.pending.values():
            p.error = AgentError(f"agent on node {conn.node} {why} during the step")
            p.event.set()
        conn.pending.clear()

    async def wait_for(self, node: int, within_s: float) -> AgentConn:
        """The node's agent, waiting up to `within_s` seconds for it to connect."""
        with anyio.move_on_after(within_s):
            while node not in self.agents:
                await self._connected.wait()
        conn = self.agents.get(node)
        if conn is None:
            raise AgentError(f"no agent for node {node} connected within {within_s:.0f} s")
        return conn

    async def request(self, node: int, msg: Request[R], *, within_s: float) -> R:
        """Send a step to the node's agent and return its reply; AgentError if it fails or
        no reply comes within `within_s` seconds, the error its code names (errors.ERROR_CODES)
        if the agent answers with one, ProtocolError if it answers with another type."""
        timeout = within_s
        conn = await self.wait_for(node, timeout)
        req = next(self._ids)
        pending = _Pending()
        conn.pending[req] = pending
        try:
            async with conn.lock:
                await conn.stream.send(encode(replace(msg, req=req)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            conn.pending.pop(req, None)
            raise AgentError(f"agent on node {node}: send failed: {e}") from e
        with anyio.move_on_after(timeout) as scope:
            await pending.event.wait()
        if scope.cancelled_caught:
            conn.pending.pop(req, None)
            raise AgentError(f"agent on node {node}: no reply to {msg.TYPE} in {timeout:.0f} s")
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        assert reply is not None
        if isinstance(reply, Error):
            text = f"agent on node {node}: {msg.TYPE} failed: {reply.message}"
            raise error_for_code(reply.code)(text)
        if not isinstance(reply, msg.REPLY):
            raise ProtocolError(f"agent on node {node}: {msg.TYPE} answered with {reply.TYPE}")
        return cast(R, reply)  # checked just above: an instance of the request's REPLY

    def describe(self, nodes: tuple[int, ...]) -> list[dict[str, Any]]:
        """Status of every configured node's agent."""
        out = []
        for n in nodes:
            conn = self.agents.get(n)
            d = conn.describe() if conn else {"node": n, "connected": False}
            d["restarts"] = self.restarts.get(n, 0)
            out.append(d)
        return out


def check_agent_tls(config: Config) -> None:
    """Under --with-agents over TCP: every node's agent has a certificate and a key it may use
    (ConfigError naming the file otherwise), checked at start rather than in a restart loop."""
    for node in config.node_ids:
        tls.client_context(tls.agent_files(config, node))


def agent_command(config: Config, config_path: Path, node: int) -> list[str]:
    """The command line that starts node `node`'s agent bound to its memory and CPUs."""
    cpus = config.node(node).cpus
    cpu_arg = f"--physcpubind={cpus}" if cpus else f"--cpunodebind={node}"
    return [
        config.agents.numactl,
        f"--membind={node}",
        cpu_arg,
        sys.executable,
        "-m",
        "agents.agent",
        "--node",
        str(node),
        "--config",
        str(config_path),
        "--parent-pid",
        str(os.getpid()),
    ]


async def supervise(
    hub: Hub, config: Config, config_path: Path, node: int, *, task_status: TaskStatus[None]
) -> None:
    """Run node `node`'s agent under numactl and restart it whenever it exits (--with-agents)."""
    cmd = agent_command(config, config_path, node)
    started = False
    delay = 0.2
    while True:
        t0 = time.monotonic()
        proc = await anyio.open_process(cmd, stdin=None, stdout=None, stderr=None)
        log.info("agent started", node=node, pid=proc.pid, cmd=" ".join(cmd))
        if not started:
            task_status.started()
            started = True
        try:
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                with anyio.CancelScope(shield=True):
                    proc.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(5):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
        hub.restarts[node] = hub.restarts.get(node, 0) + 1
        if time.monotonic() - t0 > 10:
            delay = 0.2
        log.warning("agent exited, restarting", node=node, rc=rc, restart_in_s=delay)
        await anyio.sleep(delay)
        delay = min(delay * 2, 10.0)
