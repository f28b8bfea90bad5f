"""The host's side of test_remote_agents.py: the real coordinator here, its agents in a guest.

    python -m tests.numa_vm.remote [--keep] [--no-agents] [--no-batch] [--rows N] [--timeout S]

prints the run's findings as one JSON object (the checks are test_remote_agents.py's). `run`:

1. the guest's kernel and initramfs (vm.prepare); a folder of its own under /tmp with staging,
   lake, runtime and state folders, PostgreSQL ($TEST_DSN, or an embedded server started for
   the run, as tests/conftest.py does: the run goes on in a thread of its own at collection
   time, before any fixture) and a schema of the run's own;
2. certificates made with trustme, one CA: `coordinator.numa` for the coordinator (kept on the
   host) and `node-<N>.numa` for each node's agent (in the job share); keys mode 0600;
3. a plain TCP listener on 127.0.0.1 (the probe: the guest's network, checked on its own) and
   the real coordinatord (`python -m coordinator.daemon`, no --with-agents) whose
   `[agents] listen` is tcp://127.0.0.1:PORT with mutual TLS, both on the host's loopback only;
   its `[[node]]`s 0 and 1 are `remote = true`, with `staging`, `tmpfs` and `lake` set to the
   guest's paths. The agents read this same file (the guest sees the host's / read-only);
4. the guest (vm.py) with QEMU's user-mode network (no hostfwd: the guest connects out, and
   10.0.2.2 is the host's loopback) and three writable 9p shares: the job folder (/run/job:
   job.json, the agents' certificates, their logs, the result), the host's staging (seen as
   /run/staging) and the host's lake (seen as /run/lake); remote_guest.py runs in it: the
   probe, then the agents of nodes 0 and 1 under numactl with --connect tcp://10.0.2.2:PORT and
   their certificates, node 0's tmpfs a plain tmpfs at /run/nvm/n0, node 1's one mounted with
   mpol=bind:1 at /run/nvm/n1;
5. once both agents are connected (the daemon's status), a real batch published with the SDK
   into the host's staging; when the daemon shows it final, its ledger row (state, placement,
   timings) and its rows read from PostgreSQL, the lake's files (SHA-256), the daemon's status;
6. the guest told to stop (JOB/stop), its result (the agents' exit statuses, the per-node
   Shmem it sampled), the daemon stopped, its and the agents' connection events from their
   logs, and everything removed (unless keep).

7. with `k8s` (the agent container commands of `plan --k8s`'s DaemonSets), before step 6's
   end: the first agents stopped (JOB/stop), the same guest runs those command lines as given
   but for the config's path and the coordinator's address (k8s_command), each node's tmpfs a
   plain tmpfs again (an emptyDir of medium Memory); once both are connected, a second batch
   (K8S_BATCH_ID) goes through as in step 5, and the guest is told to stop them (JOB/stop2).
   Its findings go to result["k8s"].

With agents=False only steps 1, 3 (the probe) and 4 (no agents) run: the network alone; with
batch=False the agents connect and are stopped, no batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tests.numa_vm import vm

ROOT = vm.ROOT
CLUSTER = "numa"
NODES = (0, 1)
MODELS = [f"slm-{i}" for i in range(1, 8)]
BATCH_ID = "remote-batch-1"
K8S_BATCH_ID = "remote-batch-k8s"  # the second phase's, through the DaemonSets' command lines
GUEST_STAGING = "/run/staging"  # where the guest mounts the host's staging
GUEST_LAKE = "/run/lake"  # and the host's lake
FINAL = {"done", "degraded", "failed"}


class ProbeListener:
    """A plain TCP listener on the host's loopback: reads one line per connection, answers
    `host saw <line>` and records (line, peer address)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.seen: list[dict[str, str]] = []
        self.thread = threading.Thread(target=self._serve, name="probe", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(60)
                line = b""
                with contextlib.suppress(OSError):
                    while not line.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        line += chunk
                    text = line.decode(errors="replace").strip()
                    self.seen.append({"line": text, "peer": peer[0]})
                    conn.sendall(f"host saw {text}\n".encode())

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    """A TCP port free on the host's loopback now."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port


def make_certs(names: dict[str, tuple[str, Path]], ca_file: Path) -> dict[str, dict[str, str]]:
    """A trustme CA (its certificate written to `ca_file`) and one certificate per label,
    {label: (DNS name, folder)}, written into its folder (the key mode 0600). Returns
    {"ca": {"cert": path}, label: {"cert": path, "key": path}}."""
    import trustme

    ca = trustme.CA()
    ca_file.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(ca_file))
    out: dict[str, dict[str, str]] = {"ca": {"cert": str(ca_file)}}
    for label, (name, folder) in names.items():
        folder.mkdir(parents=True, exist_ok=True)
        cert = ca.issue_cert(name)
        chain, key = folder / f"{label}.pem", folder / f"{label}.key"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.touch(mode=0o600)
        key.chmod(0o600)
        cert.private_key_pem.write_to_path(str(key))
        out[label] = {"cert": str(chain), "key": str(key)}
    return out


def toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return repr(v)


def write_toml(
    path: Path, sections: dict[str, dict[str, Any]], nodes: list[dict[str, Any]]
) -> Path:
    lines = []
    for sec, vals in sections.items():
        lines += [f"[{sec}]", *(f"{k} = {toml(v)}" for k, v in vals.items()), ""]
    for node in nodes:
        lines += ["[[node]]", *(f"{k} = {toml(v)}" for k, v in node.items()), ""]
    path.write_text("\n".join(lines))
    return path


def node_models() -> dict[int, list[str]]:
    half = (len(MODELS) + 1) // 2
    return {0: MODELS[:half], 1: MODELS[half:]}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, alive: Callable[[], str]) -> Any:
    """Poll `pred` until truthy; VMError naming `what` on timeout, or when `alive` returns a
    reason to give up (a process gone)."""
    t_end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        gone = alive()
        if gone:
            raise vm.VMError(f"waiting for {what}: {gone}")
        if time.monotonic() > t_end:
            raise vm.VMError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Coordinator:
    """The real coordinatord on the host (no --with-agents: its agents are in the guest)."""

    def __init__(self, config: Path, runtime: Path, log: Path) -> None:
        self.config = config
        self.socket = runtime / "control.sock"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator.daemon", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def gone(self) -> str:
        if self.proc.poll() is None:
            return ""
        return f"coordinatord exited with {self.proc.returncode}:\n{self.tail()}"

    def call(self, cmd: str, **args: Any) -> Any:
        """A control request; None while the daemon does not answer (or refuses it)."""
        from coordinator.core.errors import ControlError
        from coordinator.ctl.client import call

        try:
            return call(self.socket, cmd, timeout=10, **args)
        except ControlError:
            return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """$TEST_DSN, or an embedded PostgreSQL of the run's own (stopped afterwards)."""
    if os.environ.get("TEST_DSN"):
        yield os.environ["TEST_DSN"]
        return
    from coordinator.daemon import embedded_pg

    # The embedded server may run as another user: its folder must be reachable.
    state = Path(tempfile.mkdtemp(prefix="nc-remote-pg-", dir="/tmp"))
    state.chmod(0o755)
    # Started in a process of its own: this runs in a thread (tests/early.py) while the
    # session's fixture may be starting its server, and pgserver's start-up lock is a
    # process's, not a thread's. The server outlives that process (cleanup_mode=None).
    code = "import sys, pathlib; from coordinator.daemon import embedded_pg as e; "
    code += "print(e.start(pathlib.Path(sys.argv[1]))[0])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(state)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise vm.VMError(f"embedded PostgreSQL did not start:\n{done.stderr[-3000:]}")
        yield done.stdout.strip().splitlines()[-1]
    finally:
        with contextlib.suppress(Exception):
            embedded_pg.stop(state, mode="immediate")
        shutil.rmtree(state, ignore_errors=True)


def query(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    import asyncpg

    async def q() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(q())


def drop_schema(dsn: str, schema: str) -> None:
    """Drop the run's schema (on $TEST_DSN's server, which outlives the run)."""
    with contextlib.suppress(Exception):
        query(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plain(value: Any) -> Any:
    """A value made JSON-plain (datetimes and the like as strings)."""
    return json.loads(json.dumps(value, default=str))


def json_lines(
    path: Path, events: set[str], start: int = 0, end: int | None = None
) -> list[dict[str, Any]]:
    """The JSON log lines of `path` (from byte `start` to `end`) whose event is in `events`."""
    out = []
    if path.is_file():
        text = path.read_bytes()[start:end].decode(errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") in events:
                    out.append(record)
    return out


COORDINATOR_EVENTS = {"listening for agents", "agent connected", "agent disconnected"}
AGENT_EVENTS = {"agent started", "connected to the coordinator"}


def run(
    *,
    agents: bool = True,
    batch: bool = True,
    rows: int = 50_000,
    timeout: float = 600.0,
    keep: bool = False,
    k8s: dict[int, list[str]] | None = None,
) -> dict[str, Any]:
    """The whole run (see the module's docstring); VMError when it could not be carried out.
    With `k8s` ({node: the agent container's command of its DaemonSet}), a second phase in the
    same guest runs those command lines (k8s_command: only the config's path and the
    coordinator's address replaced) and takes a second batch; its findings go to result["k8s"]."""
    if shutil.which(vm.QEMU) is None:
        raise vm.VMError(f"{vm.QEMU} not found: install the Debian package qemu-system-x86")
    t_end = time.monotonic() + timeout
    kernel, initramfs = vm.prepare()
    root = Path(tempfile.mkdtemp(prefix="nc-remote-vm-", dir="/tmp"))
    root.chmod(0o755)
    probe = ProbeListener()
    result: dict[str, Any] = {"kernel": kernel.version, "rows": rows, "models": MODELS}
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(probe.close)
            job, staging, lake = root / "job", root / "staging", root / "lake"
            for d in (job, staging, lake, root / "run", root / "state", root / "tmpfs"):
                d.mkdir()
            token = secrets.token_hex(8)
            spec: dict[str, Any] = {
                "root": str(ROOT),
                "probe": {"port": probe.port, "token": token},
                "agents": None,
            }
            result.update(probe_port=probe.port, token=token, probe_seen=probe.seen)
            coordinator: Coordinator | None = None
            dsn = schema = ""
            if agents:
                dsn = stack.enter_context(postgres(root))
                schema = f"t_{uuid.uuid4().hex[:12]}"
                stack.callback(drop_schema, dsn, schema)  # after the daemon has stopped
                port = free_port()
                result["listen"] = f"tcp://127.0.0.1:{port}"
                # One CA; the coordinator's key stays on the host, the agents' travel in the
                # job share (the guest's /run/job/certs).
                names = {"coordinator": (f"coordinator.{CLUSTER}", root / "certs")}
                names |= {f"node{n}": (f"node-{n}.{CLUSTER}", job / "certs") for n in NODES}
                certs = make_certs(names, job / "certs" / "ca.pem")
                config = write_coordinator_config(root, dsn, schema, port, certs)
                spec["agents"] = {
                    "connect": f"tcp://10.0.2.2:{port}",
                    "config": str(config),  # the guest sees the host's / (read-only)
                    "tls_ca": "/run/job/certs/ca.pem",
                    "tls_cert": {str(n): f"/run/job/certs/node{n}.pem" for n in NODES},
                    "tls_key": {str(n): f"/run/job/certs/node{n}.key" for n in NODES},
                    "wait_s": max(60.0, t_end - time.monotonic() - 60),
                    "k8s": None,
                }
                if k8s is not None and batch:
                    connect = f"tcp://10.0.2.2:{port}"
                    commands = {str(n): k8s_command(c, config, connect) for n, c in k8s.items()}
                    spec["agents"]["k8s"] = commands
                    result["k8s"] = {"manifest": {str(n): c for n, c in k8s.items()}}
                    result["k8s"]["commands"] = commands
                result["config"] = config.read_text()
                coordinator = Coordinator(config, root / "run", root / "coordinatord.log")
                stack.callback(coordinator.stop)
                wait_for(
                    lambda: (coordinator.call("status") or {}).get("daemon", {}).get("ready"),
                    120,
                    "coordinatord to answer on its control socket",
                    coordinator.gone,
                )
            (job / "job.json").write_text(json.dumps(spec))
            shares = (
                vm.Share("staging", staging, GUEST_STAGING),
                vm.Share("lake", lake, GUEST_LAKE),
            )
            command = vm.qemu_command(
                kernel, initramfs, job, script=vm.HERE / "remote_guest.py", shares=shares, net=True
            )
            phase2: int | None = None  # where the second phase starts in the daemon's log
            with vm.GuestRun(command, job, t_end - time.monotonic(), tail=6000) as guest:
                if coordinator is not None:
                    drive(coordinator, guest, staging, rows if batch else 0, t_end, result)
                    if batch:
                        collect(result, dsn, schema, lake, staging, BATCH_ID)
                    (job / "stop").touch()
                    if spec["agents"]["k8s"]:
                        phase2 = coordinator.log.stat().st_size
                        first = {a.get("pid") for a in result["status"]["agents"]}
                        second = result["k8s"]
                        drive(
                            coordinator, guest, staging, rows, t_end, second,
                            batch_id=K8S_BATCH_ID, seed=12, not_pids=frozenset(first),
                        )  # fmt: skip
                        collect(second, dsn, schema, lake, staging, K8S_BATCH_ID)
                        (job / "stop2").touch()
                result["guest"] = guest.wait()
            if coordinator is not None:
                result["coordinator_exit"] = coordinator.stop()
                result["coordinator_events"] = json_lines(
                    coordinator.log, COORDINATOR_EVENTS, end=phase2
                )
                result["agent_events"] = {
                    str(n): json_lines(job / f"agent-node{n}.log", AGENT_EVENTS) for n in NODES
                }
                if phase2 is not None:
                    result["k8s"]["coordinator_events"] = json_lines(
                        coordinator.log, COORDINATOR_EVENTS, start=phase2
                    )
                    result["k8s"]["agent_events"] = {
                        str(n): json_lines(job / f"k8s-agent-node{n}.log", AGENT_EVENTS)
                        for n in NODES
                    }
        result["probe_seen"] = list(probe.seen)
        if keep:
            result["root"] = str(root)
        return plain(result)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def collect(
    result: dict[str, Any], dsn: str, schema: str, lake: Path, staging: Path, batch_id: str
) -> None:
    """A final batch's ledger row and rows, the lake's files (SHA-256) and staging's leftovers."""
    result["ledger"], result["counts"] = read_db(dsn, schema, batch_id)
    result["lake_root"] = str(lake)
    result["lake_files"] = {
        str(p.relative_to(lake)): sha256(p)
        for p in sorted(lake.rglob("*"))
        if p.is_file() and f"batch={batch_id}" in p.parts
    }
    result["lake_aggregates_rows"] = {
        str(p.relative_to(lake)): pq.read_metadata(p).num_rows
        for p in lake.rglob("aggregates.parquet")
        if f"batch={batch_id}" in p.parts
    }
    result["staging_left"] = sorted(os.listdir(staging))


def k8s_command(cmd: list[str], config: Path, connect: str) -> list[str]:
    """A DaemonSet's agent command with only what must change in the guest replaced: the value
    of --config (the ConfigMap's file in the pod) by the run's config file, and of --connect
    (the Service's name) by the host's loopback as the guest reaches it. numactl's binding,
    staging-agent, --node and --bind-node stay as the manifest has them; the TLS files come from
    the config (agents.agent_tls_cert/agent_tls_key/tls_ca), as in the pod."""
    out = list(cmd)
    for flag, value in (("--config", str(config)), ("--connect", connect)):
        if flag not in out:
            raise vm.VMError(f"the manifest's agent command has no {flag}: {cmd}")
        out[out.index(flag) + 1] = value
    return out


def write_coordinator_config(
    root: Path, dsn: str, schema: str, port: int, certs: dict[str, dict[str, str]]
) -> Path:
    """The coordinator's config: TCP+TLS on the host's loopback, both nodes remote."""
    sections = {
        "paths": {
            "staging": str(root / "staging"),
            "lake": str(root / "lake"),
            "node_tmpfs": f"{root / 'tmpfs'}/node{{node}}",
            "state_dir": str(root / "state"),
            "runtime_dir": str(root / "run"),
        },
        "batch": {"models": MODELS, "deadline_s": 600.0, "quorum": len(MODELS)},
        "database": {"dsn": dsn, "schema": schema},
        "barrier": {"reconcile_s": 1.0},
        # Under TCG the guest's agents are slow: generous heartbeats and step timeouts.
        "agents": {
            "heartbeat_s": 2.0,
            "dead_after_s": 60.0,
            "step_timeout_s": 300.0,
            "listen": f"tcp://127.0.0.1:{port}",
            "cluster": CLUSTER,
            "tls_cert": certs["coordinator"]["cert"],
            "tls_key": certs["coordinator"]["key"],
            "tls_ca": certs["ca"]["cert"],
            # the agents' files as the guest sees the job share (the k8s phase's command lines
            # pass none, as the pods' do not; the first phase's pass --tls-* anyway)
            "agent_tls_cert": "/run/job/certs/node{node}.pem",
            "agent_tls_key": "/run/job/certs/node{node}.key",
        },
        "log": {"level": "info", "format": "json"},
    }
    # The agents read this file too (the guest sees it at the same path): their [[node]]
    # staging, tmpfs and lake are the guest's paths.
    nodes = [
        {
            "id": n,
            "models": models,
            "remote": True,
            "staging": GUEST_STAGING,
            "tmpfs": f"/run/nvm/n{n}",
            "lake": GUEST_LAKE,
        }
        for n, models in node_models().items()
    ]
    return write_toml(root / "coordinator.toml", sections, nodes)


def drive(
    coordinator: Coordinator,
    guest: vm.GuestRun,
    staging: Path,
    rows: int,
    t_end: float,
    result: dict[str, Any],
    *,
    batch_id: str = BATCH_ID,
    seed: int = 11,
    not_pids: frozenset[Any] = frozenset(),
) -> None:
    """Wait for both agents (none of them a process of `not_pids`: the phase before's), publish
    the batch, wait for it to be final; what the daemon said goes into `result`."""

    def gone() -> str:
        if not guest.running():
            return f"the guest stopped; console:\n{guest.console()}{guest.logs()}"
        why = coordinator.gone()
        return f"{why}\n{guest.logs()}" if why else ""

    def connected() -> list[dict[str, Any]] | None:
        status = coordinator.call("status")
        agents = status["agents"] if status else []
        ok = agents and all(a.get("connected") and a.get("pid") not in not_pids for a in agents)
        return agents if ok else None

    t0 = time.monotonic()
    result["agents"] = wait_for(
        connected, t_end - time.monotonic(), "both guest agents to connect", gone
    )
    result["connect_wait_s"] = round(time.monotonic() - t0, 1)
    if not rows:
        result["status"] = coordinator.call("status")
        return
    from agents import slm
    from coordinator.ctl.demo import synthetic_batch

    _, tables = synthetic_batch(rows, seed=seed)
    sizes, digests = {}, {}
    for model, table in tables.items():
        slm.publish(staging, batch_id, model, table)
        # Still there: nothing leaves staging before the whole batch is done.
        path = staging / batch_id / f"{model}.parquet"
        sizes[path.name], digests[path.name] = path.stat().st_size, sha256(path)
    result["files"], result["published_sha256"] = sizes, digests
    t0 = time.monotonic()

    def final() -> dict[str, Any] | None:
        row = coordinator.call("show", batch_id=batch_id)
        return row if row and row.get("state") in FINAL else None

    try:
        result["show"] = wait_for(final, t_end - time.monotonic() - 30, "the batch to end", gone)
    except vm.VMError as e:
        raise vm.VMError(f"{e}\n--- coordinatord.log\n{coordinator.tail()}{guest.logs()}") from None
    result["batch_s"] = round(time.monotonic() - t0, 1)
    result["status"] = coordinator.call("status")


def read_db(
    dsn: str, schema: str, batch_id: str = BATCH_ID
) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The batch's ledger row, and its rows in PostgreSQL: aggregates and model agreement."""
    s = f'"{schema}"'
    rows = query(dsn, f"SELECT * FROM {s}.batches WHERE batch_id = $1", batch_id)
    counts = query(
        dsn,
        f"SELECT (SELECT count(*) FROM {s}.aggregates WHERE batch_id = $1) AS aggregates,"
        f" (SELECT count(DISTINCT item_id) FROM {s}.aggregates WHERE batch_id = $1) AS items,"
        f" (SELECT count(*) FROM {s}.model_agreement WHERE batch_id = $1) AS pairs",
        batch_id,
    )[0]
    row = rows[0] if rows else None
    if row is not None:  # asyncpg hands jsonb over as text
        row = {k: json.loads(v) if k in JSONB and isinstance(v, str) else v for k, v in row.items()}
    return row, counts


JSONB = {"timings", "staged_bytes", "placement", "consensus_agreement", "counted"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--rows", type=int, default=50_000, help="rows per model in the batch")
    p.add_argument("--no-agents", action="store_true", help="the guest's network alone")
    p.add_argument("--no-batch", action="store_true", help="the agents connect; no batch")
    p.add_argument("--keep", action="store_true", help="keep the run's folder")
    args = p.parse_args(argv)
    try:
        result = run(
            agents=not args.no_agents,
            batch=not args.no_batch,
            rows=args.rows,
            timeout=args.timeout,
            keep=args.keep,
        )
    except vm.VMError as e:
        print(f"numa_vm.remote: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if "error" not in result.get("guest", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
