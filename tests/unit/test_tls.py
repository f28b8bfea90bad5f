"""coordinator.core.tls: endpoints, the [agents] TLS keys, key-file modes, the TLS contexts
and the names in certificates, with certificates made here by trustme and real handshakes over
real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from anyio.abc import SocketStream
from anyio.streams.tls import TLSAttribute, TLSStream

from coordinator.core import tls
from coordinator.core.config import load_config
from coordinator.core.errors import ConfigError


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- endpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("tcp://127.0.0.1:7411", "127.0.0.1", 7411),
        ("tcp://coordinator.example:1", "coordinator.example", 1),
        ("tcp://[::1]:65535", "::1", 65535),
        ("tcp://10.0.2.2:7411", "10.0.2.2", 7411),
    ],
)
def test_an_endpoint_parses_and_prints_back(text: str, host: str, port: int) -> None:
    ep = tls.parse_endpoint(text)
    assert (ep.host, ep.port) == (host, port)
    assert str(ep) == text


@pytest.mark.parametrize(
    "text",
    [
        "unix",
        "tcp://host",
        "tcp://host:0",
        "tcp://host:65536",
        "tcp://:7411",
        "http://host:7411",
        "tcp://host:7411/x",
        "tcp://ho st:7411",
        "host:7411",
    ],
)
def test_a_bad_endpoint_says_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected tcp://HOST:PORT with a port 1\.\.65535"):
        tls.parse_endpoint(text)


# -- the [agents] keys -------------------------------------------------------------------------


def config_file(tmp_path: Path, agents: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text("[agents]\n" + agents)
    return path


@pytest.mark.parametrize(
    "listen", ["tcp://h:0", "tcp://h:70000", "tcp://h", "udp://h:1", "TCP://h:1", "", "Unix"]
)
def test_a_bad_listen_is_a_config_error_naming_file_line_and_key(
    tmp_path: Path, listen: str
) -> None:
    path = config_file(tmp_path, f'listen = "{listen}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}:2: agents.listen: expected unix or tcp://HOST:PORT with a port 1..65535, "
        f"found {listen!r}"
    )


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_ca"])
def test_a_tcp_listen_without_each_tls_file_is_a_config_error(tmp_path: Path, missing: str) -> None:
    keys = "".join(f'{k} = "{k}.pem"\n' for k in ("tls_cert", "tls_key", "tls_ca") if k != missing)
    path = config_file(tmp_path, 'listen = "tcp://127.0.0.1:7411"\n' + keys)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(
        f"{path}:2: agents.listen = 'tcp://127.0.0.1:7411' needs agents.{missing} ("
    )
    assert str(e.value).endswith("plaintext TCP is never offered")


def test_a_tcp_listen_with_its_files_loads_with_paths_resolved(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        'listen = "tcp://[::1]:7411"\ntls_cert = "tls/c.pem"\ntls_key = "/k.pem"\n'
        'tls_ca = "ca.pem"\nagent_tls_cert = "n{node}.pem"\ncluster = "prod.example"\n',
    )
    a = load_config(path).agents
    assert a.listen == "tcp://[::1]:7411"
    assert (a.tls_cert, a.tls_key, a.tls_ca) == (
        str(tmp_path / "tls/c.pem"),
        "/k.pem",
        str(tmp_path / "ca.pem"),
    )
    assert a.agent_tls_cert == str(tmp_path / "n{node}.pem") and a.agent_tls_key == ""
    assert a.cluster == "prod.example"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dead_after_s = 2\n", "agents.dead_after_s: expected a number > agents.heartbeat_s (2)"),
        ("heartbeat_s = 5\ndead_after_s = 4\n", "expected a number > agents.heartbeat_s (5)"),
        ('cluster = "Big Cluster"\n', "agents.cluster: expected a DNS name in lower case"),
        ("reconnect_max_s = 0\n", "agents.reconnect_max_s: expected a number > 0"),
        ("tls_key = 3\n", "agents.tls_key: expected a file path, found 3"),
    ],
)
def test_other_bad_agents_keys_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(config_file(tmp_path, text))


# -- files and key modes -----------------------------------------------------------------------


@dataclass
class Pki:
    """A CA, and files of certificates it (or another CA) issued, written under `root`."""

    root: Path
    ca: trustme.CA

    def write(self, name: str, *identities: str, ca: trustme.CA | None = None, **kw: Any) -> Any:
        cert = (ca or self.ca).issue_cert(*identities, **kw)
        pem, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(pem)
        cert.private_key_pem.write_to_path(key)
        key.chmod(0o600)
        return pem, key

    @property
    def ca_file(self) -> Path:
        path = self.root / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(path)
        return path

    def files(self, name: str) -> tls.Files:
        pem, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        return tls.Files(str(pem), str(key), str(self.ca_file), {})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("pki"), trustme.CA())
    p.write("coordinator", "coordinator.numa")
    p.write("node0", "node-0.numa")
    p.write("other-ca-node0", "node-0.numa", ca=trustme.CA())
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    p.write(
        "expired-node0",
        "node-0.numa",
        not_before=yesterday - datetime.timedelta(days=30),
        not_after=yesterday,
    )
    p.write("wrong-name-coordinator", "coordinator.elsewhere")
    return p


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440, 0o700])
def test_a_key_readable_only_by_owner_and_group_passes(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "k.key"
    key.write_text("x")
    key.chmod(mode)
    tls.check_key_mode(str(key), "agents.tls_key")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o650, 0o601, 0o666, 0o620])
def test_a_key_others_may_read_or_the_group_may_write_is_refused_naming_file_and_mode(
    tmp_path: Path, mode: int
) -> None:
    key = tmp_path / "k.key"
    key.write_text("x")
    key.chmod(mode)
    with pytest.raises(ConfigError) as e:
        tls.check_key_mode(str(key), "c.toml:3: agents.tls_key")
    assert str(e.value).startswith(
        f"c.toml:3: agents.tls_key = {key}: the private key has mode {mode:04o}, "
    )
    assert "chmod 0600" in str(e.value)


def test_missing_and_unreadable_files_are_named(tmp_path: Path, pki: Pki) -> None:
    f = pki.files("node0")
    labels = {"cert": "--tls-cert", "key": "c.toml:4: agents.agent_tls_key", "ca": "--tls-ca"}
    gone = str(tmp_path / "gone.pem")
    for which, label in labels.items():
        files = tls.Files(**{**vars(f), which: gone, "labels": labels})
        with pytest.raises(ConfigError) as e:
            tls.client_context(files)
        assert str(e.value) == f"{label} = {gone}: cannot read: No such file or directory"
    folder = tls.Files(f.cert, f.key, str(tmp_path), labels)
    with pytest.raises(ConfigError, match=f"--tls-ca = {tmp_path}: "):
        tls.client_context(folder)
    empty = tls.Files("", f.key, f.ca, labels)
    with pytest.raises(ConfigError, match="--tls-cert: a file is required for TLS, none is set"):
        tls.server_context(empty)


def test_files_that_are_not_pem_are_named(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    junk.chmod(0o600)
    f = pki.files("node0")
    with pytest.raises(ConfigError, match=f"ca = {junk}: not a PEM CA certificate"):
        tls.client_context(tls.Files(f.cert, f.key, str(junk), {}))
    with pytest.raises(ConfigError, match=f"cert = {junk}, key = .*: not a PEM certificate"):
        tls.client_context(tls.Files(str(junk), f.key, f.ca, {}))
    # A key that is not the certificate's.
    other = pki.files("coordinator")
    with pytest.raises(ConfigError, match="not a PEM certificate and its private key"):
        tls.server_context(tls.Files(f.cert, other.key, f.ca, {}))


def test_contexts_want_tls_1_2_and_a_certificate_from_the_peer(pki: Pki) -> None:
    server = tls.server_context(pki.files("coordinator"))
    client = tls.client_context(pki.files("node0"))
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is True


def test_agent_files_come_from_flags_else_the_config_with_the_node_filled_in(
    tmp_path: Path,
) -> None:
    path = config_file(
        tmp_path,
        'agent_tls_cert = "/pki/node-{node}.pem"\nagent_tls_key = "/pki/node-{node}.key"\n'
        'tls_ca = "/pki/ca.pem"\n',
    )
    cfg = load_config(path)
    f = tls.agent_files(cfg, 3)
    assert (f.cert, f.key, f.ca) == ("/pki/node-3.pem", "/pki/node-3.key", "/pki/ca.pem")
    assert f.label("key") == f"{path}:3: agents.agent_tls_key"
    g = tls.agent_files(cfg, 3, cert="/x/c.pem", key="/x/n{node}.key")
    assert (g.cert, g.key, g.ca) == ("/x/c.pem", "/x/n3.key", "/pki/ca.pem")
    assert (g.label("cert"), g.label("key")) == ("--tls-cert", "--tls-key")


# -- names in certificates ---------------------------------------------------------------------

SAN_CERT = {
    "subject": ((("commonName", "node-1.numa"),),),
    "subjectAltName": (("DNS", "node-0.numa"), ("IP Address", "10.0.0.1")),
}
CN_CERT = {"subject": ((("organizationName", "x"),), (("commonName", "node-2.numa"),))}


def test_the_names_are_the_dns_sans_or_the_cn_when_there_is_no_san() -> None:
    assert tls.cert_names(SAN_CERT) == ["node-0.numa"]
    assert tls.cert_names(CN_CERT) == ["node-2.numa"]
    assert tls.cert_names(None) == [] and tls.cert_names({}) == []


def test_check_peer_wants_the_exact_name() -> None:
    assert tls.check_peer(SAN_CERT, "node-0.numa") is None
    assert tls.check_peer(SAN_CERT, "NODE-0.numa") is None
    # The CN does not count when there are SANs.
    assert tls.check_peer(SAN_CERT, "node-1.numa") == (
        "the certificate names ['node-0.numa'], not 'node-1.numa'"
    )
    assert tls.check_peer(CN_CERT, "node-2.numa") is None
    wildcard = {"subjectAltName": (("DNS", "*.numa"),)}
    assert tls.check_peer(wildcard, "node-0.numa") is not None
    assert tls.check_peer(None, "node-0.numa") == "the certificate names nothing, not 'node-0.numa'"
    assert tls.node_name(0, "numa") == "node-0.numa"
    assert tls.coordinator_name("prod.example") == "coordinator.prod.example"


# -- real handshakes ---------------------------------------------------------------------------

Outcome = tuple[str, Any]  # ("ok", TLSStream) or ("refused", exception)


@dataclass
class Server:
    endpoint: tls.Endpoint
    outcomes: list[Outcome]
    done: anyio.Event


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """A TLS server on 127.0.0.1 that records the outcome of each handshake."""
    async with anyio.create_task_group() as tg:

        async def start(name: str = "coordinator", timeout_s: float = 5.0) -> Server:
            ctx = tls.server_context(pki.files(name))
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            srv = Server(tls.Endpoint("127.0.0.1", port), [], anyio.Event())

            async def handle(raw: SocketStream) -> None:
                try:
                    stream = await tls.accept(raw, ctx, timeout_s=timeout_s)
                except Exception as e:
                    srv.outcomes.append(("refused", e))
                    await anyio.aclose_forcefully(raw)
                else:
                    srv.outcomes.append(("ok", stream))
                    await stream.send(b"hi\n")
                    await stream.aclose()
                srv.done.set()

            async def serve() -> None:
                async with listener:
                    await listener.serve(handle)

            tg.start_soon(serve)
            return srv

        yield start
        tg.cancel_scope.cancel()


async def outcome(srv: Server) -> Outcome:
    with anyio.fail_after(10):
        await srv.done.wait()
    return srv.outcomes[-1]


@pytest.mark.anyio
async def test_a_good_agent_and_coordinator_handshake_and_see_each_others_names(
    server: Callable[..., Awaitable[Server]], pki: Pki
) -> None:
    srv = await server()
    client = await tls.connect(
        srv.endpoint, tls.client_context(pki.files("node0")), "numa", dead_after_s=5
    )
    kind, stream = await outcome(srv)
    assert kind == "ok"
    peercert = stream.extra(TLSAttribute.peer_certificate)
    assert tls.check_peer(peercert, tls.node_name(0, "numa")) is None
    assert tls.check_peer(peercert, tls.node_name(1, "numa")) is not None
    assert await client.receive() == b"hi\n"
    assert client.extra(TLSAttribute.tls_version) in ("TLSv1.2", "TLSv1.3")
    await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("other-ca-node0", "certificate verify failed: unable to get local issuer certificate"),
        ("expired-node0", "certificate verify failed: certificate has expired"),
    ],
)
async def test_an_agent_certificate_from_another_ca_or_expired_is_refused_by_the_server(
    server: Callable[..., Awaitable[Server]], pki: Pki, name: str, why: str
) -> None:
    srv = await server()
    files = tls.Files(*vars(pki.files(name)).values())  # its own cert, trusting the real CA
    try:
        client = await tls.connect(srv.endpoint, tls.client_context(files), "numa", dead_after_s=5)
    except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream):
        pass  # TLS 1.2: the client learns during the handshake
    else:
        # TLS 1.3: the client's handshake is over before the server checked its certificate;
        # the server's alert (or the closed connection) is what it reads next.
        async with client:
            with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)):
                await client.receive()
    kind, exc = await outcome(srv)
    assert kind == "refused"
    assert tls.refusal(exc) == ("certificate", why)


@pytest.mark.anyio
async def test_an_agent_without_a_certificate_is_refused(
    server: Callable[..., Awaitable[Server]], pki: Pki
) -> None:
    srv = await server()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    async with await anyio.connect_tcp("127.0.0.1", srv.endpoint.port) as raw:
        with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)):
            stream = await TLSStream.wrap(raw, hostname="coordinator.numa", ssl_context=ctx)
            await stream.receive()
    kind, exc = await outcome(srv)
    assert kind == "refused" and tls.refusal(exc)[0] == "certificate"


@pytest.mark.anyio
async def test_the_agent_refuses_a_coordinator_whose_certificate_names_another(
    server: Callable[..., Awaitable[Server]], pki: Pki
) -> None:
    srv = await server("wrong-name-coordinator")
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        await tls.connect(
            srv.endpoint, tls.client_context(pki.files("node0")), "numa", dead_after_s=5
        )
    assert "coordinator.numa" in str(e.value)
    # The coordinator's side sees the agent go away (anyio sends no alert on a failed check).
    kind, exc = await outcome(srv)
    assert kind == "refused" and tls.refusal(exc)[0] == "closed"
    # ...and a coordinator named for another cluster is refused by an agent of that cluster's
    # name too: the name checked is coordinator.<cluster>.
    srv2 = await server()
    with pytest.raises(ssl.SSLCertVerificationError):
        await tls.connect(
            srv2.endpoint, tls.client_context(pki.files("node0")), "other", dead_after_s=5
        )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"hello","node":0}\n',
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 4,
    ],
    ids=["plaintext-hello", "http", "garbage"],
)
async def test_plaintext_and_garbage_are_refused_as_not_tls(
    server: Callable[..., Awaitable[Server]], data: bytes
) -> None:
    srv = await server()
    async with await anyio.connect_tcp("127.0.0.1", srv.endpoint.port) as raw:
        await raw.send(data)
        kind, exc = await outcome(srv)
    assert kind == "refused"
    assert tls.refusal(exc)[0] == "not_tls", exc


@pytest.mark.anyio
async def test_a_handshake_that_never_completes_times_out(
    server: Callable[..., Awaitable[Server]], pki: Pki
) -> None:
    srv = await server(timeout_s=0.5)
    async with await anyio.connect_tcp("127.0.0.1", srv.endpoint.port):
        t0 = anyio.current_time()
        kind, exc = await outcome(srv)
        waited = anyio.current_time() - t0
    assert kind == "refused" and tls.refusal(exc)[0] == "timeout"
    assert 0.4 < waited < 3


def test_a_closed_connection_and_other_errors_are_classified() -> None:
    assert tls.refusal(anyio.EndOfStream())[0] == "closed"
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    alert.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    why = "the peer ended the handshake: sslv3 alert bad certificate"
    assert tls.refusal(alert) == ("tls", why)
    assert tls.refusal(ValueError("x")) == ("tls", "ValueError: x")


# -- dead connections --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_idle_timeout_passes_data_and_ends_a_silent_connection() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as peer:
        async with await listener.listeners[0].accept() as stream:  # type: ignore[attr-defined]
            idle = tls.IdleTimeout(stream, 0.3)
            await peer.send(b"x")
            assert await idle.receive() == b"x"
            t0 = anyio.current_time()
            with pytest.raises(tls.DeadConnection, match=r"nothing arrived for 0\.3 s"):
                await idle.receive()
            assert anyio.current_time() - t0 >= 0.29
            # The connection itself is untouched: what arrives later is still read.
            await peer.send(b"y")
            assert await idle.receive() == b"y"


@pytest.mark.anyio
async def test_tcp_sockets_get_keepalive_and_a_user_timeout() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as stream:
        tls.tune_socket(stream, 10.0)
        sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
    assert os.name == "posix"
