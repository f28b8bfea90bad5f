"""Runs inside the two-node guest that vm.py boots: the real staging agents on a real batch.

    python guest.py JOB_DIR

JOB_DIR (a writable 9p share) holds job.json ({root, batch_id, models}) and staging/<batch_id>/
with the models' Parquet files. This script stands in for the coordinator's side of the agent
socket (coordinator.core.protocol, no PostgreSQL in the guest) and starts, as the daemon does,
`numactl --membind=N --cpunodebind=N python -m agents.agent --node N ...` for:

- node0: node 0's agent; its tmpfs is a plain tmpfs, so the agent's bound policy places pages;
- node1: node 1's agent; its tmpfs is mounted with mpol=bind:1, as the systemd units do;
- wrong: a negative control, node 0's agent whose tmpfs is mounted with mpol=bind:1 (a mount
  policy wins over the process's), so its copies land on node 1 and it must say so;
- refused: node 1's agent started bound to node 0, which must refuse to run (exit 3).

Staging is a plain tmpfs in the guest, filled from JOB_DIR by a process bound to node 0, so
the files' pages are on node 0 (node 1's agent copies across nodes; the agents count it).
It stages the batch on each in turn, reading the kernel's per-node Shmem counters before and
after; has node0, node1 and wrong cross-check their models (wrong reads copies on node 1)
and node0 and node1 each aggregate the whole batch (the
counters again around each aggregation); has node1 archive the batch; purges, stops the
agents, and writes everything to JOB_DIR/result.json. The checks are test_numa_vm.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

JOB = Path(sys.argv[1])
SPEC = json.loads((JOB / "job.json").read_text())
ROOT = Path(SPEC["root"])
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from anyio.abc import SocketStream  # noqa: E402
from guestlib import mount_tmpfs, shmem_kb, topology, uptime  # noqa: E402

from coordinator.core.protocol import AGENT_TYPES, LineReader, decode, encode  # noqa: E402

WORK = Path("/run/nvm")
SOCKET = WORK / "agents.sock"
# Staging on a plain tmpfs, filled by a process bound to node 0: the files' pages (their "page
# cache") are on node 0, so node 1's copies cross the node boundary and node 0's do not.
STAGING = WORK / "staging"
# A bound on each step, not a measure: the guest runs under TCG on one host core while the rest
# of the suite runs (tests/early.py), and a full run once starved an agent's start past 120 s.
# The host's limit on the whole boot (vm.boot, 600 s) still holds.
STEP_TIMEOUT = 300.0


def write_config(path: Path, node_tmpfs: str) -> Path:
    """A coordinator.toml for the agents: the job's staging, the given node_tmpfs template."""
    models = SPEC["models"]
    half = (len(models) + 1) // 2
    q = json.dumps
    path.write_text(
        f"""
[paths]
staging = {q(str(STAGING))}
lake = {q(str(WORK / "lake"))}
node_tmpfs = {q(node_tmpfs)}
state_dir = {q(str(WORK / "state"))}
runtime_dir = {q(str(WORK / "run"))}

[batch]
models = {q(models)}
quorum = {len(models)}

[agents]
heartbeat_s = 5.0

[log]
level = "info"
format = "json"

[[node]]
id = 0
models = {q(models[:half])}

[[node]]
id = 1
models = {q(models[half:])}
"""
    )
    return path


def fill_staging() -> dict[str, Any]:
    """Copy the job's batch into STAGING with numactl --membind=0, and say where its pages
    went (the kernel's per-node Shmem around the copy)."""
    before = shmem_kb(refresh=True)
    copy = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)"
    subprocess.run(
        ["numactl", "--membind=0", sys.executable, "-c", copy, str(JOB / "staging"), str(STAGING)],
        check=True,
    )
    after = shmem_kb(refresh=True)
    return {"shmem_kb_delta": {n: after[n] - before[n] for n in after}}


def start_agent(name: str, node: int, bind: int, config: Path) -> subprocess.Popen[bytes]:
    """The real staging agent for `node` under numactl bound to node `bind`; logs to the job."""
    log = open(JOB / f"agent-{name}.log", "wb")
    cmd = ["numactl", f"--membind={bind}", f"--cpunodebind={bind}", sys.executable]
    cmd += ["-m", "agents.agent", "--node", str(node), "--config", str(config)]
    cmd += ["--socket", str(SOCKET)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


class Conn:
    """One agent connection: its hello and the replies it sends."""

    def __init__(self, stream: SocketStream, hello: dict[str, Any]) -> None:
        self.stream = stream
        self.hello = hello
        self.send_replies, self.replies = anyio.create_memory_object_stream[dict[str, Any]](100)
        self.req = 0

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return the agent's reply to it."""
        self.req += 1
        await self.stream.send(encode({**msg, "req": self.req}))
        with anyio.fail_after(STEP_TIMEOUT):
            async for reply in self.replies:
                if reply.get("req") == self.req:
                    return reply
        raise EOFError(f"agent {self.hello.get('tmpfs')} went away")


async def drive(result: dict[str, Any], agents: dict[str, int]) -> None:
    """Accept the agents, stage the batch on each in turn with the Shmem counters around it,
    then purge. `agents` maps a label to the pid of its agent (numactl execs the agent, so the
    pid in its hello is the one started)."""
    by_pid = {pid: label for label, pid in agents.items()}
    conns: dict[str, Conn] = {}
    all_here = anyio.Event()

    async def serve(stream: SocketStream) -> None:
        reader = LineReader(stream)
        first = await reader.readline()
        if first is None:
            return
        hello = decode(first, types=AGENT_TYPES)
        label = by_pid.get(hello["pid"], f"unexpected pid {hello['pid']}")
        conn = Conn(stream, hello)
        conns[label] = conn
        result["hello"][label] = {**hello, "at_s": uptime()}
        if set(agents) <= set(conns):
            all_here.set()
        while (line := await reader.readline()) is not None:
            msg = decode(line, types=AGENT_TYPES)
            if msg["type"] != "heartbeat":
                await conn.send_replies.send(msg)
        conn.send_replies.close()

    listener = await anyio.create_unix_listener(SOCKET)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        with anyio.fail_after(STEP_TIMEOUT):
            await all_here.wait()
        batch = SPEC["batch_id"]
        files = [f"{m}.parquet" for m in SPEC["models"]]
        for label in agents:
            before = shmem_kb(refresh=True)
            t0 = time.monotonic()
            reply = await conns[label].request({"type": "stage", "batch_id": batch, "files": files})
            after = shmem_kb(refresh=True)
            result["stage"][label] = {
                "reply": reply,
                "wall_s": round(time.monotonic() - t0, 3),
                "shmem_kb_before": before,
                "shmem_kb_delta": {n: after[n] - before[n] for n in after},
            }
        # Each real node cross-checks its own models; then each aggregates the whole batch,
        # with the counters around it (its copies of the cross-check files and its rows files
        # must land on its node only), and node 1
        # archives the batch into the lake from its copies.
        # The wrong agent too: its copies are on node 1, so all it reads is remote. (It
        # rewrites node 0's cross-check files with the same rows, placed as node 0's are.)
        for label in ("node0", "node1", "wrong"):
            reply = await conns[label].request(
                {"type": "crosscheck", "batch_id": batch, "models": SPEC["models"]}
            )
            result["crosscheck"][label] = {"reply": reply}
        for label in ("node0", "node1"):
            before = shmem_kb(refresh=True)
            reply = await conns[label].request(
                {"type": "aggregate", "batch_id": batch, "models": SPEC["models"]}
            )
            after = shmem_kb(refresh=True)
            files = {}
            tmpfs = conns[label].hello["tmpfs"]  # the reply's paths are relative to it
            for key in ("rows_csv", "parquet"):
                if key in reply:
                    files[key] = os.stat(os.path.join(tmpfs, reply[key])).st_size
            if "parquet" in reply:  # and the cross-check copies the vote read, node-local too
                local = os.path.dirname(os.path.join(tmpfs, reply["parquet"]))
                for m in SPEC["models"]:
                    name = f"crosscheck_{m}.parquet"
                    files[name] = os.stat(os.path.join(local, name)).st_size
            result["aggregate"][label] = {
                "reply": reply,
                "file_bytes": files,
                "shmem_kb_delta": {n: after[n] - before[n] for n in after},
            }
        reply = await conns["node1"].request(
            {"type": "archive", "batch_id": batch, "date": "2026-11-28", "models": SPEC["models"]}
        )
        result["archive"] = {"reply": reply}
        if "lake_path" in reply:
            # relative to the lake's root
            result["archive"]["files"] = sorted(os.listdir(WORK / "lake" / reply["lake_path"]))
        for label in agents:
            before = shmem_kb(refresh=True)
            reply = await conns[label].request({"type": "purge", "batch_id": batch})
            after = shmem_kb(refresh=True)
            result["purge"][label] = {
                "reply": reply,
                "shmem_kb_delta": {n: after[n] - before[n] for n in after},
            }
        tg.cancel_scope.cancel()


def main() -> int:
    """Run the whole guest job; result.json is written whatever happens."""
    result: dict[str, Any] = {
        "started_s": uptime(),
        "hello": {},
        "stage": {},
        "crosscheck": {},
        "aggregate": {},
        "purge": {},
        "exit": {},
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        result["topology"] = topology()
        WORK.mkdir(parents=True, exist_ok=True)
        # node 0: a plain tmpfs (the agent's own bound policy places its pages);
        # node 1: a tmpfs mounted with mpol=bind:1, as systemd/numa-coordinator-tmpfs does;
        # wrong: node 0's folder on a tmpfs bound to node 1.
        mount_tmpfs(WORK / "n0", "size=256m,mode=0750")
        mount_tmpfs(WORK / "n1", "size=256m,mode=0750,mpol=bind:1")
        mount_tmpfs(WORK / "w" / "n0", "size=256m,mode=0750,mpol=bind:1")
        mount_tmpfs(STAGING, "size=256m,mode=0770")
        result["staging"] = fill_staging()
        good = write_config(WORK / "coordinator.toml", str(WORK / "n{node}"))
        bad = write_config(WORK / "wrong.toml", str(WORK / "w" / "n{node}"))
        procs["refused"] = start_agent("refused", node=1, bind=0, config=good)
        procs["node0"] = start_agent("node0", node=0, bind=0, config=good)
        procs["node1"] = start_agent("node1", node=1, bind=1, config=good)
        procs["wrong"] = start_agent("wrong", node=0, bind=0, config=bad)
        agents = {name: procs[name].pid for name in ("node0", "node1", "wrong")}
        anyio.run(drive, result, agents, backend="asyncio")
        try:
            result["exit"]["refused"] = procs["refused"].wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            result["exit"]["refused"] = "still running"
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            try:
                result["exit"].setdefault(name, p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                result["exit"].setdefault(name, "killed after 30 s")
        result["finished_s"] = uptime()
        tmp = JOB / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(JOB / "result.json")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
