"""The agent protocol over TCP with mutual TLS, against the real coordinatord and real agents
(docs/protocol.md §3, "The TCP transport").

Certificates are made here with trustme: one CA, the coordinator's (`coordinator.numa`), node
0's (`node-0.numa`), and the wrong ones: node 0's from another CA, node 0's expired. The daemon
listens on tcp://127.0.0.1:<a free port>; agents are started by the daemon (--with-agents, their
certificates from the config) or by the test (staging-agent --connect with --tls-* flags), bound
with real numactl. Hostile peers are plain Python sockets: a client with the wrong certificate,
one that claims node 1 with node 0's certificate, plaintext, garbage, and handshakes that never
complete. Each must be refused with its reason logged and counted while the daemon goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from coordinator.core.messages import Hello, encode
from coordinator.ctl.client import call
from tests.conftest import ROOT, Daemon, Env, wait_until
from tests.faultlib import FINAL, assert_exactly_once, publish_all

DEAD_AFTER_S = 2.0
AGENT = [sys.executable, "-m", "agents.agent"]


@dataclass
class Pki:
    """PEM files under `root`: ca.pem, and <name>.pem / <name>.key for each certificate."""

    root: Path

    def cert(self, name: str) -> str:
        return str(self.root / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    @property
    def ca(self) -> str:
        return str(self.root / "ca.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(root / "ca.pem")
    now = datetime.datetime.now(datetime.UTC)
    issued = {
        "coordinator": ca.issue_cert("coordinator.numa"),
        "coordinator-elsewhere": ca.issue_cert("coordinator.elsewhere"),
        "node-0": ca.issue_cert("node-0.numa"),
        "node-1": ca.issue_cert("node-1.numa"),
        "other-ca-node-0": other_ca.issue_cert("node-0.numa"),
        "expired-node-0": ca.issue_cert(
            "node-0.numa",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
    }
    for name, cert in issued.items():
        cert.cert_chain_pems[0].write_to_path(root / f"{name}.pem")
        cert.private_key_pem.write_to_path(root / f"{name}.key")
        (root / f"{name}.key").chmod(0o600)
    return Pki(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_config(env: Env, pki: Pki, **agents: Any) -> str:
    """Point env's config at a TCP listener with mutual TLS; return its tcp:// address."""
    listen = f"tcp://127.0.0.1:{free_port()}"
    env.write_config(
        agents={
            "listen": listen,
            "tls_cert": pki.cert("coordinator"),
            "tls_key": pki.key("coordinator"),
            "tls_ca": pki.ca,
            "dead_after_s": DEAD_AFTER_S,
            "reconnect_max_s": 1.0,
            **agents,
        }
    )
    return listen


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `path` whose event is `event`."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("event") == event:
                out.append(obj)
    return out


def refused(d: Daemon) -> dict[str, int]:
    return dict(d.status()["agents_refused"])


def node0(d: Daemon) -> dict[str, Any]:
    return next(a for a in d.status()["agents"] if a["node"] == 0)


def agent_command(env: Env, *args: str) -> list[str]:
    """staging-agent for node 0 under numactl, bound to node 0, with extra arguments."""
    return [
        "numactl",
        "--membind=0",
        "--cpunodebind=0",
        sys.executable,
        "-m",
        "agents.agent",
        "--node",
        "0",
        "--config",
        str(env.config),
        *args,
    ]


class Agent:
    """A real staging-agent for node 0, started by the test, bound with numactl."""

    def __init__(self, env: Env, *args: str) -> None:
        self.log = env.root / f"agent-{time.monotonic_ns()}.log"
        cmd = agent_command(env, *args)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.stop()


def hello_line(node: int) -> bytes:
    return encode(
        Hello(
            node=node,
            pid=os.getpid(),
            version="test",
            models=(),
            tmpfs="/nowhere",
            staged_batches=(),
            policy="bind",
            mems=(node,),
            cpus=(0,),
        )
    )


def tls_client(port: int, pki: Pki, name: str) -> ssl.SSLSocket:
    """A TLS connection to the coordinator presenting certificate `name` (trusting the real CA
    for the coordinator's side); on TLS 1.3 the handshake completes here even when the
    coordinator refuses the certificate: that shows on the first read."""
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.cert(name), pki.key(name))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="coordinator.numa")


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the coordinator sends before it closes the connection (or refuses TLS)."""
    data = b""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def local_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def refusal_logged(d: Daemon, peer: str) -> dict[str, Any]:
    """The coordinator's log line that refused the connection from `peer`."""

    def find() -> dict[str, Any] | None:
        lines = [e for e in log_events(d.log, "agent connection refused") if e["peer"] == peer]
        return lines[0] if lines else None

    found: dict[str, Any] = wait_until(find, 15, f"the refusal of {peer} in the log")
    assert found["level"] == "warning"
    return found


# -- a batch end to end ------------------------------------------------------------------------


def test_a_batch_completes_over_tls_with_agents_the_daemon_starts(env: Env, daemon, pki: Pki):
    """--with-agents: each agent reads agents.listen and its certificate from the config
    (agent_tls_cert with {node}), connects over TCP, and the batch lands exactly once."""
    listen = tcp_config(
        env,
        pki,
        agent_tls_cert=str(pki.root / "node-{node}.pem"),
        agent_tls_key=str(pki.root / "node-{node}.key"),
    )
    d = daemon().start()
    assert not (env.run / "agents.sock").exists()
    [hello] = log_events(d.log, "agent connected")
    assert hello["peer"].startswith("127.0.0.1:")
    files = publish_all(env, "tls-1", seed=7)
    assert d.wait_state("tls-1", FINAL)["state"] == "done"
    assert_exactly_once(env, "tls-1", published=files)
    assert refused(d) == {}
    # The keep-alive kept the connection: still the first one, and no dead connection.
    assert len(log_events(d.log, "agent connected")) == 1
    assert log_events(d.log, "agent connection dead; closing it") == []
    assert listen in d.tail(400)


# -- refusals ----------------------------------------------------------------------------------


def test_each_bad_peer_is_refused_logged_and_counted_and_a_good_agent_still_works(
    env: Env, daemon, agents: list[Agent], pki: Pki
):
    listen = tcp_config(env, pki)
    port = port_of(listen)
    d = daemon(with_agents=False).start()
    expected: dict[str, int] = {}

    def refused_as(kind: str, peer: str, why: str) -> None:
        expected[kind] = expected.get(kind, 0) + 1
        wait_until(lambda: refused(d) == expected, 15, f"the {kind} refusal to be counted")
        line = refusal_logged(d, peer)
        assert line["reason"] == kind and why in line["why"], line

    # A certificate from another CA, and an expired one from ours: the handshake fails.
    for name, why in (
        ("other-ca-node-0", "unable to get local issuer certificate"),
        ("expired-node-0", "certificate has expired"),
    ):
        with contextlib.closing(socket.create_connection(("127.0.0.1", port))) as raw:
            peer = local_address(raw)
            ctx = ssl.create_default_context(cafile=pki.ca)
            ctx.load_cert_chain(pki.cert(name), pki.key(name))
            try:
                with ctx.wrap_socket(raw, server_hostname="coordinator.numa") as s:
                    s.sendall(hello_line(0))
                    assert b"ping" not in read_until_closed(s)
            except (ssl.SSLError, ConnectionResetError):
                pass  # TLS 1.2: refused within the handshake
        refused_as("certificate", peer, why)

    # node 0's certificate, claiming node 1: the TLS is fine, the name is not; no ping comes.
    with tls_client(port, pki, "node-0") as s:
        peer = local_address(s)
        s.sendall(hello_line(1))
        assert read_until_closed(s) == b""
    refused_as("name", peer, "claims node 1: the certificate names ['node-0.numa'], not")
    assert not node0(d)["connected"]

    # Plaintext (a hello in the clear) and garbage: not TLS at all.
    for data in (hello_line(0), bytes(range(256)) * 8):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            peer = local_address(raw)
            raw.sendall(data)
            assert b"ping" not in read_until_closed(raw)
        refused_as("not_tls", peer, "not a TLS client hello")

    # The Prometheus counter says the same.
    text = call(env.socket, "metrics")
    for reason, count in (("certificate", 2.0), ("not_tls", 2.0), ("name", 1.0)):
        series = rf'numa_coordinator_agents_refused_total\{{host="[^"]+",reason="{reason}"\}}'
        assert re.search(rf"^{series} {count}$", text, re.MULTILINE), (reason, text)

    # The daemon goes on: a real agent with its flags connects and a batch completes.
    agents.append(
        Agent(
            env,
            "--connect",
            listen,
            "--tls-cert",
            pki.cert("node-0"),
            "--tls-key",
            pki.key("node-0"),
            "--tls-ca",
            pki.ca,
        )
    )
    wait_until(lambda: node0(d)["connected"], 60, "the good agent to connect")
    assert node0(d)["pid"] == agents[0].proc.pid
    since = node0(d)["connected_at"]

    # An impostor for a connected node (node 1's certificate, claiming node 0) neither gets in
    # nor pushes the real agent off; nor does a good certificate with a first line that is not
    # a hello.
    with tls_client(port, pki, "node-1") as s:
        peer = local_address(s)
        s.sendall(hello_line(0))
        assert read_until_closed(s) == b""
    refused_as("name", peer, "claims node 0: the certificate names ['node-1.numa'], not")
    with tls_client(port, pki, "node-0") as s:
        peer = local_address(s)
        s.sendall(b"nonsense\n")
        assert read_until_closed(s) == b""
    refused_as("hello", peer, "no valid hello: not JSON")
    assert node0(d)["connected_at"] == since and node0(d)["pid"] == agents[0].proc.pid
    files = publish_all(env, "after-refusals", seed=8)
    assert d.wait_state("after-refusals", FINAL)["state"] == "done"
    assert_exactly_once(env, "after-refusals", published=files)
    assert refused(d) == expected


def test_an_agent_refuses_a_coordinator_whose_certificate_names_another(
    env: Env, daemon, agents: list[Agent], pki: Pki
):
    """The coordinator's certificate is from the right CA but names coordinator.elsewhere: the
    agent, connecting by IP address, checks coordinator.numa and never says hello."""
    listen = tcp_config(
        env,
        pki,
        tls_cert=pki.cert("coordinator-elsewhere"),
        tls_key=pki.key("coordinator-elsewhere"),
    )
    d = daemon(with_agents=False).start()
    flags = ["--tls-cert", pki.cert("node-0"), "--tls-key", pki.key("node-0")]
    agent = Agent(env, "--connect", listen, *flags, "--tls-ca", pki.ca)
    agents.append(agent)
    [line] = wait_until(
        lambda: log_events(agent.log, "refusing the coordinator's certificate")[:1],
        60,
        "the agent to refuse the coordinator",
    )
    assert line["level"] == "warning" and line["expected"] == "coordinator.numa"
    assert "Hostname mismatch" in line["why"], line

    # The coordinator saw the agent go away mid-handshake; the agent keeps trying, never in,
    # with a backoff that doubles (jitter: each wait is half to all of the step) up to
    # agents.reconnect_max_s (1 s here).
    def waits() -> list[float]:
        return [e["retry_in_s"] for e in log_events(agent.log, "waiting for the coordinator")]

    wait_until(lambda: len(waits()) >= 7, 30, "seven attempts")
    w = waits()
    assert w[0] <= 0.05 and max(w) <= 1.0 and w[6] >= 0.5, w
    assert refused(d).get("closed", 0) >= 6
    assert not node0(d)["connected"]
    assert log_events(d.log, "agent connected") == []
    assert agent.proc.poll() is None


def test_handshakes_that_never_complete_block_no_one_and_are_refused_in_time(
    env: Env, daemon, pki: Pki
):
    listen = tcp_config(env, pki, dead_after_s=4.0)
    port = port_of(listen)
    d = daemon(with_agents=False).start()
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    t0 = time.monotonic()
    try:
        # A TCP connection that sends half a ClientHello, and ones that send nothing at all.
        stalled[0].sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        # Meanwhile a good agent gets in: the coordinator accepts its hello and pings it.
        with tls_client(port, pki, "node-0") as s:
            s.sendall(hello_line(0))
            s.settimeout(10)
            first = s.recv(65536)
            assert json.loads(first.splitlines()[0])["type"] == "ping"
            assert time.monotonic() - t0 < 4.0, "the good agent waited for the stalled ones"
            assert refused(d) == {}
        peers = [local_address(x) for x in stalled]
        wait_until(lambda: refused(d).get("timeout") == 4, 15, "the stalled handshakes to end")
        took = time.monotonic() - t0
        assert 3.5 < took < 4.0 + 5.0, took
        for peer in peers:
            line = refusal_logged(d, peer)
            assert line["reason"] == "timeout"
            assert line["why"] == "the TLS handshake did not complete in time"
        # The coordinator closed them.
        for x in stalled:
            x.settimeout(5)
            assert read_until_closed(x) == b""
    finally:
        for x in stalled:
            x.close()


# -- half-open connections ---------------------------------------------------------------------


def test_a_silent_agent_is_closed_after_dead_after_s_and_its_batch_goes_on_when_it_returns(
    env: Env, daemon, agents: list[Agent], pki: Pki
):
    """SIGSTOP: the agent's process stays, its socket stays open, nothing comes from it (a
    peer gone without a FIN, as far as TCP can tell). The coordinator closes the connection
    after agents.dead_after_s; after SIGCONT the agent reconnects and the batch goes on. Then
    the other way round: a frozen coordinator is left by the agent after dead_after_s."""
    listen = tcp_config(env, pki)
    d = daemon(with_agents=False).start()
    flags = ["--tls-cert", pki.cert("node-0"), "--tls-key", pki.key("node-0")]
    agent = Agent(env, "--connect", listen, *flags, "--tls-ca", pki.ca)
    agents.append(agent)
    wait_until(lambda: node0(d)["connected"], 60, "the agent to connect")
    os.kill(agent.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_until(lambda: not node0(d)["connected"], 15, "the coordinator to drop the agent")
        took = time.monotonic() - t0
        assert took < DEAD_AFTER_S + 2.0, took
        [dead] = log_events(d.log, "agent connection dead; closing it")
        assert dead["node"] == 0 and dead["why"] == f"nothing arrived for {DEAD_AFTER_S:g} s"
        # A batch published now waits for the agent.
        files = publish_all(env, "half-open", seed=9)
        wait_until(
            lambda: any(b["batch_id"] == "half-open" for b in d.status()["batches"]),
            30,
            "the batch to be taken",
        )
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    wait_until(lambda: node0(d)["connected"], 30, "the agent to reconnect")
    assert d.wait_state("half-open", FINAL)["state"] == "done"
    assert_exactly_once(env, "half-open", published=files)

    # The coordinator frozen: the agent closes the connection after dead_after_s.
    first = node0(d)["connected_at"]
    # (The agent may have logged one already: resumed after its SIGSTOP, it found its own
    # timer run out too.)
    seen = len(log_events(agent.log, "coordinator connection dead; closing it"))
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_until(
            lambda: len(log_events(agent.log, "coordinator connection dead; closing it")) > seen,
            15,
            "the agent to give up on the frozen coordinator",
        )
        assert time.monotonic() - t0 < DEAD_AFTER_S + 2.0
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_until(
        lambda: node0(d).get("connected_at") not in (None, first),
        30,
        "the agent to connect anew",
    )


# -- start-up refusals -------------------------------------------------------------------------


def run_daemon(env: Env) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.daemon", "--config", str(env.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_keys_others_may_read_and_missing_files_stop_both_sides_at_start(
    env: Env, pki: Pki, tmp_path: Path
):
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(pki.key("coordinator")).read_bytes())
    loose.chmod(0o644)
    listen = tcp_config(env, pki, tls_key=str(loose))
    r = run_daemon(env)
    assert r.returncode == 1, r.stderr
    assert f"agents.tls_key = {loose}: the private key has mode 0644" in r.stderr
    assert str(env.config) in r.stderr

    gone = tmp_path / "gone.pem"
    tcp_config(env, pki, tls_cert=str(gone))
    r = run_daemon(env)
    assert r.returncode == 1
    assert f"agents.tls_cert = {gone}: cannot read: No such file or directory" in r.stderr

    # A port another process holds.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        env.write_config(
            agents={
                "listen": taken,
                "tls_cert": pki.cert("coordinator"),
                "tls_key": pki.key("coordinator"),
                "tls_ca": pki.ca,
            }
        )
        r = run_daemon(env)
    assert r.returncode == 1, r.stderr
    assert f"agents.listen {taken}: cannot listen: Address already in use" in r.stderr

    # --with-agents over TCP without the agents' certificates: refused at start too.
    tcp_config(env, pki)
    r = subprocess.run(
        [sys.executable, "-m", "coordinator.daemon", "--config", str(env.config), "--with-agents"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 1
    assert "agents.agent_tls_cert: a file is required for TLS, none is set" in r.stderr

    # The agent's own key, given by flag.
    agent_key = tmp_path / "agent.key"
    agent_key.write_bytes(Path(pki.key("node-0")).read_bytes())
    agent_key.chmod(0o604)  # others may read it
    r = subprocess.run(
        agent_command(
            env, "--connect", listen, "--tls-cert", pki.cert("node-0"), "--tls-key", str(agent_key)
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert f"--tls-key = {agent_key}: the private key has mode 0604" in r.stderr

    r = subprocess.run(
        [*AGENT, "--node", "0", "--config", str(env.config), "--connect", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--connect: expected tcp://HOST:PORT with a port 1..65535" in r.stderr
