"""The measurements themselves: our code path and its anchor, on the same files, side by side.

Each function here times one figure both ways, alternating ours and the anchor so that the noise
of a shared machine falls on both. Nothing here starts the daemon (harness.py does).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import resource
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from agents.aggregation import AGGREGATE_COLUMNS, rows_csv, summarise
from agents.consensus import BatchAggregate, aggregate
from agents.crosscheck import crosscheck
from agents.lake import Lake
from coordinator.core import files
from coordinator.core.messages import Purge, Stage, Staged
from coordinator.core.rowsfile import RowsFile, ident_of
from coordinator.core.summary import COPY_COLUMNS
from coordinator.daemon.hub import Hub
from coordinator.daemon.ledger import Ledger

AGG_COLUMNS = list(COPY_COLUMNS)


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid`, all its threads (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds of one thread (default: the main one, the event loop), ns resolution."""
    text = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text()
    return int(text.split()[0]) / 1e9


def threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of `pid`, keyed '<tid> <name>'."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[f"{task.name} {name}"] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


@contextlib.contextmanager
def timer(out: list[float]) -> Iterator[None]:
    """Append the wall seconds of the block to `out`."""
    t0 = time.perf_counter()
    yield
    out.append(time.perf_counter() - t0)


def fsync_path(path: Path) -> None:
    """fsync a file or folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_copy(src: Path, folder: Path, name: str) -> float:
    """Publish `src` as `folder/name` the SDK's way (dot-temp, fsync, rename, fsync folder);
    return the time.time() taken just before the rename."""
    tmp = folder / f".{name}.tmp"
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
            if n == 0:
                break
            done += n
        os.fsync(fo.fileno())
    t = time.time()
    os.rename(tmp, folder / name)
    fsync_path(folder)
    return t


def write_sources(folder: Path, tables: dict[str, pa.Table]) -> dict[str, Path]:
    """Write each model's table once as zstd-3 Parquet (the SDK's format); return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for model, table in tables.items():
        path = folder / f"{model}.parquet"
        files.write_parquet_atomic(path, table, compression="zstd", level=3)
        out[model] = path
    return out


# -- Parquet: zstd 3 against snappy ------------------------------------------------------------


def _write_ours(table: pa.Table, path: Path) -> None:
    files.write_parquet_atomic(path, table, compression="zstd", level=3)


def _write_ours_snappy(table: pa.Table, path: Path) -> None:
    files.write_parquet_atomic(path, table, compression="snappy", level=None)


def _write_snappy(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="snappy")


# ours: the SDK's writer (zstd 3); the anchor: pyarrow's snappy with its defaults; and the
# SDK's writer with snappy, so the codec alone can be told from the writer's other choices.
CODECS: dict[str, Callable[[pa.Table, Path], None]] = {
    "zstd3": _write_ours,
    "snappy": _write_snappy,
    "sdk_snappy": _write_ours_snappy,
}


def codecs(tables: dict[str, pa.Table], folder: Path, reps: int) -> dict[str, dict[str, float]]:
    """Size, write and read seconds and CPU seconds of the models' tables under each writer
    (best of `reps`, alternating them), written to and read from `folder` (a tmpfs)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = sum(t.nbytes for t in tables.values())
    runs: dict[str, dict[str, list[float]]] = {
        c: {"write_s": [], "read_s": [], "write_cpu_s": [], "read_cpu_s": []} for c in CODECS
    }
    sizes: dict[str, int] = {}
    for rep in range(reps):
        order = list(CODECS) if rep % 2 == 0 else list(reversed(CODECS))
        for codec in order:
            paths = []
            c0, t0 = cpu_s(), time.perf_counter()
            for model, table in tables.items():
                path = folder / f"{codec}-{model}.parquet"
                CODECS[codec](table, path)
                paths.append(path)
            runs[codec]["write_s"].append(time.perf_counter() - t0)
            runs[codec]["write_cpu_s"].append(cpu_s() - c0)
            sizes[codec] = sum(p.stat().st_size for p in paths)
            c0, t0 = cpu_s(), time.perf_counter()
            for path in paths:
                pq.read_table(path)
            runs[codec]["read_s"].append(time.perf_counter() - t0)
            runs[codec]["read_cpu_s"].append(cpu_s() - c0)
            for path in paths:
                path.unlink()
    out: dict[str, dict[str, float]] = {}
    for codec, r in runs.items():
        med = {k: min(v) for k, v in r.items()}  # best of the alternated repetitions
        gb = raw / 1e9
        out[codec] = {
            "bytes": float(sizes[codec]),
            "raw_bytes": float(raw),
            **med,
            "write_cpu_s_per_gb": med["write_cpu_s"] / gb,
            "read_cpu_s_per_gb": med["read_cpu_s"] / gb,
        }
    return out


# -- cross-check and aggregation run bare (no daemon, no agent) --------------------------------


@dataclass
class BareWork:
    """The cross-check and aggregation of one batch, run as plain function calls."""

    crosscheck_s: float
    aggregate_s: float
    crosscheck_files: list[Path]
    agg: BatchAggregate
    aggregates_parquet: Path


def bare_work(sources: dict[str, Path], tmpfs: Path, out: Path) -> BareWork:
    """What the agents compute for a batch, done in one process: read the tmpfs copies,
    cross-check every model and publish (zstd 3, fsync), then read and aggregate and write
    aggregates.parquet (the aggregates CSV is the ingest anchor's, written per batch there)."""
    tmpfs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for src in sources.values():
        shutil.copyfile(src, tmpfs / src.name)
    models = list(sources)
    t0 = time.perf_counter()
    tables = files.read_results(tmpfs, models)
    written = []
    for m in models:
        path = out / f"crosscheck_{m}.parquet"
        files.write_parquet_atomic(path, crosscheck(m, tables), compression="zstd", level=3)
        written.append(path)
    t1 = time.perf_counter()
    agg = aggregate(
        files.read_results(out, models, prefix="crosscheck_", columns=AGGREGATE_COLUMNS)
    )
    agg_file = out / "aggregates.parquet"
    files.write_parquet_atomic(agg_file, agg.items, compression="zstd", level=3)
    t2 = time.perf_counter()
    shutil.rmtree(tmpfs, ignore_errors=True)
    return BareWork(t1 - t0, t2 - t1, written, agg, agg_file)


# -- archive: the lake writer against cp + sync ------------------------------------------------


def archive(files: Sequence[Path], root: Path, reps: int) -> dict[str, list[float]]:
    """Lake.archive of the batch's files (aggregates.parquet last) against `cp` of the same
    files, then `sync` of the copies (fsync each, like the lake); alternating."""
    lake = Lake(str(root / "lake"))
    ours: list[float] = []
    anchor: list[float] = []
    nbytes = 0
    for rep in range(reps):
        for which in ("ours", "anchor") if rep % 2 == 0 else ("anchor", "ours"):
            if which == "ours":
                bid = f"bench-archive-{rep}"
                with timer(ours):
                    folder, nbytes = lake.archive(bid, "2000-01-01", files)
                shutil.rmtree(folder)
            else:
                dest = root / f"cp-{rep}"
                dest.mkdir(parents=True)
                srcs = [*map(str, files)]
                with timer(anchor):
                    subprocess.run(["cp", *srcs, str(dest)], check=True)
                    copies = [str(dest / Path(s).name) for s in srcs]
                    subprocess.run(["sync", *copies, str(dest)], check=True)
                shutil.rmtree(dest)
    return {"ours_s": ours, "anchor_s": anchor, "bytes": [float(nbytes)]}


# -- staging: agents against cp ----------------------------------------------------------------


@dataclass
class StagingRig:
    """Two staging agents (both on node 0 here), each served by its own project Hub."""

    source_root: Path  # holds <batch>/<model>.parquet
    batch: str
    tmpfs: Path
    run_dir: Path
    python: str
    numactl: str = "numactl"
    configs: list[Path] = field(default_factory=list)


def _agent_config(rig: StagingRig, i: int) -> Path:
    text = f"""[paths]
staging = "{rig.source_root}"
lake = "{rig.run_dir}/lake"
node_tmpfs = "{rig.tmpfs}/agent{i}/node{{node}}"
state_dir = "{rig.run_dir}/state{i}"
runtime_dir = "{rig.run_dir}/run{i}"

[log]
level = "warning"
format = "json"

[[node]]
id = 0
models = ["slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", "slm-7"]
"""
    path = rig.run_dir / f"agent{i}.toml"
    path.write_text(text)
    return path


def staging(rig: StagingRig, files: Sequence[str], reps: int) -> dict[str, list[float]]:
    """Wall seconds to stage the files: one agent vs one cp, two agents at once vs two cps at
    once, into the same tmpfs, alternating. The agents are the real staging-agent processes
    under numactl; the cps run under the same binding."""
    return anyio.run(_staging, rig, list(files), reps, backend="asyncio")


async def _staging(rig: StagingRig, files: list[str], reps: int) -> dict[str, list[float]]:
    hubs = [Hub(), Hub()]
    socks = [rig.run_dir / f"hub{i}.sock" for i in range(2)]
    bind = [rig.numactl, "--membind=0", "--cpunodebind=0"]
    src = rig.source_root / rig.batch
    out: dict[str, list[float]] = {k: [] for k in ("one_agent", "one_cp", "two_agents", "two_cp")}
    for k in ("one_agent", "two_agents"):
        out |= {f"{k}_copy_s": [], f"{k}_placement_s": []}
    procs = []
    async with anyio.create_task_group() as tg:
        for hub, sock in zip(hubs, socks, strict=True):
            await tg.start(hub.serve, sock)
        for i, sock in enumerate(socks):
            cfg = _agent_config(rig, i)
            cmd = [*bind, rig.python, "-m", "agents.agent", "--node", "0"]
            cmd += ["--config", str(cfg), "--socket", str(sock)]
            procs.append(await anyio.open_process(cmd, stdin=None, stdout=None, stderr=None))
        try:
            for hub in hubs:
                await hub.wait_for(0, 60.0)

            replies: list[Staged] = []

            async def agent(i: int) -> None:
                msg = Stage(batch_id=rig.batch, files=tuple(files))
                reply = await hubs[i].request(0, msg, within_s=120.0)
                assert reply.bytes > 0, "the agent skipped the copy"
                replies.append(reply)

            async def purge(i: int) -> None:
                await hubs[i].request(0, Purge(batch_id=rig.batch), within_s=60.0)

            async def cp(i: int) -> None:
                dest = rig.tmpfs / f"cp{i}"
                dest.mkdir(parents=True, exist_ok=True)
                await anyio.run_process([*bind, "cp", *(str(src / f) for f in files), str(dest)])

            async def both(fn: Callable[[int], Any]) -> float:
                t0 = time.perf_counter()
                async with anyio.create_task_group() as g:
                    for i in range(2):
                        g.start_soon(fn, i)
                return time.perf_counter() - t0

            for rep in range(reps):
                steps = ["one_agent", "one_cp", "two_agents", "two_cp"]
                if rep % 2:
                    steps.reverse()
                for step in steps:
                    t0 = time.perf_counter()
                    if step == "one_agent":
                        await agent(0)
                    elif step == "one_cp":
                        await cp(0)
                    elif step == "two_agents":
                        t0 = time.perf_counter() - await both(agent)
                    else:
                        t0 = time.perf_counter() - await both(cp)
                    out[step].append(time.perf_counter() - t0)
                    if replies:  # what the agents say the copy alone and the check took
                        out[f"{step}_copy_s"].append(max(float(r.seconds) for r in replies))
                        placed = [float((r.placement or {}).get("seconds", 0.0)) for r in replies]
                        out[f"{step}_placement_s"].append(max(placed))
                        replies.clear()
                    for i in range(2):
                        await purge(i)
                        shutil.rmtree(rig.tmpfs / f"cp{i}", ignore_errors=True)
        finally:
            for p in procs:
                p.terminate()
                with anyio.move_on_after(10):
                    await p.wait()
                if p.returncode is None:
                    p.kill()
            tg.cancel_scope.cancel()
    return out


# -- database ingest ---------------------------------------------------------------------------


def agg_csv_with_batch(items: pa.Table, batch_id: str, path: Path) -> None:
    """The aggregates as the agent writes them for COPY (batch_id first, a header)."""
    path.write_bytes(rows_csv(items, batch_id))


def ingest(
    dsn: str, psql: str | None, agg: BatchAggregate, tmp: Path, reps: int, subset: int
) -> dict[str, Any]:
    """Rows per second into `aggregates`: Ledger.commit (the project's COPY path) against
    psql's \\copy of the same rows, asyncpg executemany and copy_records_to_table (on the
    first `subset` rows, 0: all; once each). Each into an emptied table, after a CHECKPOINT,
    alternating."""
    return anyio.run(_ingest, dsn, psql, agg, tmp, reps, subset, backend="asyncio")


async def _ingest(
    dsn: str, psql: str | None, agg: BatchAggregate, tmp: Path, reps: int, subset: int
) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    ledger = Ledger(dsn, schema)
    await ledger.connect()
    if not await ledger.acquire_leadership():
        raise RuntimeError(f"cannot take the leader lock of schema {schema}")
    s = f'"{schema}"'
    rows = agg.items.num_rows
    summary = summarise(agg)
    sub = agg.items.slice(0, min(subset, rows) if subset else rows)
    sub = sub.set_column(4, "confidence", pc.fill_null(sub.column("confidence"), 0.0))
    client_bid = "ingest-client"  # one id for both client paths: the table is emptied between
    columns = [c.to_pylist() for c in sub.select(AGG_COLUMNS[1:]).columns]
    recs = list(zip(itertools.repeat(client_bid, sub.num_rows), *columns, strict=False))
    del columns
    out: dict[str, Any] = {"rows": rows, "subset": sub.num_rows, "schema": schema}
    times: dict[str, list[float]] = {"ours": [], "psql": [], "executemany": [], "copy_records": []}
    conn = await asyncpg.connect(dsn)
    try:

        async def fresh(bid: str) -> None:
            await conn.execute(f"TRUNCATE {s}.aggregates, {s}.model_agreement")
            await conn.execute("CHECKPOINT")
            await ledger.record_seen(
                bid, models_present=[], models_missing=[], first_seen=None, deadline_at=None
            )

        async def ours(bid: str) -> None:
            await fresh(bid)
            # As the agent leaves it in node-local tmpfs, and reports it: the commit opens it
            # by descriptor and hashes it as it sends it, as the daemon's does.
            (tmp / bid).mkdir(exist_ok=True)
            csv = tmp / bid / "aggregates.csv"
            data = await anyio.to_thread.run_sync(rows_csv, agg.items, bid)
            csv.write_bytes(data)
            rows_file = RowsFile(tmp, bid, csv.name, ident_of(csv.stat(), data))
            del data
            t0 = time.perf_counter()
            assert await ledger.commit(bid, summary, rows_file, fields={}) is None
            times["ours"].append(time.perf_counter() - t0)
            csv.unlink()
            (tmp / bid).rmdir()

        async def via_psql(bid: str) -> None:
            assert psql is not None
            await fresh(bid)
            csv = tmp / f"{bid}.csv"
            await anyio.to_thread.run_sync(agg_csv_with_batch, agg.items, bid, csv)
            cmd = f"\\copy {s}.aggregates ({','.join(AGG_COLUMNS)}) FROM '{csv}' CSV HEADER"
            t0 = time.perf_counter()
            await anyio.run_process([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", cmd])
            times["psql"].append(time.perf_counter() - t0)
            csv.unlink()

        async def many(_bid: str) -> None:
            await fresh(client_bid)
            sql = f"INSERT INTO {s}.aggregates ({','.join(AGG_COLUMNS)}) VALUES ($1,$2,$3,$4,$5,$6)"
            t0 = time.perf_counter()
            async with conn.transaction():
                await conn.executemany(sql, recs)
            times["executemany"].append(time.perf_counter() - t0)

        async def records(_bid: str) -> None:
            await fresh(client_bid)
            t0 = time.perf_counter()
            await conn.copy_records_to_table(
                "aggregates", records=recs, columns=AGG_COLUMNS, schema_name=schema
            )
            times["copy_records"].append(time.perf_counter() - t0)

        steps: list[tuple[str, Callable[[str], Any]]] = [("ours", ours), ("executemany", many)]
        steps.append(("copy_records", records))
        if psql:
            steps.insert(1, ("psql", via_psql))
        for rep in range(reps):
            for name, fn in steps if rep % 2 == 0 else list(reversed(steps)):
                if rep == 0 or name in ("ours", "psql"):  # the slow client paths once
                    await fn(f"ingest-{name}-{rep}")
        out["server_version"] = await conn.fetchval("SHOW server_version")
        await conn.execute(f"DROP SCHEMA {s} CASCADE")
    finally:
        await conn.close()
        await ledger.close()
    out["seconds"] = times
    return out


def psql_binary() -> str | None:
    """pgserver's psql (the same build as the embedded server), else one on PATH."""
    try:
        import pgserver

        path = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    return shutil.which("psql")


def psql_version(psql: str | None) -> str:
    """`psql --version`, or '' when there is none."""
    if not psql:
        return ""
    try:
        return subprocess.run([psql, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def codec_table_bytes(table: pa.Table) -> int:
    """The zstd-3 Parquet size of a table (to size the synthetic batches)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3)
    return buf.tell()


# -- the Iceberg lake's commit: ours against pyiceberg's own -----------------------------------


def _iceberg_rows(table: str, n: int) -> pa.Table:
    """`n` rows of one of the lake's tables, every column filled."""
    import datetime as dt

    from coordinator.core.iceberg import arrow_schema

    schema = arrow_schema(table)
    cols: list[pa.Array] = []
    for f in schema:
        if f.name == "batch_id":
            cols.append(pa.array(["bench"] * n, f.type))
        elif pa.types.is_date(f.type):
            cols.append(pa.array([dt.date(2000, 1, 1)] * n, f.type))
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            cols.append(pa.array([f"{f.name}-{i}" for i in range(n)], f.type))
        elif pa.types.is_floating(f.type):
            cols.append(pa.array([i / n for i in range(n)], f.type))
        elif pa.types.is_integer(f.type):
            cols.append(pa.array([i % 7 for i in range(n)], f.type))
        else:
            cols.append(pa.array([["m"]] * n, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def lake_commit(dsn: str, root: Path, rows: int, reps: int) -> dict[str, list[float]]:
    """The Iceberg lake's commit of one batch's four data files, alternating: ours (read the
    catalog rows; the agent's add_files through its preparing catalog, which writes manifests
    and metadata files and fsyncs them; then one transaction with the four compare-and-sets
    and the ledger row's update) against a bare pyiceberg `add_files` of the same files
    through its SQL catalog (a load and a commit per table, nothing fsynced). The same data
    files are registered both ways; each side has its own tables."""
    import sqlalchemy

    from agents.iceberg import Prepared, Preparing, register
    from coordinator.core.iceberg import (
        CATALOG_NAME,
        TABLES,
        LakeSpec,
        ensure_tables,
        open_catalog,
        sqlalchemy_url,
    )

    def spec(side: str) -> LakeSpec:
        schema = f"bench_lake_{side}_{os.getpid()}"
        return LakeSpec(
            sqlalchemy_url(dsn, schema),
            schema,
            "numa",
            f"file://{root / side}",
            {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"},
        )

    ours_spec, anchor_spec = spec("ours"), spec("anchor")
    for s in (ours_spec, anchor_spec):
        ensure_tables(s)
    engine = sqlalchemy.create_engine(ours_spec.catalog_url)
    anchor_catalog = open_catalog(anchor_spec)
    with engine.begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE ledger (batch_id text PRIMARY KEY, state text)"))
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    ours: list[float] = []
    anchor: list[float] = []
    try:
        for rep in range(reps):
            paths = {}
            for t in TABLES:
                p = data / f"{t}-{rep}.parquet"
                pq.write_table(_iceberg_rows(t, rows if t != "agreement" else 21), p)
                paths[t] = str(p)
            batch = f"bench-{rep}"
            with engine.begin() as c:
                c.execute(
                    sqlalchemy.text("INSERT INTO ledger VALUES (:b, 'committed')"), {"b": batch}
                )
            for which in ("ours", "anchor") if rep % 2 == 0 else ("anchor", "ours"):
                if which == "ours":
                    with timer(ours):
                        with engine.connect() as c:
                            bases: dict[str, str] = dict(
                                c.execute(
                                    sqlalchemy.text(
                                        "SELECT table_name, metadata_location FROM iceberg_tables"
                                        " WHERE catalog_name = :c AND table_namespace = 'numa'"
                                    ),
                                    {"c": CATALOG_NAME},
                                ).all()
                            )
                        cat = Preparing({f"numa.{t}": bases[t] for t in TABLES}, {})
                        tables = {t: cat.load_table(f"numa.{t}") for t in TABLES}
                        out = register(cat, batch, tables, paths, Prepared())
                        with engine.begin() as c:
                            for t, (base, new) in out.items():
                                n = c.execute(
                                    sqlalchemy.text(
                                        "UPDATE iceberg_tables SET metadata_location = :n,"
                                        " previous_metadata_location = :b WHERE catalog_name"
                                        " = :c AND table_namespace = 'numa' AND table_name = :t"
                                        " AND metadata_location = :b"
                                    ),
                                    {"n": new, "b": base, "c": CATALOG_NAME, "t": t},
                                ).rowcount
                                if n != 1:
                                    raise RuntimeError(f"bench: {t} moved meanwhile")
                            c.execute(
                                sqlalchemy.text(
                                    "UPDATE ledger SET state = 'archived' WHERE batch_id = :b"
                                ),
                                {"b": batch},
                            )
                else:
                    with timer(anchor):
                        for t in TABLES:
                            anchor_catalog.load_table(f"numa.{t}").add_files(
                                [paths[t]],
                                snapshot_properties={"numa.batch-id": batch},
                                check_duplicate_files=False,
                            )
    finally:
        anchor_catalog.engine.dispose()
        with engine.begin() as c:
            for s in (ours_spec, anchor_spec):
                c.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{s.schema}" CASCADE'))
        engine.dispose()
    return {"ours_s": ours, "anchor_s": anchor, "rows": [float(rows)]}
