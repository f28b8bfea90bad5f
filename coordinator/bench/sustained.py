"""Sustained throughput: `Params.sustained_batches` full-size batches published back to back
through the real daemon, against the same batches' bare work done serially by hand.

Ours: the batches are published the SDK's way one right after the other (no waiting for the
one before), and each is timed from its last rename until its `aggregates.parquet` is in the
lake; batches per hour = batches / (first batch's last rename -> last batch archived).

The anchor: the steps a user would run by hand for one batch, one after another, with tools that
are not the project's: `cp` of the 7 files into a tmpfs, the cross-check and the majority vote
in DuckDB (SQL, on the machine's cores), `psql \\copy` of the aggregates into a table like the
ledger's, `cp` + `sync` of the 15 files into a lake folder. Serially, N batches take N times
one batch, so the anchor's batches per hour are 3600 / (its seconds for one batch). It runs
before our series and (outside `--quick`) once more after it; the faster run counts.

Latency growth: with the batches arriving at once, batch k waits for the k - 1 before it, so
its latency from the rename grows with k by construction (the rows show the worst). What must
not grow is a batch's own time in the pipeline once it has its slot (`batch.max_in_flight`):
the sum of its ledger timings (staging, cross-check, aggregate, commit, archive). The row
compares the median of the last batches' times with the first batches' and flags a series
that rises at every batch.
"""

from __future__ import annotations

import itertools
import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.bench import anchors, duck
from coordinator.bench.report import Row
from coordinator.core.errors import CoordinatorError
from coordinator.core.summary import COPY_COLUMNS

# harness.py runs this phase, so nothing here imports it: the run's objects come as arguments
# (harness.Params, Dirs, DaemonProc, Measured) and the SDK-style publishing as `publish`.
Publish = Callable[..., tuple[float, float]]

__all__ = ["by_hand", "rows", "run"]

# The steps of one batch done by hand, in order (each a key of `by_hand`'s result).
STEPS = ("staging", "crosscheck", "aggregate", "commit", "archive")
# The ledger's timings that make up a batch's time in the pipeline once it has its slot.
IN_FLIGHT_KEYS = ("staging_ms", "crosscheck_ms", "aggregate_ms", "commit_ms", "archive_ms")
GROWTH_LIMIT = 1.5


def duckdb_version() -> str:
    """DuckDB's version, or "" where it is not installed."""
    try:
        import duckdb
    except ImportError:
        return ""
    return str(duckdb.__version__)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (from /proc/stat): what
    the other processes of a shared machine took shows in busy time that is not ours."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return (total - idle) / tick, total / tick


class Span:
    """The wall, the machine's busy CPU and the load average over a stretch of the run, and the
    CPU of some processes of ours (pids) over it."""

    def __init__(self, pids: Sequence[int] = (), *, here: bool = False) -> None:
        """`here`: count this process and its waited-for children (DuckDB's threads, cp, psql)
        as ours instead of `pids`."""
        self.pids, self.here = list(pids), here
        self.t0 = time.perf_counter()
        self.busy0, self.total0 = machine_cpu_s()
        self.own0 = self._own()
        self.load0 = os.getloadavg()[0]

    def end(self) -> dict[str, float]:
        busy, total = machine_cpu_s()
        out = {
            "wall_s": time.perf_counter() - self.t0,
            "machine_busy_s": busy - self.busy0,
            "machine_cpu_s": total - self.total0,
            "load_start": self.load0,
            "load_end": os.getloadavg()[0],
        }
        if self.pids or self.here:
            out["own_cpu_s"] = self._own() - self.own0
        return out

    def _own(self) -> float:
        if self.here:
            me, kids = (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
            return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return sum(_cpu(p) for p in self.pids)


def _cpu(pid: int) -> float:
    try:
        return anchors.proc_cpu_s(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


def _sh(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise CoordinatorError(f"{cmd[0]} exited {done.returncode}: {done.stderr.strip()[:500]}")


def by_hand(
    sources: Mapping[str, Path],
    *,
    tmpfs: Path,
    disk: Path,
    psql: str,
    dsn: str,
    table: str,
    batch_id: str,
    threads: int,
) -> dict[str, float]:
    """One batch done by hand, step after step; the seconds of each (STEPS). `table` is an
    existing table with the COPY columns; the folders are made here and removed after."""
    staged, local = tmpfs / batch_id, tmpfs / f"{batch_id}-aggregate"
    out, lake = disk / batch_id, disk / f"{batch_id}-lake"
    for path in (staged, local, out, lake):
        path.mkdir(parents=True)
    t: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        _sh(["cp", *(str(s) for s in sources.values()), str(staged)])
        t1 = time.perf_counter()
        copies = {m: staged / s.name for m, s in sources.items()}
        # The same DuckDB SQL as the cross-check row's anchor (bench/duck.py).
        crosschecks = duck.crosscheck(copies, out, threads=threads)
        t2 = time.perf_counter()
        duck.aggregate(crosschecks, local, batch_id, threads=threads)
        csv = local / "aggregates.csv"
        t3 = time.perf_counter()
        copy = f"\\copy {table} ({','.join(COPY_COLUMNS)}) FROM '{csv}' CSV HEADER"
        _sh([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", copy])
        t4 = time.perf_counter()
        archived = [*map(str, copies.values()), *map(str, crosschecks)]
        archived.append(str(local / "aggregates.parquet"))
        _sh(["cp", *archived, str(lake)])
        _sh(["sync", *(str(lake / Path(f).name) for f in archived), str(lake)])
        t5 = time.perf_counter()
        t = dict(zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))
    finally:
        for path in (staged, local, out, lake):
            shutil.rmtree(path, ignore_errors=True)
    return t


def publish_back_to_back(
    publish: Publish,
    staging: Path,
    lake: Path,
    sources: dict[str, Path],
    ids: Sequence[str],
    timeout_s: float,
) -> dict[str, dict[str, float]]:
    """Publish the batches one right after the other; return, per batch, when its publishing
    started, the time just before its last rename and when its aggregates.parquet appeared in
    the lake (watched every 10 ms by a thread of its own while the next ones are published).
    `publish(staging, batch_id, sources, gap_s=, last_gap_s=)` is harness.publish_batch."""

    archived: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and len(archived) < len(ids):
            for bid in ids:
                if bid not in archived and any(
                    lake.glob(f"batches/date=*/batch={bid}/aggregates.parquet")
                ):
                    archived[bid] = time.time()
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, name="sustained-watch", daemon=True)
    watcher.start()
    out: dict[str, dict[str, float]] = {}
    try:
        for bid in ids:
            t_start, t_last = publish(staging, bid, sources, gap_s=0.01, last_gap_s=0.1)
            out[bid] = {"publish_start": t_start, "last_rename": t_last}
        t_end = time.monotonic() + timeout_s
        while len(archived) < len(ids):
            if time.monotonic() > t_end:
                missing = sorted(set(ids) - set(archived))
                raise CoordinatorError(
                    f"sustained: {', '.join(missing)} not in the lake after {timeout_s:.0f} s"
                )
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(10)
    for bid in ids:
        out[bid]["archived"] = archived[bid]
    return out


def run(
    p: Any,
    d: Any,
    daemon: Any,
    sources: dict[str, Path],
    dsn: str,
    schema: str,
    m: Any,
    publish: Publish,
) -> None:
    """The phase (harness.Params `p`, Dirs `d`, the DaemonProc, Measured `m`): the anchor by
    hand, our series of back-to-back batches, the anchor again. `schema` is the daemon's: the
    anchor copies into a table like its `aggregates`."""
    n = p.sustained_batches
    if n < 2:
        raise CoordinatorError(f"sustained: {n} batches; it takes at least 2")
    psql = anchors.psql_binary()
    if not psql:
        raise CoordinatorError("sustained: no psql for the anchor's commit step")
    own = f"bench_by_hand_{uuid.uuid4().hex[:8]}"
    table = f"{own}.aggregates"
    ddl = f'CREATE SCHEMA {own}; CREATE TABLE {table} (LIKE "{schema}".aggregates INCLUDING ALL)'
    _sh([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", ddl])
    try:
        _run(p, d, daemon, sources, dsn, psql, table, m, publish)
    finally:
        _sh([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", f"DROP SCHEMA {own} CASCADE"])


def _run(
    p: Any,
    d: Any,
    daemon: Any,
    sources: dict[str, Path],
    dsn: str,
    psql: str,
    table: str,
    m: Any,
    publish: Publish,
) -> None:
    n = p.sustained_batches
    threads = len(os.sched_getaffinity(0))
    root = d.root / "by-hand"
    tmpfs = d.tmpfs / "by-hand"

    spans: dict[str, dict[str, float]] = {}

    def anchor(i: int) -> dict[str, float]:
        span = Span(here=True)
        try:
            return by_hand(
                sources,
                tmpfs=tmpfs,
                disk=root,
                psql=psql,
                dsn=dsn,
                table=table,
                batch_id=f"by-hand-{i}",
                threads=threads,
            )
        finally:
            spans[f"by_hand_{i}"] = span.end()

    runs = [anchor(0)]
    ids = [f"sustained-{i:02d}" for i in range(n)]
    st = daemon.call("status")
    ours = [daemon.proc.pid, *(int(a["pid"]) for a in st["agents"])]  # PostgreSQL's not counted
    span = Span(ours)
    times = publish_back_to_back(
        publish, d.staging, d.lake, sources, ids, timeout_s=300.0 + 300.0 * n
    )
    spans["series"] = span.end()
    batches: list[dict[str, Any]] = []
    for bid in ids:
        row = daemon.row(bid, timeout=600.0)  # done, not degraded or failed
        timings = row["timings"]
        missing = [k for k in IN_FLIGHT_KEYS if k not in timings]
        if missing:
            raise CoordinatorError(f"sustained: batch {bid} has no {', '.join(missing)} timings")
        t = times[bid]
        batches.append(
            {
                "batch_id": bid,
                "publish_s": t["last_rename"] - t["publish_start"],
                "latency_s": t["archived"] - t["last_rename"],
                "in_flight_s": sum(float(timings[k]) for k in IN_FLIGHT_KEYS) / 1000,
                "last_rename": t["last_rename"],
                "archived": t["archived"],
                "timings": timings,
            }
        )
    if p.reps > 1:
        runs.append(anchor(1))
    first = min(times[bid]["last_rename"] for bid in ids)
    m.sustained = {
        "threads": threads,
        "duckdb": duckdb_version(),
        "wall_s": max(times[bid]["archived"] for bid in ids) - first,
        "batches": batches,
        "anchor": runs,
        "spans": spans,
    }


# -- rows ----------------------------------------------------------------------------------------


def rising(xs: Sequence[float]) -> bool:
    """Whether every figure of the series is above the one before it."""
    return len(xs) > 1 and all(b > a for a, b in itertools.pairwise(xs))


def _spans_note(spans: Mapping[str, Mapping[str, float]]) -> str:
    """How busy the machine was during the series and each by-hand run."""
    parts = []
    for key, sp in spans.items():
        if not sp.get("machine_cpu_s"):
            continue
        text = (
            f"{key.replace('_', ' ')}: load {sp['load_start']:.1f} -> {sp['load_end']:.1f}, "
            f"machine {100 * sp['machine_busy_s'] / sp['machine_cpu_s']:.0f} % busy"
        )
        if "own_cpu_s" in sp and sp["wall_s"]:
            who = "the daemon and agent" if key == "series" else "its processes"
            text += (
                f", {who} {sp['own_cpu_s']:.0f} CPU-s, {sp['own_cpu_s'] / sp['wall_s']:.2f} cores"
            )
        parts.append(text)
    return "; " + "; ".join(parts) if parts else ""


def rows(m: Any) -> list[Row]:
    """The sustained rows, or none when the phase did not run."""
    s = m.sustained
    if not s or not s.get("batches") or not s.get("anchor"):
        return []
    batches = s["batches"]
    n = len(batches)
    best = min(s["anchor"], key=lambda r: sum(r.values()))
    per_batch = sum(best.values())
    wall = s["wall_s"]
    steps = ", ".join(f"{k} {best[k]:.2f} s" for k in STEPS if k in best)
    latency = [b["latency_s"] for b in batches]
    flight = [b["in_flight_s"] for b in batches]
    k = max(1, min(3, n // 2))
    up = rising(flight)
    late = statistics.median(latency[-k:]) / max(statistics.median(latency[:k]), 1e-9)
    duck = f"DuckDB {s['duckdb']}" if s.get("duckdb") else "DuckDB"
    return [
        Row(
            "sustained_throughput",
            f"sustained: {n} full batches published back to back, batches per hour",
            "batches/h",
            n / wall * 3600 if wall > 0 else None,
            3600 / per_batch if per_batch > 0 else None,
            f"one batch by hand, serially: cp, {duck} on {s['threads']} threads, "
            "psql \\copy, cp + sync",
            "> 1.0x",
            lambda o, a, r: r is not None and r > 1.0,
            note=f"{n} batches in {wall:.1f} s from the first batch's last rename to the last "
            f"batch archived; the anchor per batch: {steps} (sum {per_batch:.2f} s, "
            f"{n} batches {n * per_batch:.1f} s; "
            + (
                "the faster of 2 runs, before and after the series"
                if len(s["anchor"]) > 1
                else "1 run, before the series"
            )
            + "; no barrier wait or publishing counted for it)"
            + _spans_note(s.get("spans") or {}),
        ),
        Row(
            "sustained_growth",
            f"sustained: a batch's time in the pipeline, median of the last {k} against "
            f"the first {k}",
            "s",
            statistics.median(flight[-k:]),
            statistics.median(flight[:k]),
            f"the first {k} batches, same series",
            f"<= {GROWTH_LIMIT}x and not rising at every batch",
            lambda o, a, r: r is not None and r <= GROWTH_LIMIT and not up,
            note="staging + cross-check + aggregate + commit + archive from the ledger's "
            "timings, per batch: "
            + ", ".join(f"{x:.1f}" for x in flight)
            + f" s; rising at every batch: {'YES' if up else 'no'}",
        ),
        Row(
            "sustained_latency",
            "sustained: worst latency, last rename -> archived (waiting for the batches "
            "before it included)",
            "s",
            max(latency),
            n * per_batch if per_batch > 0 else None,
            f"the last of {n} batches by hand, serially",
            "—",
            note="per batch: "
            + ", ".join(f"{x:.1f}" for x in latency)
            + f" s; the last {k} batches' median is "
            + f"{late:.2f}x the first "
            + f"{k}'s (queueing behind the batches ahead: the time-in-the-pipeline row is the "
            "one judged)",
        ),
    ]
