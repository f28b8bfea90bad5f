"""staging-agent: one long-running process per NUMA node, bound to that node's memory and CPUs.

It connects to the coordinator's agent socket, says hello (with its binding as the kernel reports
it), and then serves requests: stage (copy a batch into node-local tmpfs), crosscheck (run the
cross-check for its node's models reading only node-local copies, publish the results into
staging), aggregate (vote over the whole batch's cross-check results and write the rows
node-locally for the coordinator to COPY), archive (copy the batch into the lake, from this
node's copies where it has them), purge (drop a batch's node-local copies). It sends a
heartbeat every few seconds. See docs/protocol.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import structlog
from anyio.abc import ByteReceiveStream, ByteStream

from agents import accounting, aggregation, binding, placement, ranges
from agents import staging as stg
from agents.consensus import Workers
from agents.crosscheck import CROSSCHECK_SCHEMA, crosscheck_batch, load_crosscheck
from agents.crosscheck import crosscheck as default_crosscheck
from agents.lake import Lake
from coordinator import __version__
from coordinator.core import files, hooks, tls
from coordinator.core.config import Config, load_config
from coordinator.core.errors import (
    BindingError,
    ConfigError,
    CoordinatorError,
    StagingError,
    error_code,
)
from coordinator.core.lake_paths import batch_key
from coordinator.core.logs import configure
from coordinator.core.messages import (
    Aggregate,
    Aggregated,
    Archive,
    Archived,
    Crosscheck,
    Crosschecked,
    Error,
    Heartbeat,
    Hello,
    Message,
    Purge,
    Purged,
    Reply,
    Request,
    Stage,
    Staged,
    StepName,
    decode,
    encode,
)
from coordinator.core.protocol import LineReader
from coordinator.core.roots import Dir, Root, fd_path
from coordinator.core.summary import PARQUET_NAME, rows_name

log = structlog.get_logger("agents.agent")

# Exit codes: 0 stopped cleanly, 1 error, 2 usage, 3 refused (not bound as told).
EXIT_UNBOUND = 3
Ident = tuple[int, int, int]  # a file's (inode, size, mtime_ns), as the second barrier counts it
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")  # a lake partition (date=YYYY-MM-DD)


class Agent:
    """The agent's request handlers, independent of the socket so tests can call them."""

    def __init__(self, config: Config, node: int, bind_node: int | None = None) -> None:
        self.config = config
        self.node = node
        # The NUMA node of this agent's own kernel it is bound to, where its copies must land:
        # `node` itself, or, in a VM on host node `node`, the guest's node (--bind-node).
        self.bind_node = node if bind_node is None else bind_node
        # The folders as this agent sees them ([[node]] staging, tmpfs, lake where its kernel
        # mounts them elsewhere); every path it sends is relative to one of them.
        paths = config.agent_paths(node)
        self.tmpfs = paths.tmpfs
        self.models = config.node(node).models
        self.crosscheck_fn = load_crosscheck(config.crosscheck_function)
        # The cross-check's and aggregation's threads: the cores the agent is bound to.
        self.threads = config.agents.threads or len(os.sched_getaffinity(0))
        self.lake = Lake(paths.lake)
        self.lake_uri = paths.lake
        # Every file under these is reached from their descriptors, never followed through a
        # link (coordinator.core.roots): staging is shared with the models' writers.
        self.staging = Root(paths.staging)
        self.local = Root(self.tmpfs, create=True)
        self.meter = accounting.Meter()  # each step's peak RSS and CPU seconds

    def batch_dir(self, batch_id: str) -> Path:
        """The node-local folder of one batch."""
        return self.tmpfs / self.batch_id(batch_id)

    @staticmethod
    def batch_id(batch_id: str) -> str:
        """`batch_id` if it is a valid batch id (so, one plain name), else ValueError."""
        return files.check_name("batch_id", str(batch_id))

    def stage(self, msg: Stage) -> Staged:
        """Copy the batch's files into node-local tmpfs; say where the source pages were, what
        the files' footers say of their compression, and the step's peak RSS."""
        sources = _PageLooks(self.bind_node, "stage")
        with self.meter.step() as usage:
            reply = self._stage(msg, sources.look)
            with self.local.sub(reply.batch_id) as local:
                squeezed = _compression(local, list(msg.files))
        return replace(reply, **sources.copied(), **squeezed, peak_rss=usage.peak_rss)

    def _stage(self, msg: Stage, on_source: Callable[[str, int], None]) -> Staged:
        batch_id = self.batch_id(msg.batch_id)
        names = list(msg.files)
        for n in names:
            if "/" in n or n.startswith("."):
                raise CoordinatorError(f"stage: bad file name {n!r}")
        t0 = time.perf_counter()
        # Measured every time, also for copies staged by an earlier request: the kernel may
        # have moved pages since, and the reply is what the ledger records for this attempt.
        # Each copy is measured in a second thread while the next one is made, so the check
        # adds about one file's measurement to the step, not the whole batch's.
        measured: dict[str, Future[placement.BatchPlacement]] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="placement") as pool:

            def check(name: str, path: Path) -> None:
                # The copy's folder, held open for the measurement (stage closes its own).
                fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

                def measure() -> placement.BatchPlacement:
                    try:
                        return placement.measure({name: Path(fd_path(fd)) / name}, self.bind_node)
                    finally:
                        os.close(fd)

                measured[name] = pool.submit(measure)

            with self.staging.sub(batch_id) as src:
                files = stg.stage(
                    src,
                    self.local.dir(),
                    batch_id,
                    names,
                    check,
                    expected=msg.idents,
                    on_source=on_source,
                )
            # tests change staging here, between stage and cross-check
            hooks.pause("staged", batch_id)
            seconds = time.perf_counter() - t0
            reply = Staged(
                batch_id=batch_id,
                bytes=sum(f.bytes for f in files),
                seconds=seconds,
                files={f.name: {"bytes": f.bytes, "seconds": f.seconds} for f in files},
                tmpfs_free=stg.free_bytes(self.tmpfs),
                node=self.node,
            )
            try:
                parts = [measured[n].result() for n in names]
            except OSError as e:
                log.error("could not measure placement", batch_id=batch_id, error=str(e))
                return reply
        where = placement.BatchPlacement(
            self.bind_node,
            parts[0].method if parts else placement.usable_method(),
            {n: f for p in parts for n, f in p.files.items()},
            sum(p.seconds for p in parts),
        )
        if where.fraction < 1.0:
            log.warning(
                "staged pages off this node",
                batch_id=batch_id,
                fraction=where.fraction,
                nodes=where.nodes(),
            )
        return replace(reply, placement=where.as_dict())

    def crosscheck(self, msg: Crosscheck) -> Crosschecked:
        """Cross-check this node's models against all present models, from node-local copies."""
        with self.meter.step() as usage:
            reply = self._crosscheck(msg)
        return replace(reply, peak_rss=usage.peak_rss)

    def _crosscheck(self, msg: Crosscheck) -> Crosschecked:
        batch_id = msg.batch_id
        present = list(msg.models)
        mine = [m for m in present if m in self.models]
        t0 = time.perf_counter()
        with self.local.sub(self.batch_id(batch_id)) as local:
            # Where the copies' pages are just before the read (all on this node, unless the
            # placement went wrong), and the process's CPU seconds reading them.
            read = _PageLooks(self.bind_node, "crosscheck").read(
                local, [f"{m}.parquet" for m in present]
            )
            if self.crosscheck_fn is default_crosscheck:
                idents, decode_cpu, n_ranges = self._crosscheck_ranges(
                    batch_id, local, present, mine
                )
            else:
                idents, decode_cpu = self._crosscheck_plugin(batch_id, local, present, mine)
                n_ranges = 1
        outputs = {model: f"crosscheck_{model}.parquet" for model in mine}
        return Crosschecked(
            batch_id=batch_id,
            outputs=outputs,
            idents=idents,
            seconds=time.perf_counter() - t0,
            node=self.node,
            **read,
            decode_cpu_s=round(decode_cpu, 6),
            ranges=n_ranges,
        )

    def _crosscheck_ranges(
        self, batch_id: str, local: Dir, present: list[str], mine: list[str]
    ) -> tuple[dict[str, Ident], float, int]:
        """The default cross-check: the batch's vote matrix built once for all of this node's
        models, from the files' own dictionaries; in ranges of item ids when the batch does
        not fit the memory budget (`agents.ranges`), each model's file written part by part."""
        decode_cpu = 0.0
        with (
            ranges.RangedBatch(local, present, read_dictionary=("prediction",)) as batch,
            self.staging.sub(batch_id) as folder,
            contextlib.ExitStack() as stack,
            Workers(self.threads) as workers,  # one pool for every range
        ):
            plan = batch.plan(self.config.agents.memory_budget, local, workers)
            if len(plan) > 1:
                log.info("cross-check in ranges of item ids", batch_id=batch_id, ranges=len(plan))
            writers = {
                m: stack.enter_context(self._parts_writer(folder, f"crosscheck_{m}.parquet"))
                for m in mine
            }
            for rng in plan:
                with accounting.cpu_seconds() as cpu:
                    tables = batch.read(rng, workers)
                decode_cpu += cpu[0]
                crosscheck_batch(mine, tables, lambda m, t: writers[m].write(t), workers=workers)
                del tables
            batch.check_complete()

            def commit(model: str) -> Ident:
                # Into the batch folder opened anew: one swapped for a link meanwhile is refused.
                with self.staging.sub(batch_id) as into:
                    st = writers[model].commit(into)
                hooks.pause("crosscheck", batch_id)  # tests kill the agent here, mid-cross-check
                # The second barrier counts exactly these files: another file under the name
                # is a rewrite (quarantined), never aggregated.
                return (st.st_ino, st.st_size, st.st_mtime_ns)

            done = workers.map(commit, mine)
        return dict(zip(mine, done, strict=True)), decode_cpu, len(plan)

    def _crosscheck_plugin(
        self, batch_id: str, local: Dir, present: list[str], mine: list[str]
    ) -> tuple[dict[str, Ident], float]:
        """A plug-in cross-check: plain strings, the whole batch, one model at a time."""
        with accounting.cpu_seconds() as decode_cpu:
            tables = files.read_results(local, present)
        idents = {}
        for model in mine:
            table = self.crosscheck_fn(model, tables)
            # Opened anew for each file: a batch folder swapped for a link meanwhile is refused.
            with self.staging.sub(batch_id) as folder:
                st = files.write_parquet_at(
                    folder,
                    f"crosscheck_{model}.parquet",
                    table,
                    compression=self.config.parquet.compression,
                    level=self.config.parquet.level,
                    sorted_by_id=files.is_sorted_by_id(table),
                )
            hooks.pause("crosscheck", batch_id)  # tests kill the agent here, mid-cross-check
            idents[model] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return idents, decode_cpu[0]

    def _parts_writer(self, folder: Dir, name: str) -> files.PartsWriter:
        return files.PartsWriter(
            folder,
            name,
            CROSSCHECK_SCHEMA,
            compression=self.config.parquet.compression,
            level=self.config.parquet.level,
            sorted_by_id=True,
        )

    def aggregate(self, msg: Aggregate) -> Aggregated:
        """Aggregate the whole batch from its cross-check results; the rows stay node-local
        (aggregates.csv and aggregates.parquet) and only the summary goes back."""
        with self.meter.step() as usage:
            reply = self._aggregate(msg)
        return replace(reply, peak_rss=usage.peak_rss)

    def _aggregate(self, msg: Aggregate) -> Aggregated:
        batch_id = msg.batch_id
        models = list(msg.models)
        rows_name(msg.rows_via)  # ProtocolError on a value it does not know, before any work
        with (
            self.staging.sub(self.batch_id(batch_id)) as src,
            self.local.sub(batch_id, create=True) as local,
        ):
            # The cross-check files in staging, where their pages are just before the copy
            # (the other nodes' files on the other nodes: this step's cross-node transfer),
            # and, after the vote, the node-local copies it read (expected all on this node).
            names = [f"crosscheck_{m}.parquet" for m in models]
            copied = _PageLooks(self.bind_node, "aggregate").copied_from(src, names)
            out = aggregation.aggregate_batch(
                src,
                local,
                self.batch_dir(batch_id),
                batch_id,
                models,
                self.node,
                expected=msg.idents,
                compression=self.config.parquet.compression,
                level=self.config.parquet.level,
                rows_via=msg.rows_via,
                threads=self.threads,
                memory_budget=self.config.agents.memory_budget,
            )
            read = _PageLooks(self.bind_node, "aggregate").read(local, names)
        ident = out.rows_ident
        assert ident is not None  # aggregate_batch reports what it wrote
        # tests kill the agent here (or change staging), its files written, unanswered
        hooks.pause("aggregate", batch_id)
        return Aggregated(  # paths relative to the roots (docs/protocol.md §3)
            batch_id=batch_id,
            summary=out.summary.to_wire(),
            rows_csv=f"{batch_id}/{rows_name(msg.rows_via)}",
            parquet=f"{batch_id}/{PARQUET_NAME}",
            seconds=out.seconds,
            rows_ident=(ident.inode, ident.size, ident.mtime_ns),
            rows_sha256=ident.sha256,
            node=self.node,
            **copied,
            **read,
            ranges=out.ranges,
        )

    def archive(self, msg: Archive) -> Archived:
        """Copy the batch into the lake: the models' results from this node's copies (the
        content the barrier counted; staging's file only where the copy is gone), the
        cross-check results from staging, and this node's aggregates.parquet last."""
        batch_id = msg.batch_id
        date = msg.date
        if not DATE_RE.fullmatch(date):
            raise CoordinatorError(f"archive of {batch_id}: date {date!r} is not YYYY-MM-DD")
        models = [files.check_name("model", m) for m in msg.models]
        with self.meter.step():  # not measured, but a step beside which no other resets
            return self._archive(msg, batch_id, date, models)

    def _archive(self, msg: Archive, batch_id: str, date: str, models: list[str]) -> Archived:
        counted = msg.idents
        t0 = time.perf_counter()
        fds: list[tuple[str, int]] = []
        try:
            with self.local.sub(self.batch_id(batch_id)) as local:
                # The models' results from this node's copies (the content the barrier
                # counted); from staging only where a copy is gone, and then only the counted
                # file. The cross-check results and the aggregates are the node-local copies
                # the aggregation read: what reaches the lake is what was verified, opened
                # once, by descriptor.
                for m in models:
                    name = f"{m}.parquet"
                    if local.exists(name):
                        fds.append((name, _open_checked(local, name, None)))
                    else:
                        with self.staging.sub(batch_id) as src:
                            fds.append((name, _open_checked(src, name, counted.get(name))))
                for name in [f"crosscheck_{m}.parquet" for m in models] + [PARQUET_NAME]:
                    if not local.exists(name):
                        raise StagingError(
                            f"archive of {batch_id}: {local.where(name)} is gone from node "
                            "memory; the batch is aggregated again"
                        )
                    fds.append((name, _open_checked(local, name, None)))
            commits: dict[str, tuple[str, str]] | None = None
            if msg.bases:
                nbytes, commits = self._archive_iceberg(msg, dict(fds))
            else:
                _, nbytes = self.lake.archive_fds(batch_id, date, fds)
        finally:
            for _, fd in fds:
                os.close(fd)
        return Archived(
            batch_id=batch_id,
            lake_path=batch_key(batch_id, date),  # relative to the lake's root
            bytes=nbytes,
            seconds=time.perf_counter() - t0,
            node=self.node,
            commits=commits,
        )

    def _archive_iceberg(
        self, msg: Archive, sources: dict[str, int]
    ) -> tuple[int, dict[str, tuple[str, str]]]:
        """The Iceberg lake: write the batch's data files and each table's next metadata file
        from the locations the coordinator sent; the coordinator commits them (docs/lake.md)."""
        from agents import iceberg
        from coordinator.core.iceberg import warehouse_and_properties
        from coordinator.core.summary import AggregateSummary

        _, props = warehouse_and_properties(self.lake_uri, self.config.lake.credentials_file)
        rows = iceberg.rows_for(
            msg.batch_id,
            msg.date,
            list(msg.models),
            sources,
            AggregateSummary.from_wire(msg.summary or {}),
        )
        prepared = iceberg.prepare_batch(
            msg.batch_id, msg.date, self.config.lake.namespace, msg.bases or {}, rows, props
        )
        return prepared.bytes, dict(prepared)

    def purge(self, msg: Purge) -> Purged:
        """Drop the batch's node-local copies."""
        batch_id = self.batch_id(msg.batch_id)
        freed = stg.purge(self.local.dir(), batch_id)
        return Purged(batch_id=batch_id, bytes=freed, node=self.node)

    def staged_batches(self) -> list[str]:
        """Batch folders in this node's tmpfs."""
        try:
            entries = self.local.dir().entries()
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def tmpfs_usage(self) -> dict[str, int]:
        """Used and free bytes of the node-local tmpfs."""
        root = self.local.dir()
        used = 0
        for d in root.entries():
            try:
                if d.is_dir(follow_symlinks=False):
                    with root.sub(d.name) as batch:
                        used += sum(e.stat(follow_symlinks=False).st_size for e in batch.entries())
            except FileNotFoundError:
                pass  # a batch purged, or a temp file renamed, while we looked: next beat
        return {"tmpfs_used": used, "tmpfs_free": root.free_bytes()}


class _PageLooks:
    """Where the pages of the files a step copies or reads are (agents.placement.file_bytes),
    as the fields of its reply. A look that fails is logged and leaves the fields out: the
    step itself never fails for it."""

    def __init__(self, node: int, step: str) -> None:
        self.node = node
        self.step = step
        self.seen = placement.NodeBytes(node)
        self.failed = False

    def look(self, name: str, fd: int) -> None:
        """Add one open file (staging.copy_file's `inspect`)."""
        if self.failed:
            return
        try:
            self.seen = self.seen + placement.count_bytes({name: fd}, self.node)
        except OSError as e:
            self.failed = True
            log.error("could not tell where pages are", step=self.step, file=name, error=str(e))

    def _each(self, folder: Dir, names: Sequence[str]) -> None:
        for name in names:
            try:
                fd = folder.open_file(name)
            except OSError as e:
                self.failed = True
                log.error("could not tell where pages are", step=self.step, error=str(e))
                return
            try:
                self.look(name, fd)
            finally:
                os.close(fd)

    def copied(self) -> dict[str, Any]:
        """The `staged` fields: the bytes copied from another node's pages, from none."""
        if self.failed:
            return {}
        if self.seen.other_nodes:
            log.info(
                "copied from another node's memory",
                step=self.step,
                bytes=self.seen.other_nodes,
                nodes=self.seen.nodes(),
            )
        return {
            "copied_remote": self.seen.other_nodes,
            "copied_absent": self.seen.not_in_memory,
            "source_nodes": self.seen.nodes(),
        }

    def copied_from(self, folder: Dir, names: Sequence[str]) -> dict[str, Any]:
        """The `aggregated` fields of the files `names` in `folder`, about to be copied."""
        self._each(folder, names)
        if self.failed:
            return {}
        return {
            "copied_bytes": self.seen.total,
            "copied_remote": self.seen.other_nodes,
            "copied_absent": self.seen.not_in_memory,
        }

    def read(self, folder: Dir, names: Sequence[str]) -> dict[str, Any]:
        """The `read_bytes` and `read_remote` fields of the node-local files `names`."""
        self._each(folder, names)
        if self.failed:
            return {}
        if self.seen.not_local:
            log.warning(
                "reading pages off this node",
                step=self.step,
                bytes=self.seen.not_local,
                nodes=self.seen.nodes(),
            )
        return {"read_bytes": self.seen.total, "read_remote": self.seen.not_local}


def _compression(folder: Dir, names: Sequence[str]) -> dict[str, Any]:
    """The `staged` fields of the batch's copies from their footers: bytes stored and decoded,
    and the writers' CPU seconds when every file recorded them. Left out (and logged) when a
    footer cannot be read: the cross-check names such a file."""
    stored = decoded = 0
    cpu: float | None = 0.0
    for name in names:
        try:
            fd = folder.open_file(name)
            try:
                c = files.compression_of(pq.read_metadata(fd_path(fd)), folder.where(name))
            finally:
                os.close(fd)
        except (OSError, ValueError, pa.ArrowException) as e:
            log.error("could not read a footer's compression", file=name, error=str(e))
            return {}
        stored += c.compressed
        decoded += c.decoded
        cpu = None if cpu is None or c.encode_cpu_s is None else cpu + c.encode_cpu_s
    out: dict[str, Any] = {"compressed_bytes": stored, "decoded_bytes": decoded}
    if cpu is not None:
        out["encode_cpu_s"] = round(cpu, 6)
    return out


def _open_checked(folder: Dir, name: str, expected: tuple[int, int, int] | None) -> int:
    """Open `folder/name` for reading (never through a link) and check it is a single-linked
    regular file, and the counted one where `expected` is given; return the descriptor."""
    fd = folder.open_file(name)
    try:
        stg.check_source(folder.where(name), os.fstat(fd), expected)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Link:
    """Where the coordinator is: its Unix socket, or tcp://HOST:PORT with mutual TLS."""

    socket: Path | None = None
    endpoint: tls.Endpoint | None = None
    ssl_context: ssl.SSLContext | None = None
    cluster: str = "numa"
    dead_after_s: float = 10.0

    def __str__(self) -> str:
        return str(self.endpoint) if self.endpoint is not None else str(self.socket)

    async def open(self) -> tuple[ByteStream, ByteReceiveStream]:
        """A new connection: the stream, and its receiving side (over TCP, one that ends
        when nothing arrives for dead_after_s: the coordinator pings every heartbeat_s)."""
        if self.endpoint is None:
            assert self.socket is not None
            unix = await anyio.connect_unix(self.socket)
            return unix, unix
        assert self.ssl_context is not None
        stream = await tls.connect(
            self.endpoint, self.ssl_context, self.cluster, dead_after_s=self.dead_after_s
        )
        return stream, tls.IdleTimeout(stream, self.dead_after_s)


def _connection_lost(e: BaseException) -> bool:
    """True for what ends a connection, not the agent: the coordinator away or refusing,
    TLS errors, a dead connection (also inside a task group's ExceptionGroup)."""
    if isinstance(e, BaseExceptionGroup):
        return all(_connection_lost(x) for x in e.exceptions)
    return isinstance(
        e,
        OSError | anyio.BrokenResourceError | anyio.ClosedResourceError | anyio.EndOfStream,
    )


def _first(e: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def serve(agent: Agent, link: Link, bound: binding.Binding) -> bool:
    """Connect to the coordinator and serve requests until it goes away or we are cancelled;
    True when the coordinator accepted the connection (anything came from it)."""
    stream, received = await link.open()
    send_lock = anyio.Lock()
    accepted = False

    async def send(msg: Message) -> None:
        async with send_lock:
            await stream.send(encode(msg))

    def step(msg: Request[Reply]) -> Reply:
        match msg:
            case Stage():
                return agent.stage(msg)
            case Crosscheck():
                return agent.crosscheck(msg)
            case Aggregate():
                return agent.aggregate(msg)
            case Archive():
                return agent.archive(msg)
            case Purge():
                return agent.purge(msg)
        raise AssertionError(f"no handler for {msg.TYPE}")

    async def handle(msg: Request[Reply]) -> None:
        reply: Reply
        try:
            reply = await anyio.to_thread.run_sync(step, msg)
        except Exception as e:
            log.error("step failed", step=msg.TYPE, batch_id=msg.batch_id, error=str(e))
            # The code tells the coordinator whether a retry can help (errors.ERROR_CODES).
            reply = Error(
                step=cast(StepName, msg.TYPE),  # every request's TYPE is a StepName
                code=error_code(e),
                message=str(e),
                batch_id=msg.batch_id,
                node=agent.node,
            )
        try:
            await send(replace(reply, req=msg.req, node=agent.node))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            # The connection went away meanwhile: the coordinator asks again after hello.
            log.warning("reply lost with the connection", step=msg.TYPE, error=repr(e))

    async def heartbeat() -> None:
        while True:
            usage = agent.tmpfs_usage()
            await send(
                Heartbeat(
                    node=agent.node,
                    time=time.time(),
                    tmpfs_used=usage["tmpfs_used"],
                    tmpfs_free=usage["tmpfs_free"],
                )
            )
            await anyio.sleep(agent.config.agents.heartbeat_s)

    try:
        async with anyio.create_task_group() as tg:
            await send(
                Hello(
                    node=agent.node,
                    pid=os.getpid(),
                    version=__version__,
                    models=tuple(agent.models),
                    tmpfs=str(agent.tmpfs),
                    # Batches with copies here: the coordinator purges those no longer in flight.
                    staged_batches=tuple(agent.staged_batches()),
                    policy=bound.policy,
                    mems=bound.mems,
                    cpus=bound.cpus,
                )
            )
            tg.start_soon(heartbeat)
            reader = LineReader(received)
            while (line := await reader.readline()) is not None:
                if not accepted:
                    accepted = True
                    log.info("connected to the coordinator", at=str(link))
                msg = decode(line)
                if isinstance(msg, Request):
                    tg.start_soon(handle, msg)
            if accepted:
                log.info("coordinator closed the connection")
            else:
                log.warning(
                    "the coordinator closed the connection before accepting this agent "
                    "(its log says why: over TCP, a certificate that does not name "
                    f"{tls.node_name(agent.node, link.cluster)}?)",
                    at=str(link),
                )
            tg.cancel_scope.cancel()
    except Exception as e:
        if not _connection_lost(e):
            raise
        cause = _first(e)
        if isinstance(cause, tls.DeadConnection):
            log.warning("coordinator connection dead; closing it", at=str(link), why=str(cause))
        elif accepted:
            log.warning("connection to the coordinator lost", at=str(link), error=repr(cause))
        else:
            raise  # not accepted: the caller's backoff logs it
    finally:
        await anyio.aclose_forcefully(stream)
    return accepted


async def run(agent: Agent, link: Link, bound: binding.Binding) -> None:
    """Keep a connection to the coordinator, reconnecting when it restarts or goes silent
    (exponential backoff with jitter, up to agents.reconnect_max_s); stop on TERM/INT."""
    import signal

    async with anyio.create_task_group() as tg:

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    log.info("stopping on signal")
                    tg.cancel_scope.cancel()
                    return

        async def connect_loop() -> None:
            longest = agent.config.agents.reconnect_max_s
            delay = 0.05
            while True:
                try:
                    if await serve(agent, link, bound):
                        delay = 0.05  # it was accepted: the coordinator restarted, or was silent
                        continue
                    error = "closed before accepting this agent"
                except Exception as e:
                    if not _connection_lost(e):
                        raise
                    cause = _first(e)
                    error = repr(cause)
                    if isinstance(cause, ssl.SSLCertVerificationError):
                        log.warning(
                            "refusing the coordinator's certificate",
                            at=str(link),
                            why=cause.verify_message,
                            expected=tls.coordinator_name(link.cluster),
                        )
                    elif isinstance(cause, ssl.SSLError):
                        # TLS 1.3: the coordinator's verdict on our certificate comes after
                        # the handshake, as an alert (expired, another CA).
                        log.warning(
                            "the coordinator refused the TLS session",
                            at=str(link),
                            why=cause.reason or str(cause),
                        )
                wait = delay * random.uniform(0.5, 1.0)
                if delay >= 1.0 or link.endpoint is not None:
                    log.info(
                        "waiting for the coordinator",
                        at=str(link),
                        error=error,
                        retry_in_s=round(wait, 2),
                    )
                await anyio.sleep(wait)
                delay = min(delay * 2, longest)

        tg.start_soon(signals)
        tg.start_soon(connect_loop)


def die_with_parent(parent: int) -> None:
    """Under `coordinatord --with-agents`: get SIGTERM when the coordinator dies (even by
    kill -9), so a restarted coordinator never meets an orphaned agent for the same node."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)


def make_link(config: Config, args: argparse.Namespace) -> Link:
    """Where to connect: --connect, else agents.listen; over TCP with this agent's TLS files
    (--tls-cert/--tls-key/--tls-ca, else the config's), read now: ConfigError naming a file
    that is missing, unreadable, or a key others may read."""
    where = args.connect or config.agents.listen
    if where == "unix":
        return Link(socket=Path(args.socket) if args.socket else config.paths.agent_socket)
    files = tls.agent_files(config, args.node, cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    return Link(
        endpoint=tls.parse_endpoint(where),
        ssl_context=tls.client_context(files),
        cluster=config.agents.cluster,
        dead_after_s=config.agents.dead_after_s,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `staging-agent`."""
    p = argparse.ArgumentParser(prog="staging-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node", type=int, required=True, help="the NUMA node this agent serves")
    p.add_argument("--config", required=True, help="coordinator.toml")
    p.add_argument("--socket", help="agent socket (default: paths.runtime_dir/agents.sock)")
    p.add_argument(
        "--connect",
        help="unix, or tcp://HOST:PORT of the coordinator (mutual TLS); default: agents.listen",
    )
    p.add_argument(
        "--bind-node",
        type=int,
        metavar="G",
        help="the NUMA node, as this agent's own kernel numbers them, that numactl binds it to "
        "and its copies must land on: a VM's guest node, when the VM sits on host node --node "
        "(only for a remote = true node); default: --node",
    )
    p.add_argument("--tls-cert", help="this agent's certificate (default: agents.agent_tls_cert)")
    p.add_argument("--tls-key", help="this agent's private key (default: agents.agent_tls_key)")
    p.add_argument("--tls-ca", help="the CA to trust (default: agents.tls_ca)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connect not in (None, "unix"):
        try:
            tls.parse_endpoint(args.connect)
        except ValueError as e:
            p.error(f"--connect: {e}")
    if args.bind_node is not None and args.bind_node < 0:
        p.error(f"--bind-node: {args.bind_node} is not a NUMA node number (0 or more)")
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"staging-agent: error: {e}", file=sys.stderr)
        return 1
    configure(config.log.level, config.log.format, node=args.node, role="agent")
    try:
        node_cfg = config.node(args.node)
        bind_node = args.node if args.bind_node is None else args.bind_node
        if bind_node != args.node and not node_cfg.remote:
            raise ConfigError(
                f"--bind-node {bind_node} differs from --node {args.node}, but node "
                f"{args.node} is not remote = true in {args.config}: an agent in the "
                "coordinator's own kernel binds to its node itself"
            )
        bound = binding.check(bind_node, cpus=node_cfg.cpus)
    except (BindingError, ConfigError) as e:
        log.error("refusing to run", reason=str(e))
        print(f"staging-agent: refusing to run on node {args.node}: {e}", file=sys.stderr)
        return EXIT_UNBOUND
    try:
        agent = Agent(config, args.node, bind_node)
    except ConfigError as e:
        print(f"staging-agent: error: {e}", file=sys.stderr)
        return 1
    try:
        link = make_link(config, args)
    except ConfigError as e:
        log.error("refusing to run", reason=str(e))
        print(f"staging-agent: error: {e}", file=sys.stderr)
        return 1
    removed = stg.remove_partials(agent.local.dir())
    if removed:
        log.warning("removed partial copies left by a previous agent", files=removed)
    # Bulk copies and cross-checks yield to the coordinator's event loop when CPUs are short.
    os.nice(5)
    log.info("agent started", pid=os.getpid(), bind_node=bind_node, **bound.as_dict())
    anyio.run(run, agent, link, bound, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
