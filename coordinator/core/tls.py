"""The agent protocol over TCP with mutual TLS (docs/protocol.md §3, "The TCP transport").

Shared by the coordinator (`daemon.hub`) and the agents (`agents.agent`): where to connect
(`Endpoint`, parsed from `tcp://HOST:PORT`), the TLS contexts of both sides (TLS 1.2 or later,
a certificate required of both, both chained to the one configured CA), the check that a key
file is not readable by others, the names in certificates (`node-<N>.<cluster>` for an agent,
`coordinator.<cluster>` for the coordinator), and dead connections: TCP keep-alive and
TCP_USER_TIMEOUT on the socket, and `IdleTimeout`, which ends a connection on which nothing
arrived for `agents.dead_after_s` (a peer that vanished without a FIN).

Every error about a file is a ConfigError naming the file and where it was set.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, ByteStream, SocketAttribute
from anyio.streams.tls import TLSStream

from coordinator.core.config import LISTEN_RE, Config, locate
from coordinator.core.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2
# A key file with any of these permission bits is refused: group write or execute, or any
# permission for others (0600 and 0640 pass).
KEY_MODE_FORBIDDEN = 0o037


@dataclass(frozen=True)
class Endpoint:
    """A TCP address of the coordinator: host (a name or an IP address) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_endpoint(value: str) -> Endpoint:
    """`tcp://HOST:PORT` (HOST a name, an IPv4 address or [IPv6]) as an Endpoint; ValueError
    saying what was expected otherwise."""
    m = LISTEN_RE.fullmatch(value)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        raise ValueError(f"expected tcp://HOST:PORT with a port 1..65535, found {value!r}")
    return Endpoint(m.group("host").strip("[]"), int(m.group("port")))


def node_name(node: int, cluster: str) -> str:
    """The name an agent's certificate must carry for node `node`."""
    return f"node-{node}.{cluster}"


def coordinator_name(cluster: str) -> str:
    """The name the coordinator's certificate must carry (the agents' server_hostname)."""
    return f"coordinator.{cluster}"


def setting_label(cfg: Config, key: str) -> str:
    """How an error names config key `key`: the file (and line) that set it, and the key."""
    return f"{locate(cfg.provenance.get(key, '<defaults>'), key)}: {key}"


# -- files -------------------------------------------------------------------------------------


def check_readable(path: str, label: str) -> None:
    """ConfigError naming `label` and `path` unless `path` is a regular file we can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{label} = {path}: cannot read: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{label} = {path}: not a regular file")
    finally:
        os.close(fd)


def check_key_mode(path: str, label: str) -> None:
    """Refuse a private key file that others may read (mode & 0o037): ConfigError naming the
    file and its mode. 0600 and 0640 pass."""
    check_readable(path, label)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & KEY_MODE_FORBIDDEN:
        raise ConfigError(
            f"{label} = {path}: the private key has mode {mode:04o}, readable or writable "
            f"beyond its owner and group; refusing to use it (chmod 0600, or 0640 for the "
            "service's group)"
        )


@dataclass(frozen=True)
class Files:
    """The PEM files of one side, and how errors name each (a config key or a flag)."""

    cert: str
    key: str
    ca: str
    labels: Mapping[str, str]  # "cert", "key", "ca" -> e.g. "coordinator.toml:12: agents.tls_cert"

    def label(self, which: str) -> str:
        return self.labels.get(which, which)


def agent_files(
    cfg: Config,
    node: int,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
) -> Files:
    """Node `node`'s agent's files: those given (staging-agent's --tls-cert, --tls-key,
    --tls-ca), else agents.agent_tls_cert, agents.agent_tls_key and agents.tls_ca, with
    `{node}` replaced by the node."""
    a = cfg.agents
    chosen: dict[str, str] = {}
    labels: dict[str, str] = {}
    for which, given, key_name in (
        ("cert", cert, "agents.agent_tls_cert"),
        ("key", key, "agents.agent_tls_key"),
        ("ca", ca, "agents.tls_ca"),
    ):
        if given is not None:
            chosen[which], labels[which] = given, f"--tls-{which}"
        else:
            value = {"cert": a.agent_tls_cert, "key": a.agent_tls_key, "ca": a.tls_ca}[which]
            chosen[which], labels[which] = value, setting_label(cfg, key_name)
        chosen[which] = chosen[which].replace("{node}", str(node))
    return Files(chosen["cert"], chosen["key"], chosen["ca"], labels)


def _context(purpose: int, files: Files) -> ssl.SSLContext:
    for which in ("cert", "key", "ca"):
        if not getattr(files, which):
            raise ConfigError(f"{files.label(which)}: a file is required for TLS, none is set")
    check_readable(files.cert, files.label("cert"))
    check_key_mode(files.key, files.label("key"))
    check_readable(files.ca, files.label("ca"))
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(
            f"{files.label('ca')} = {files.ca}: not a PEM CA certificate: {e}"
        ) from None
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        raise ConfigError(
            f"{files.label('cert')} = {files.cert}, {files.label('key')} = {files.key}: "
            f"not a PEM certificate and its private key: {e}"
        ) from None
    return ctx


def server_context(files: Files) -> ssl.SSLContext:
    """The coordinator's context: its own certificate, and a certificate required of every
    agent, chained to the CA. The agent's name is checked after its hello (`check_peer`)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: Files) -> ssl.SSLContext:
    """An agent's context: its own certificate, and the coordinator's certificate checked
    against the CA and, through server_hostname, the name `coordinator.<cluster>`."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx


# -- names in certificates ---------------------------------------------------------------------


def cert_names(peercert: Mapping[str, Any] | None) -> list[str]:
    """The names a certificate (`getpeercert()`'s form) carries: its DNS subject alternative
    names, or, when it has no subject alternative name at all, its subject's common name."""
    if not peercert:
        return []
    sans = peercert.get("subjectAltName") or ()
    if sans:
        return [value for kind, value in sans if kind == "DNS"]
    subject = peercert.get("subject", ())
    return [value for rdn in subject for key, value in rdn if key == "commonName"]


def check_peer(peercert: Mapping[str, Any] | None, expected: str) -> str | None:
    """None when the certificate names `expected` exactly (no wildcards), else why not."""
    names = cert_names(peercert)
    if any(n.lower() == expected.lower() for n in names):
        return None
    return f"the certificate names {names or 'nothing'}, not {expected!r}"


# -- refusals ----------------------------------------------------------------------------------


def refusal(exc: BaseException) -> tuple[str, str]:
    """(kind, why) of a TLS handshake that failed with `exc`: `certificate` (no certificate, or
    one that does not verify: another CA, expired, ...), `not_tls` (plaintext or garbage),
    `timeout`, `closed` (the peer went away mid-handshake) or `tls` (anything else, such as an
    alert from the peer: it refused our certificate)."""
    if isinstance(exc, TimeoutError):
        return "timeout", "the TLS handshake did not complete in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        text = exc.reason or str(exc)
        if "ALERT" in reason:  # the peer ended the handshake: it refused our certificate, say
            return "tls", f"the peer ended the handshake: {text.lower().replace('_', ' ')}"
        if "CERTIFICATE" in reason:
            return "certificate", text.lower().replace("_", " ")
        if reason in {
            "WRONG_VERSION_NUMBER",
            "HTTP_REQUEST",
            "HTTPS_PROXY_REQUEST",
            "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG",
            "UNEXPECTED_MESSAGE",
            "RECORD_LENGTH_MISMATCH",
            "LENGTH_MISMATCH",
        }:
            return "not_tls", f"not a TLS client hello ({text})"
        return "tls", text
    if isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError | OSError):
        return "closed", f"the connection closed during the TLS handshake ({type(exc).__name__})"
    return "tls", f"{type(exc).__name__}: {exc}"


# -- sockets and dead connections --------------------------------------------------------------


def peer_address(stream: Any) -> str:
    """`host:port` of a socket stream's peer, or '?' when it has none."""
    try:
        addr = stream.extra(SocketAttribute.remote_address)
    except Exception:
        return "?"
    if isinstance(addr, tuple):
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr) or "?"


def tune_socket(stream: Any, dead_after_s: float) -> None:
    """TCP keep-alive and TCP_USER_TIMEOUT, so the kernel too gives up on a peer that is gone
    after about `dead_after_s` (a belt beside `IdleTimeout`)."""
    try:
        sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    except Exception:
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(dead_after_s / 2))
    interval = max(1, int(dead_after_s / 6))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_after_s * 1000)),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


class DeadConnection(TimeoutError):
    """Nothing arrived on a connection for `dead_after_s` seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"nothing arrived for {seconds:g} s")
        self.seconds = seconds


class IdleTimeout(ByteReceiveStream):
    """`stream`'s receiving side that raises DeadConnection when nothing arrives for
    `seconds`: a half-open connection (the peer vanished without a FIN) ends here."""

    def __init__(self, stream: ByteStream, seconds: float) -> None:
        self.stream = stream
        self.seconds = seconds

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with anyio.move_on_after(self.seconds) as scope:
            return await self.stream.receive(max_bytes)
        assert scope.cancelled_caught
        raise DeadConnection(self.seconds)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def accept(stream: ByteStream, ctx: ssl.SSLContext, *, timeout_s: float) -> TLSStream:
    """The server side of the handshake on an accepted connection, within `timeout_s`
    (TimeoutError otherwise); the TLS close handshake is not required of the peer."""
    with anyio.fail_after(timeout_s):
        return await TLSStream.wrap(
            stream, server_side=True, ssl_context=ctx, standard_compatible=False
        )


async def connect(
    endpoint: Endpoint, ctx: ssl.SSLContext, cluster: str, *, dead_after_s: float
) -> TLSStream:
    """Connect to the coordinator at `endpoint` and make the TLS handshake within
    `dead_after_s`, checking its certificate names `coordinator.<cluster>` (so an IP address,
    such as QEMU's 10.0.2.2, works as the host)."""
    with anyio.fail_after(dead_after_s):
        raw = await anyio.connect_tcp(endpoint.host, endpoint.port)
    try:
        tune_socket(raw, dead_after_s)
        with anyio.fail_after(dead_after_s):
            return await TLSStream.wrap(
                raw,
                server_side=False,
                hostname=coordinator_name(cluster),
                ssl_context=ctx,
                standard_compatible=False,
            )
    except BaseException:
        await anyio.aclose_forcefully(raw)
        raise
