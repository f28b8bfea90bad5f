"""The benchmark run: synthetic batches through the real daemon, agents and PostgreSQL, with
every anchor measured in the same run (see docs/benchmarks.md for what each row means).

Order: data → Parquet codecs → the cross-check and aggregation run bare → the same against
DuckDB, and on one thread → archive and staging anchors → PostgreSQL and the daemon → barrier
series (with the inotify reader beside it) → idle CPU → full batches (CPU, end to end) → a full
batch with the 1 ms ticker on (loop lag) → database ingest → the daemon stopped, a second one
with `barrier.backend = "notify"` and the barrier series again, announced (with a bare LISTEN
client beside it). Everything lives under fresh temporary folders, removed at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.notifier import PgNotifier
from coordinator.bench import anchors, memory, sustained
from coordinator.bench.report import percentile
from coordinator.core.announce import channel
from coordinator.core.errors import ControlError, CoordinatorError
from coordinator.ctl.client import call
from coordinator.ctl.demo import MODELS, synthetic_batch
from coordinator.daemon import embedded_pg

ROOT = Path(__file__).resolve().parents[2]


PHASES = (
    "codecs",
    "crosscheck",
    "archive",
    "staging",
    "memory",
    "lake",
    "barrier",
    "idle",
    "full",
    "lag",
    "ingest",
    "notify",
    "sustained",
)
# The phases that need PostgreSQL, and those of them that need the (inotify) daemon.
DATABASE_PHASES = ("lake", "barrier", "idle", "full", "lag", "ingest", "notify", "sustained")
DAEMON_PHASES = ("barrier", "idle", "full", "lag", "ingest", "sustained")


@dataclass
class Params:
    """How big a run is."""

    barrier_batches: int = 30
    file_mb: float = 20.0
    full_batches: int = 2
    quick: bool = False
    warmup_batches: int = 2
    small_rows: int = 2_000
    idle_s: float = 10.0
    idle_lag_s: float = 3.0
    reps: int = 3
    threads: int = 0  # the cross-check's and aggregation's threads; 0: this process's CPUs
    ingest_reps: int = 2
    ingest_subset: int = 0  # rows for the client paths (executemany, copy_records); 0: all
    only: frozenset[str] | None = None  # run only these phases (PHASES); None: all
    sustained_batches: int = 10  # full batches published back to back (bench.sustained)
    memory_mb: float = 400.0  # each model's file in the memory-budget batch (bench.memory)
    memory_budget: int = 4 << 30  # the agent's agents.memory_budget for it

    def wants(self, phase: str) -> bool:
        """Whether this run includes `phase`."""
        return self.only is None or phase in self.only

    @classmethod
    def quick_run(cls) -> Params:
        """Tiny sizes for the smoke test: every path runs, no figure means anything."""
        return cls(
            barrier_batches=2,
            file_mb=0.05,
            full_batches=1,
            quick=True,
            warmup_batches=0,
            small_rows=200,
            idle_s=1.0,
            idle_lag_s=0.3,
            reps=1,
            ingest_reps=1,
            ingest_subset=500,
            sustained_batches=4,
            memory_mb=1.0,
            memory_budget=64 << 20,
        )


@dataclass
class Dirs:
    """The run's folders: disk (staging, lake, sources), tmpfs, and a short runtime path."""

    root: Path
    tmpfs: Path
    run: Path

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def sources(self) -> Path:
        return self.root / "source"

    @classmethod
    def make(cls) -> Dirs:
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        return cls(
            root=Path(tempfile.mkdtemp(prefix="nc-bench-")),
            tmpfs=Path(tempfile.mkdtemp(prefix="nc-bench-", dir=shm)),
            run=Path(tempfile.mkdtemp(prefix="ncb-", dir="/tmp")),
        )

    def remove(self) -> None:
        for p in (self.root, self.tmpfs, self.run):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Measured:
    """Everything the run measured, before it becomes rows."""

    params: Params
    rows: int = 0
    file_bytes: float = 0.0
    decoded_bytes: int = 0  # the 7 results as Arrow tables in memory
    codecs: dict[str, dict[str, float]] = field(default_factory=dict)
    bare: dict[str, float] = field(default_factory=dict)
    threads: int = 0  # the threads of the bare cross-check and aggregation (and the agent's)
    crosscheck: dict[str, list[float]] = field(default_factory=dict)  # against DuckDB
    duckdb: str = ""  # its version; "" where it is not installed
    archive: dict[str, list[float]] = field(default_factory=dict)
    staging: dict[str, list[float]] = field(default_factory=dict)
    staging_bytes: int = 0
    barrier: list[dict[str, float]] = field(default_factory=list)
    notify: list[dict[str, float]] = field(default_factory=list)  # the notify backend's series
    idle: dict[str, Any] = field(default_factory=dict)
    full: list[dict[str, Any]] = field(default_factory=list)
    lag: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    lake: dict[str, list[float]] = field(default_factory=dict)
    sustained: dict[str, Any] = field(default_factory=dict)  # bench.sustained
    memory: dict[str, Any] = field(default_factory=dict)  # bench.memory
    reader: str = ""
    listen_reader: str = ""
    psql: str = ""
    errors: list[str] = field(default_factory=list)


def say(text: str) -> None:
    """Progress on stderr (stdout carries the table or the JSON)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def config_text(d: Dirs, dsn: str, schema: str, *, name: str = "daemon", extra: str = "") -> str:
    """The daemon's coordinator.toml: one node, barrier and other tuning at their defaults.
    A daemon `name`d other than "daemon" gets folders of its own; `extra` is appended."""
    models = json.dumps(list(MODELS))
    staging = d.staging if name == "daemon" else d.root / f"staging-{name}"
    state = d.state if name == "daemon" else d.root / f"state-{name}"
    return f"""# written by coordinatorctl bench
[paths]
staging = "{staging}"
lake = "{d.lake}"
node_tmpfs = "{d.tmpfs}/{name}/node{{node}}"
state_dir = "{state}"
runtime_dir = "{d.run}/{name}"

[batch]
models = {models}
deadline_s = 600.0
quorum = 7

[database]
dsn = "{dsn}"
schema = "{schema}"

[log]
level = "info"
format = "json"

[[node]]
id = 0
models = {models}
{extra}"""


class DaemonProc:
    """The benchmark's daemon (coordinator.bench.lagd) as a process."""

    def __init__(self, d: Dirs, config: Path, name: str = "daemon") -> None:
        self.d = d
        suffix = "" if name == "daemon" else f"-{name}"
        self.lag_dir = d.root / f"lag{suffix}"
        self.lag_dir.mkdir(exist_ok=True)
        self.log = d.root / f"coordinatord{suffix}.log"
        cmd = [sys.executable, "-m", "coordinator.bench.lagd", "--config", str(config)]
        cmd += ["--lag-dir", str(self.lag_dir)]
        # The logs go through a pipe, as to journald under systemd: a log line never waits
        # for the disk the batches are fsynced to.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        self.sock = d.run / name / "control.sock"
        self.lag_n = 0

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "ab") as logf:
            while chunk := self.proc.stdout.read1(1 << 16):  # type: ignore[attr-defined]
                logf.write(chunk)

    def call(self, cmd: str, **kw: Any) -> Any:
        return call(self.sock, cmd, **kw)

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise CoordinatorError(
                    f"the daemon exited with {self.proc.returncode}: {self.tail()}"
                )
            try:
                st: dict[str, Any] = self.call("status", timeout=2)
                ready = st["daemon"].get("ready", st["daemon"]["state"] == "running")
                if ready and all(a["connected"] for a in st["agents"]):
                    return st
            except ControlError:
                pass
            time.sleep(0.1)
        raise CoordinatorError(f"the daemon was not ready within {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def row(self, batch_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """The batch's ledger row once it is final."""
        t_end = time.monotonic() + timeout
        row: dict[str, Any] = {}
        while time.monotonic() < t_end:
            try:
                row = self.call("show", batch_id=batch_id)
            except ControlError:
                row = {}
            if row.get("state") in ("done", "degraded", "failed"):
                if row["state"] != "done":
                    raise CoordinatorError(f"batch {batch_id} ended {row['state']}: {row['error']}")
                return row
            time.sleep(0.02)
        raise CoordinatorError(f"batch {batch_id} not done in {timeout:.0f} s ({row.get('state')})")

    def lag(self, on: bool) -> dict[str, Any] | None:
        """Switch the loop-lag sampler; switching it off returns its samples."""
        self.proc.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)
        if on:
            time.sleep(0.05)
            return None
        self.lag_n += 1
        path = self.lag_dir / f"lag-{self.lag_n}.json"
        t_end = time.monotonic() + 30
        while not path.exists():
            if time.monotonic() > t_end:
                raise CoordinatorError("the lag sampler wrote no samples")
            time.sleep(0.02)
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.drain.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Reader:
    """An anchor process (by default the inotify reader on `staging`; or `cmd`, which prints
    the same lines) and the completion times it reports."""

    def __init__(self, staging: Path, cmd: list[str] | None = None) -> None:
        if cmd is None:
            cmd = [sys.executable, "-m", "coordinator.bench.inotify_reader", str(staging)]
            cmd.append(",".join(MODELS))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "ready":
            raise CoordinatorError(f"the anchor {cmd[2]} did not start")
        self.kind = first[1]
        self.lines: queue.Queue[tuple[str, float]] = queue.Queue()
        self.seen: dict[str, float] = {}
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            bid, t = line.split()
            self.lines.put((bid, float(t)))

    def time_of(self, batch_id: str, timeout: float = 5.0) -> float | None:
        t_end = time.monotonic() + timeout
        while batch_id not in self.seen and time.monotonic() < t_end:
            try:
                bid, t = self.lines.get(timeout=0.05)
                self.seen[bid] = t
            except queue.Empty:
                continue
        return self.seen.get(batch_id)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.pump.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _gone(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


def _wait(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.005) -> float:
    t_end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t_end:
            raise CoordinatorError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)
    return time.time()


def publish_batch(
    staging: Path,
    batch_id: str,
    sources: dict[str, Path],
    *,
    gap_s: float,
    last_gap_s: float,
    announce: Callable[[str, str, int], object] | None = None,
) -> tuple[float, float]:
    """Publish a batch the SDK's way, models in a shuffled order, `gap_s` apart and the last
    one `last_gap_s` after the others, each announced with `announce` after its rename where
    given (as `publish(..., notify=)` does); return (start, time just before the last rename)."""
    t_start = time.time()
    folder = staging / batch_id
    folder.mkdir()
    anchors.fsync_path(staging)
    order = list(sources)
    random.Random(batch_id).shuffle(order)

    def one(m: str) -> float:
        t = anchors.publish_copy(sources[m], folder, f"{m}.parquet")
        if announce is not None:
            announce(batch_id, m, sources[m].stat().st_size)
        return t

    time.sleep(gap_s)
    for m in order[:-1]:
        one(m)
        time.sleep(gap_s)
    time.sleep(last_gap_s)
    t_last = one(order[-1])
    return t_start, t_last


def run_barrier(
    p: Params, d: Dirs, daemon: DaemonProc, small: dict[str, Path], m: Measured
) -> None:
    """Batches of 7 small files, one at a time, each let finish before the next; the daemon's
    'last rename -> ready' against the inotify reader's on the same folder."""
    reader = Reader(d.staging)
    m.reader = reader.kind
    try:
        for i in range(p.warmup_batches + p.barrier_batches):
            bid = f"barrier-{i:03d}"
            _, t_last = publish_batch(d.staging, bid, small, gap_s=0.01, last_gap_s=0.1)
            _wait(_gone(d.staging / bid), 120, f"batch {bid}", 0.01)
            row = daemon.row(bid)
            t_reader = reader.time_of(bid)
            if i < p.warmup_batches:
                continue
            m.barrier.append(
                {
                    "ours_ms": (_ts(row["ready_at"]) - t_last) * 1000,
                    "anchor_ms": (t_reader - t_last) * 1000 if t_reader else float("nan"),
                }
            )
    finally:
        reader.stop()


def run_notify(p: Params, d: Dirs, dsn: str, small: dict[str, Path], m: Measured) -> None:
    """The barrier series again on a daemon with `barrier.backend = "notify"` (and a reconcile
    scan that never comes: every batch fires on an announcement), each file announced by the
    SDK's PgNotifier after its rename; the daemon's 'last rename -> ready' against a bare LISTEN
    client's 'last rename -> last announcement heard' on the same channel."""
    schema = f"bench_notify_{os.getpid()}"
    staging = d.root / "staging-notify"
    staging.mkdir(parents=True, exist_ok=True)
    cfg = d.root / "coordinator-notify.toml"
    barrier = '\n[barrier]\nbackend = "notify"\nreconcile_s = 3600.0\n'
    cfg.write_text(config_text(d, dsn, schema, name="notify", extra=barrier))
    models = ",".join(MODELS)
    cmd = [sys.executable, "-m", "coordinator.bench.listen_reader", dsn, channel(schema), models]
    reader = Reader(staging, cmd)
    m.listen_reader = reader.kind
    daemon: DaemonProc | None = None
    notifier = PgNotifier(dsn, schema)
    try:
        daemon = DaemonProc(d, cfg, name="notify")
        daemon.wait_ready()
        for i in range(p.warmup_batches + p.barrier_batches):
            bid = f"notify-{i:03d}"
            _, t_last = publish_batch(
                staging, bid, small, gap_s=0.01, last_gap_s=0.1, announce=notifier
            )
            _wait(_gone(staging / bid), 120, f"batch {bid}", 0.01)
            row = daemon.row(bid)
            t_reader = reader.time_of(bid)
            if i < p.warmup_batches:
                continue
            m.notify.append(
                {
                    "ours_ms": (_ts(row["ready_at"]) - t_last) * 1000,
                    "anchor_ms": (t_reader - t_last) * 1000 if t_reader else float("nan"),
                }
            )
        if notifier.failed:
            raise CoordinatorError(f"{notifier.failed} announcements failed: {notifier.last_error}")
    finally:
        notifier.close()
        if daemon is not None:
            daemon.stop()
        reader.stop()


def run_idle(p: Params, daemon: DaemonProc, agent_pid: int, m: Measured) -> None:
    """Daemon (and agent) CPU over `idle_s` with nothing to do."""
    time.sleep(min(2.0, p.idle_s))
    pid = daemon.proc.pid
    c0, l0, a0 = anchors.proc_cpu_s(pid), anchors.thread_cpu_s(pid), anchors.proc_cpu_s(agent_pid)
    th0 = anchors.threads_cpu_s(pid)
    t0 = time.perf_counter()
    time.sleep(p.idle_s)
    wall = time.perf_counter() - t0
    th1 = anchors.threads_cpu_s(pid)
    threads = {k: (v - th0.get(k, 0.0)) / wall * 100 for k, v in th1.items()}
    m.idle = {
        "threads_pct": dict(sorted(threads.items(), key=lambda kv: -kv[1])[:6]),
        "seconds": wall,
        # Per-thread schedstat (ns) rather than /proc/PID/stat (10 ms ticks: 0.1 % steps).
        "daemon_pct": sum(threads.values()),
        "daemon_ticks_pct": (anchors.proc_cpu_s(pid) - c0) / wall * 100,
        "loop_pct": (anchors.thread_cpu_s(pid) - l0) / wall * 100,
        "agent_pct": (anchors.proc_cpu_s(agent_pid) - a0) / wall * 100,
    }


def run_memory(p: Params, d: Dirs, m: Measured) -> None:
    """The memory-budget batch (bench.memory): generated on disk, staged into tmpfs, worked
    on by one agent's steps in a process of its own; its folders removed after."""
    staging = d.root / "staging-memory"  # as config_text names them
    tmpfs = d.tmpfs / "memory"
    try:
        rows = memory.rows_for(p.memory_mb, list(MODELS))
        say(f"  writing {rows:,} rows per model")
        t0 = time.perf_counter()
        written = memory.generate(staging / "mem-00", list(MODELS), rows)
        generate_s = time.perf_counter() - t0
        cfg = d.root / "memory.toml"
        agents = f"\n[agents]\nmemory_budget = {p.memory_budget}\n"
        agents += f"threads = {p.threads}\n" if p.threads else ""
        cfg.write_text(config_text(d, "", "bench_memory", name="memory", extra=agents))
        got = memory.run_agent_steps(cfg, "mem-00")
        m.memory = {**got, "rows": rows, "file_bytes": written, "generate_s": generate_s}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)


def run_full(
    d: Dirs, daemon: DaemonProc, agent_pid: int, full: dict[str, Path], bid: str
) -> dict[str, Any]:
    """One full-size batch: end to end, the daemon's CPU, and its ledger timings."""
    pid = daemon.proc.pid
    c0, l0, a0 = anchors.proc_cpu_s(pid), anchors.thread_cpu_s(pid), anchors.proc_cpu_s(agent_pid)
    anchors.reset_peak_rss(agent_pid)
    t_start, t_last = publish_batch(d.staging, bid, full, gap_s=0.01, last_gap_s=0.1)
    lake_glob = f"batches/date=*/batch={bid}/aggregates.parquet"
    t_archived = _wait(lambda: any(d.lake.glob(lake_glob)), 600, f"batch {bid} in the lake")
    t_done = _wait(_gone(d.staging / bid), 120, f"batch {bid} to finish", 0.01)
    cpu, loop = anchors.proc_cpu_s(pid) - c0, anchors.thread_cpu_s(pid) - l0
    agent = anchors.proc_cpu_s(agent_pid) - a0
    row = daemon.row(bid)
    return {
        "batch_id": bid,
        "publish_s": t_last - t_start,
        "ready_s": _ts(row["ready_at"]) - t_last,
        "e2e_s": t_archived - t_last,
        "wall_s": t_done - t_last,
        "daemon_cpu_s": cpu,
        "loop_cpu_s": loop,
        "agent_cpu_s": agent,
        "agent_peak_rss": anchors.peak_rss(agent_pid),
        "timings": row["timings"],
    }


def summarise_lag(doc: dict[str, Any], t_batch: float) -> dict[str, Any]:
    """p99 and max of the loop lag per step during the batch, and when idle before it; with
    how much of the worst lags the loop's thread spent waiting for a CPU (the machine's load,
    not the daemon's doing)."""
    tags: list[str] = doc["tags"]
    waits = doc.get("run_wait_ms") or [0.0] * len(doc["t"])
    groups: dict[str, list[tuple[float, float]]] = {"idle_before": []}
    for t, lag, wait, tag in zip(doc["t"], doc["lag_ms"], waits, doc["tag"], strict=True):
        if t < t_batch:
            groups["idle_before"].append((lag, wait))
        elif tags[tag] != "idle":
            groups.setdefault(tags[tag], []).append((lag, wait))
    out: dict[str, Any] = {}
    for k, v in groups.items():
        if not v:
            continue
        lags = [x[0] for x in v]
        p99 = percentile(lags, 99)
        worst = [x for x in v if x[0] >= p99]
        out[k] = {
            "n": len(v),
            "p50": percentile(lags, 50),
            "p99": p99,
            "max": max(lags),
            "max_run_wait": max(v)[1],
            "worst_run_wait_share": sum(w for _, w in worst) / max(sum(x for x, _ in worst), 1e-9),
        }
    return out


def make_data(p: Params, d: Dirs, m: Measured) -> tuple[dict[str, Any], dict[str, Path]]:
    """The full-size tables (7 models, about `file_mb` each as zstd-3 Parquet) and the small
    files of the barrier series, written once as the sources every batch is published from."""
    sample_rows = 20_000 if p.quick else 400_000
    _, sample = synthetic_batch(sample_rows, seed=1)
    per_row = anchors.codec_table_bytes(sample["slm-1"]) / sample_rows
    m.rows = max(100, int(p.file_mb * 1e6 / per_row))
    _, tables = synthetic_batch(m.rows, seed=7)
    m.decoded_bytes = sum(t.nbytes for t in tables.values())
    _, small = synthetic_batch(p.small_rows, seed=3)
    sources = anchors.write_sources(d.sources / "full", tables)
    small_src = anchors.write_sources(d.sources / "small", small)
    m.file_bytes = sum(s.stat().st_size for s in sources.values()) / len(sources)
    return {"tables": tables, "sources": sources}, small_src


def run(p: Params, *, dsn: str = "") -> Measured:
    """Run the whole benchmark; return what it measured. A phase that fails is recorded in
    `errors` and the run goes on with the phases that do not need it."""
    m = Measured(p)
    d = Dirs.make()
    started_pg = False
    daemon: DaemonProc | None = None

    def phase(key: str, name: str, fn: Callable[[], None]) -> bool:
        if not p.wants(key):
            return False
        say(name)
        try:
            fn()
            return True
        except Exception as e:
            m.errors.append(f"{name}: {type(e).__name__}: {e}")
            say(f"FAILED: {name}: {type(e).__name__}: {e}")
            return False

    try:
        say(f"generating 7 models x about {p.file_mb:g} MB of zstd-3 Parquet")
        data, small = make_data(p, d, m)
        sources: dict[str, Path] = data["sources"]
        say(f"{m.rows:,} rows per model, {m.file_bytes / 1e6:.1f} MB per file")
        m.staging_bytes = sum(s.stat().st_size for s in sources.values())

        def codecs() -> None:
            tables = data.pop("tables")  # freed after this phase
            m.codecs = anchors.codecs(tables, d.tmpfs / "codecs", max(1, p.reps - 1))

        phase("codecs", "Parquet: zstd 3 against snappy", codecs)
        data.pop("tables", None)
        m.threads = p.threads or len(os.sched_getaffinity(0))
        m.duckdb = anchors.duckdb_version()
        staged = d.tmpfs / "bare"
        anchors.stage_copies(sources, staged)
        bare = anchors.bare_work(
            staged, d.root / "bare", d.tmpfs / "bare-aggregate", list(sources), threads=m.threads
        )
        shutil.rmtree(staged, ignore_errors=True)
        m.bare = {"crosscheck_s": bare.crosscheck_s, "aggregate_s": bare.aggregate_s}

        def crosscheck() -> None:
            m.crosscheck = anchors.crosscheck_vs_duckdb(
                sources, d.tmpfs / "cc", d.root / "cc", threads=m.threads, reps=p.reps
            )

        phase(
            "crosscheck",
            f"cross-check and aggregation: ours against DuckDB on {m.threads} threads, and ours "
            "on one",
            crosscheck,
        )
        files = [*sources.values(), *bare.crosscheck_files, bare.aggregates_parquet]

        def archive() -> None:
            m.archive = anchors.archive(files, d.root / "archive", p.reps)

        def staging() -> None:
            rig = anchors.StagingRig(d.sources, "full", d.tmpfs / "rig", d.run, sys.executable)
            m.staging = anchors.staging(rig, [s.name for s in sources.values()], p.reps + 2)

        phase("archive", "archive: the lake writer against cp + sync", archive)
        phase("staging", "staging: agents against cp", staging)
        phase(
            "memory",
            f"memory budget: 7 models x {p.memory_mb:g} MB through one agent's steps, "
            f"agents.memory_budget = {p.memory_budget / (1 << 20):,.0f} MiB",
            lambda: run_memory(p, d, m),
        )
        if not any(p.wants(k) for k in DATABASE_PHASES):
            return m

        if not dsn:
            say("starting embedded PostgreSQL")
            dsn, _ = embedded_pg.start(d.state)
            started_pg = True
        db = dsn

        def lake() -> None:
            m.lake = anchors.lake_commit(db, d.root / "iceberg", m.rows, p.reps + 2)

        phase("lake", "Iceberg lake commit: ours against pyiceberg's add_files", lake)
        notify_phase = (
            "notify",
            f"barrier, notify backend: {p.barrier_batches} announced batches "
            f"(+{p.warmup_batches} warm-up) beside a bare LISTEN client",
            lambda: run_notify(p, d, db, small, m),
        )
        if not any(p.wants(k) for k in DAEMON_PHASES):
            phase(*notify_phase)
            return m
        schema = f"bench_{os.getpid()}"
        cfg = d.root / "coordinator.toml"
        cfg.write_text(config_text(d, dsn, schema))
        d.staging.mkdir(parents=True, exist_ok=True)
        say("starting the daemon and its agent")
        daemon = DaemonProc(d, cfg)
        status = daemon.wait_ready()
        agent_pid = int(status["agents"][0]["pid"])
        dm = daemon

        n = p.barrier_batches
        phase(
            "barrier",
            f"barrier: {n} batches (+{p.warmup_batches} warm-up) beside a bare inotify reader",
            lambda: run_barrier(p, d, dm, small, m),
        )
        phase("idle", f"idle CPU over {p.idle_s:g} s", lambda: run_idle(p, dm, agent_pid, m))

        def full() -> None:
            for i in range(p.full_batches):
                say(f"full batch {i + 1} of {p.full_batches}")
                m.full.append(run_full(d, dm, agent_pid, sources, f"full-{i:02d}"))

        def lag() -> None:
            dm.lag(True)
            try:
                time.sleep(p.idle_lag_s)
                t_batch = time.time()
                batch = run_full(d, dm, agent_pid, sources, "lag-00")
            finally:
                samples = dm.lag(False)
            assert samples is not None
            m.lag = {"steps": summarise_lag(samples, t_batch), "batch": batch}

        def ingest() -> None:
            psql = anchors.psql_binary()
            m.psql = anchors.psql_version(psql)
            m.ingest = anchors.ingest(
                dsn, psql, (bare.items, bare.summary), d.tmpfs, p.ingest_reps, p.ingest_subset
            )

        phase("full", "full batches: end to end and daemon CPU", full)
        phase("lag", "event-loop lag: a full batch with the 1 ms ticker on", lag)
        phase("ingest", "database ingest: the COPY path against psql \\copy and asyncpg", ingest)
        phase(
            "sustained",
            f"sustained: {p.sustained_batches} full batches back to back against them by hand",
            lambda: sustained.run(p, d, dm, sources, db, schema, m, publish_batch),
        )
        # The notify backend's series runs alone: the first daemon stops before it starts.
        daemon.stop()
        daemon = None
        phase(*notify_phase)
    finally:
        if daemon is not None:
            daemon.stop()
        if started_pg:
            embedded_pg.stop(d.state)
        if os.environ.get("BENCH_KEEP"):
            say(f"kept {d.root} {d.tmpfs} {d.run}")
        else:
            d.remove()
    return m
