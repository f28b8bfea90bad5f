"""The per-batch accounting against the real thing: where a file's pages are (mincore and
move_pages on real files, a page cache really dropped), the agent's replies on a real batch, a
peak RSS really reset per step, and the real daemon's ledger, `show` and metrics holding the
numbers, each checked against a value computed here another way (os.stat, pyarrow's footers).

On this host every page is on one node, so a copy is remote only for an agent that believes
it serves another node: the two-node daemon of tests/one_host.py, whose node 1 agent is bound
to node 0 (a deliberately wrong binding). The real cross-node copy is tests/numa_vm's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents import accounting, placement, slm
from agents.agent import Agent
from agents.crosscheck import crosscheck
from coordinator.core import files
from coordinator.core.config import load_config
from coordinator.core.messages import Aggregate, Crosscheck, Purge, Stage
from coordinator.core.usage import FIELDS
from tests.conftest import MACHINE_FACT, MODELS, ROOT, Daemon, Env, agent_config, wait_until
from tests.system.test_flow import publish_all, tables
from tests.system.test_metrics import free_port, http_scrape, value
from tests.system.test_two_nodes import two_nodes  # noqa: F401 (a fixture)

PAGE = placement.PAGE
NODE_DIRS = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))


def one_numa_node() -> None:
    if len(NODE_DIRS) != 1:
        pytest.skip(f"{MACHINE_FACT} this host has {len(NODE_DIRS)} NUMA nodes, the test needs 1")


def on_disk(folder: Path) -> None:
    """Skip unless `folder` is on a file system whose page cache can be dropped (not tmpfs)."""
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{MACHINE_FACT} {folder} is on {fs}: no page cache to drop")


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def look(path: Path, method: placement.Method = "move_pages") -> dict[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return dict(placement.file_bytes(fd, method))
    finally:
        os.close(fd)


# -- where a file's pages are ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["move_pages", "numa_maps"])
def test_a_file_in_the_page_cache_counts_every_byte_on_the_node(
    tmp_path: Path, method: placement.Method
) -> None:
    one_numa_node()
    path = tmp_path / "f"
    size = 3 * placement.WINDOW // 2 + 123  # two windows, a partial last page
    path.write_bytes(os.urandom(size))
    assert look(path, method) == {0: size}


@pytest.mark.parametrize("method", ["move_pages", "numa_maps"])
def test_pages_dropped_from_the_cache_count_as_not_in_memory_and_are_not_read_in(
    tmp_path: Path, method: placement.Method
) -> None:
    on_disk(tmp_path)
    path = tmp_path / "f"
    size = 40 * PAGE + 7
    path.write_bytes(os.urandom(size))
    drop_cache(path)
    assert look(path, method) == {placement.NOT_IN_MEMORY: size}
    assert look(path, method) == {placement.NOT_IN_MEMORY: size}  # the look read nothing in
    # Reading the first pages brings them (and the kernel's read-ahead) back, on the node.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, PAGE, 0)
    finally:
        os.close(fd)
    after = look(path, method)
    assert sum(after.values()) == size
    assert 0 < sum(b for s, b in after.items() if s >= 0) <= size


TRUNCATED = """
import ctypes, os, sys
from agents import placement as p
fd = os.open(sys.argv[1], os.O_RDONLY)
addr = p._libc.mmap(None, 3 * p.PAGE, p._PROT_READ, p._MAP_SHARED, fd, 0)
os.truncate(sys.argv[1], 0)  # the producer truncates the file under the look
try:
    p._map_in(addr, 3 * p.PAGE)
except OSError as e:
    print("OSError", e.errno)
"""


def test_a_file_truncated_under_the_look_is_an_oserror_never_a_sigbus(tmp_path: Path) -> None:
    """A read of a mapped page past the end of a truncated file is a SIGBUS, which would kill
    the agent: mapping the pages in must fail with an error instead."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * PAGE))
    done = subprocess.run(
        [sys.executable, "-c", TRUNCATED, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.split() == ["OSError", str(errno.EFAULT)]


def test_a_tmpfs_file_counts_on_the_node_that_wrote_it(shm_file: Path) -> None:
    one_numa_node()
    assert look(shm_file) == {0: shm_file.stat().st_size}


@pytest.fixture
def shm_file() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip(f"{MACHINE_FACT} no /dev/shm")
    path = shm / f"nc-xnode-{os.getpid()}"
    path.write_bytes(os.urandom(5 * PAGE + 1))
    yield path
    path.unlink()


# -- the agent's replies -------------------------------------------------------------------------


def parquet_sizes(paths: list[Path]) -> tuple[int, int, float]:
    """Column chunks stored and decoded, and the SDK's CPU seconds, read here with pyarrow."""
    stored = decoded = 0
    cpu = 0.0
    for p in paths:
        md = pq.read_metadata(p)
        for r in range(md.num_row_groups):
            for c in range(md.num_columns):
                stored += md.row_group(r).column(c).total_compressed_size
                decoded += md.row_group(r).column(c).total_uncompressed_size
        cpu += float(md.metadata[files.ENCODE_CPU_KEY.encode()])
    return stored, decoded, cpu


AGENT_MODELS = MODELS[:3]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent for node 0 with a real batch `b1` of three models in its staging."""
    one_numa_node()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    tmpfs = shm / f"nc-xnode-agent-{os.getpid()}"
    cfg = agent_config(tmp_path, f"{tmpfs}/node{{node}}", 0, AGENT_MODELS)
    a = Agent(load_config(cfg), 0)
    a.tmpfs.mkdir(parents=True)
    t = tables(seed=3, rows=20_000)
    for m in AGENT_MODELS:
        slm.publish(a.config.paths.staging, "b1", m, t[m])
    yield a
    a.purge(Purge(batch_id="b1"))
    a.tmpfs.rmdir()
    tmpfs.rmdir()


def staged_paths(agent: Agent) -> list[Path]:
    return [agent.config.paths.staging / "b1" / f"{m}.parquet" for m in AGENT_MODELS]


STAGE = Stage(batch_id="b1", files=tuple(f"{m}.parquet" for m in AGENT_MODELS))


def test_the_staged_reply_says_where_the_copied_bytes_came_from_and_the_files_compression(
    agent: Agent,
) -> None:
    total = sum(p.stat().st_size for p in staged_paths(agent))
    reply = agent.stage(STAGE)
    assert reply.bytes == total
    assert (reply.copied_remote, reply.copied_absent, reply.source_nodes) == (0, 0, {"0": total})
    stored, decoded, cpu = parquet_sizes(staged_paths(agent))
    assert (reply.compressed_bytes, reply.decoded_bytes) == (stored, decoded)
    assert reply.encode_cpu_s == pytest.approx(cpu, abs=1e-5)
    assert reply.peak_rss is not None and reply.peak_rss > 0
    # Staged again, the copies are reused: nothing copied, so nothing from anywhere.
    again = agent.stage(STAGE)
    assert (again.bytes, again.copied_remote, again.copied_absent) == (0, 0, 0)
    assert again.compressed_bytes == stored  # the footers are read from the copies all the same


def test_a_source_not_in_memory_is_counted_as_such(agent: Agent, tmp_path: Path) -> None:
    on_disk(tmp_path)
    for p in staged_paths(agent):
        drop_cache(p)
    reply = agent.stage(STAGE)
    assert reply.copied_absent == reply.bytes == sum(p.stat().st_size for p in staged_paths(agent))
    assert (reply.copied_remote, reply.source_nodes) == (0, {})


def test_the_crosscheck_and_the_aggregation_say_what_they_read_and_from_where(
    agent: Agent,
) -> None:
    agent.stage(STAGE)
    models = tuple(AGENT_MODELS)
    cc = agent.crosscheck(Crosscheck(batch_id="b1", models=models))
    total = sum(p.stat().st_size for p in staged_paths(agent))
    assert (cc.read_bytes, cc.read_remote) == (total, 0)
    assert cc.decode_cpu_s is not None and cc.decode_cpu_s > 0
    agg = agent.aggregate(Aggregate(batch_id="b1", models=models))
    outputs = [agent.config.paths.staging / "b1" / cc.outputs[m] for m in models]
    cc_bytes = sum(p.stat().st_size for p in outputs)
    assert (agg.copied_bytes, agg.copied_remote, agg.copied_absent) == (cc_bytes, 0, 0)
    assert (agg.read_bytes, agg.read_remote) == (cc_bytes, 0)
    assert agg.peak_rss is not None


BALLAST = 256 << 20


def ballast_crosscheck(model: str, tables: Mapping[str, pa.Table]) -> pa.Table:
    """The default cross-check, after touching BALLAST bytes it then frees."""
    ballast = bytearray(BALLAST)
    for i in range(0, BALLAST, PAGE):
        ballast[i] = 1
    del ballast
    return crosscheck(model, tables)


def test_the_peak_rss_is_each_steps_own_not_the_processs_lifetime(agent: Agent) -> None:
    agent.stage(STAGE)
    msg = Crosscheck(batch_id="b1", models=tuple(AGENT_MODELS))
    agent.crosscheck_fn = ballast_crosscheck
    heavy = agent.crosscheck(msg)
    agent.crosscheck_fn = crosscheck
    light = agent.crosscheck(msg)
    assert heavy.peak_rss is not None and light.peak_rss is not None
    # The ballast was resident in the first step only; the process's lifetime peak has it.
    assert heavy.peak_rss - light.peak_rss > BALLAST * 3 // 4, (heavy.peak_rss, light.peak_rss)
    assert accounting.peak_rss() <= light.peak_rss + (16 << 20)  # reset since, and no ballast


def test_a_step_beside_another_does_not_reset_the_others_peak() -> None:
    meter = accounting.Meter()
    with meter.step() as outer:
        ballast = bytearray(BALLAST)
        for i in range(0, BALLAST, PAGE):
            ballast[i] = 1
        del ballast
        with meter.step() as inner:
            pass
    assert outer.peak_rss is not None and inner.peak_rss is not None
    assert inner.peak_rss >= outer.peak_rss - (16 << 20) >= BALLAST  # kept, not reset
    assert not inner.alone and not outer.alone
    with meter.step() as alone:
        pass
    assert alone.alone and alone.peak_rss is not None
    assert alone.peak_rss < outer.peak_rss - BALLAST * 3 // 4  # reset: the ballast is gone


# -- the real daemon: ledger, show, metrics -----------------------------------------------------


def ledger_usage(env: Env, batch_id: str) -> dict[int, dict[str, Any]]:
    async def q() -> list[dict[str, Any]]:
        conn = await env.db()
        try:
            rows = await conn.fetch(
                f'SELECT * FROM "{env.schema}".node_usage WHERE batch_id = $1', batch_id
            )
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return {r["node"]: r for r in asyncio.run(q())}


def lake_files(row: dict[str, Any], prefix: str = "") -> list[Path]:
    lake = Path(row["lake_path"])
    return [lake / f"{prefix}{m}.parquet" for m in MODELS]


def size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


@pytest.mark.slow
def test_the_ledger_show_and_metrics_carry_each_nodes_bytes_and_the_compression(
    env: Env, daemon: Callable[..., Daemon]
) -> None:
    one_numa_node()
    port = free_port()
    env.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    d = daemon().start()
    publish_all(env, "u-001", seed=8)
    row = d.wait_state("u-001", {"done", "failed", "degraded"})
    assert row["state"] == "done", row["error"]
    # What was copied and read, from the lake's copies of the same files (byte-identical).
    models, ccs = lake_files(row), lake_files(row, "crosscheck_")
    stored, decoded, cpu = parquet_sizes(models)
    want = {
        "stage_copied_bytes": size(models),
        "stage_remote_bytes": 0,
        "stage_absent_bytes": 0,
        "crosscheck_read_bytes": size(models),
        "crosscheck_remote_bytes": 0,
        "aggregate_copied_bytes": size(ccs),
        "aggregate_copied_remote_bytes": 0,
        "aggregate_copied_absent_bytes": 0,
        "aggregate_read_bytes": size(ccs),
        "aggregate_remote_bytes": 0,
    }
    in_ledger = ledger_usage(env, "u-001")
    assert set(in_ledger) == {0}
    got = {k: in_ledger[0][k] for k in FIELDS}
    assert {k: got[k] for k in want} == want
    assert got["decode_cpu_s"] > 0 and got["peak_rss_bytes"] > 10 << 20
    assert (row["compressed_bytes"], row["decoded_bytes"]) == (stored, decoded)
    assert row["encode_cpu_s"] == pytest.approx(cpu, abs=1e-5)
    # show (over the control socket) holds the ledger's row as it is.
    assert row["node_usage"] == {"0": got}

    # coordinatorctl show prints them.
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "show", "u-001", "--socket", str(env.socket)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout
    assert f"compression:     {decoded / stored:.2f}x" in out, out
    assert "node0" in out and "per node:" in out, out

    # The metrics, once the batch is counted.
    def counted() -> Any:
        s = http_scrape(port)
        return s if value(s, "numa_coordinator_batches_total", state="done") == 1 else None

    s = wait_until(counted, 20, "the batch to be counted")
    steps = {
        "stage": ("stage_copied_bytes", "stage_remote_bytes"),
        "crosscheck": ("crosscheck_read_bytes", "crosscheck_remote_bytes"),
        "aggregate_copy": ("aggregate_copied_bytes", "aggregate_copied_remote_bytes"),
        "aggregate": ("aggregate_read_bytes", "aggregate_remote_bytes"),
    }
    for step, (total, remote) in steps.items():
        assert value(s, "numa_coordinator_node_read_bytes_total", node="0", step=step) == got[total]
        assert (
            value(s, "numa_coordinator_cross_node_bytes_total", node="0", step=step) == got[remote]
        )
    nim = "numa_coordinator_source_not_in_memory_bytes_total"
    assert value(s, nim, node="0", step="stage") == 0
    assert value(s, "numa_coordinator_decode_cpu_seconds_total", node="0") == pytest.approx(
        got["decode_cpu_s"]
    )
    assert value(s, "numa_coordinator_agent_peak_rss_bytes", node="0") == got["peak_rss_bytes"]
    assert value(s, "numa_coordinator_files_compressed_bytes_total") == stored
    assert value(s, "numa_coordinator_files_decoded_bytes_total") == decoded
    assert value(s, "numa_coordinator_compression_ratio") == pytest.approx(decoded / stored)
    assert value(s, "numa_coordinator_encode_cpu_seconds_total") == pytest.approx(cpu, abs=1e-5)


@pytest.mark.slow
def test_an_agent_bound_to_another_node_than_its_own_counts_its_reads_as_remote(
    env: Env,
    two_nodes: Callable[..., Daemon],  # noqa: F811 (the fixture imported above)
) -> None:
    """tests/one_host.py binds node 1's agent to node 0: all it copies and reads is on node 0,
    another node than its own, and it says so; node 0's agent reads nothing remote."""
    one_numa_node()
    d = two_nodes().start()
    publish_all(env, "u-002", seed=9)
    row = d.wait_state("u-002", {"done", "failed", "degraded"})
    assert row["state"] == "done", row["error"]
    models = lake_files(row)
    usage = ledger_usage(env, "u-002")
    assert set(usage) == {0, 1}
    assert usage[0]["stage_remote_bytes"] == usage[0]["crosscheck_remote_bytes"] == 0
    assert usage[1]["stage_copied_bytes"] == usage[1]["stage_remote_bytes"] == size(models)
    assert usage[1]["crosscheck_read_bytes"] == usage[1]["crosscheck_remote_bytes"] == size(models)
    # The aggregation ran on one node; all its copies and reads count for that node's view.
    agg = next(n for n in (0, 1) if usage[n]["aggregate_read_bytes"] is not None)
    ccs = size(lake_files(row, "crosscheck_"))
    assert usage[agg]["aggregate_copied_bytes"] == usage[agg]["aggregate_read_bytes"] == ccs
    remote = ccs if agg == 1 else 0
    assert usage[agg]["aggregate_copied_remote_bytes"] == remote
    assert usage[agg]["aggregate_remote_bytes"] == remote
    assert usage[1 - agg]["aggregate_read_bytes"] is None
    assert row["node_usage"]["1"]["stage_remote_bytes"] == size(models)  # as show gives it
