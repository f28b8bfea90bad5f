"""One batch's way through the steps after its barrier: stage, cross-check, aggregate, commit,
archive, clean up. Each step records its state in the ledger before the next begins, and every
step is idempotent, so a batch resumed after a crash just runs again from its ledger state.
"""

from __future__ import annotations

import datetime as dt
import enum
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog

from coordinator.core import hooks
from coordinator.core.batch import State, Step, aggregate_node, may_move
from coordinator.core.errors import (
    AgentError,
    CoordinatorError,
    LakeError,
    NoSpaceError,
    NotLeaderError,
    ProtocolError,
    RowsRefused,
)
from coordinator.core.iceberg import LakeSpec
from coordinator.core.lake_paths import batch_key, batch_path
from coordinator.core.messages import (
    Aggregate,
    Archive,
    Crosscheck,
    Ident,
    Purge,
    R,
    Request,
    RowsVia,
    Stage,
)
from coordinator.core.roots import Dir, Root
from coordinator.core.rowsfile import RowsFile
from coordinator.core.summary import AggregateFiles
from coordinator.core.timings import Phase
from coordinator.core.usage import BatchCompression
from coordinator.daemon.barrier import BarrierLoop
from coordinator.daemon.hub import Hub
from coordinator.daemon.ledger import Ledger
from coordinator.daemon.metrics import Metrics
from coordinator.daemon.runs import BatchRun, Runs
from coordinator.daemon.scanner import Scanner

log = structlog.get_logger("coordinator.daemon.pipeline")

STEP_ATTEMPTS = 5


class Commit(enum.Enum):
    """What a commit attempt found, and so what the pipeline does next."""

    GO_ON = "go on"  # the rows are in PostgreSQL (written now, or found committed): archive
    STOP = "stop"  # the batch had finished before (or failed meanwhile): nothing more to do
    ROWS_GONE = "rows gone"  # the agent's rows file vanished, nothing written: aggregate again


@dataclass(frozen=True)
class Context:
    """What a batch's pipeline uses of the daemon: its agents, its ledger, the registry of
    batches, the barrier (the second one, and the quarantine), the staging folder, the
    metrics and the bound on batches between ready and committed."""

    hub: Hub
    ledger: Ledger
    runs: Runs
    barrier: BarrierLoop
    scanner: Scanner
    metrics: Metrics
    lake_root: str
    in_flight: anyio.Semaphore
    last_placement: dict[int, float]  # node -> placement fraction of the last staged batch
    # The Iceberg lake (lake.format = "iceberg"), None for the plain Parquet one; its commits
    # are made one at a time (each is a compare-and-set on the tables' catalog rows).
    lake: LakeSpec | None = None
    lake_lock: anyio.Lock = field(default_factory=anyio.Lock)


def idents_for_agent(idents: dict[str, Ident], *, remote: bool) -> dict[str, Ident]:
    """File identities (inode, size, mtime_ns) as an agent can check them. An agent in another
    kernel (`[[node]] remote`) sees staging through a share (9p, NFS) that numbers inodes its
    own way (Linux's 9p shows the host's inode + 2): its identities carry inode 0, and it
    compares size and mtime_ns alone (agents.staging.is_counted)."""
    if not remote:
        return idents
    return {name: (0, size, mtime_ns) for name, (_, size, mtime_ns) in idents.items()}


def idents_seen_here(staging: Root, batch_id: str, reported: dict[str, Ident]) -> dict[str, Ident]:
    """The identities of the cross-check files a remote agent wrote, as this kernel sees them:
    where the batch folder's crosscheck_<model>.parquet (reached by descriptor, never through
    a link) is a regular file of the reported size and mtime_ns, its inode here goes in;
    otherwise the report stays as it is, and the barrier takes the file for a rewrite.
    (Blocking: run in a thread.)"""
    out = dict(reported)
    try:
        folder = staging.sub(batch_id)
    except OSError:  # gone, or a link: nothing of it is seen here
        return out
    with folder:
        for model, (_, size, mtime_ns) in reported.items():
            try:
                st = folder.lstat(f"crosscheck_{model}.parquet")
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                out[model] = (st.st_ino, size, mtime_ns)
    return out


class Pipeline:
    """Runs one batch from a given step to its end."""

    def __init__(self, ctx: Context, run: BatchRun) -> None:
        self.ctx = ctx
        self.run_ = run
        self.cfg = run.config
        self.ledger = ctx.ledger
        self.log = log.bind(batch_id=run.batch_id)
        self.rows_problem: RowsRefused | None = None  # why the last commit refused the rows

    async def run(self, step: Step) -> None:
        """Run from `step` (stage, archive or cleanup) to the end; on an unrecoverable error
        the batch is `failed` with the reason and its files stay in staging."""
        run = self.run_
        try:
            agg: AggregateFiles | None = None
            if step is Step.STAGE:
                # Bound the batches between ready and committed (e.g. while PostgreSQL is
                # down, newer batches still stage, but only this many).
                async with self.ctx.in_flight:
                    await self._retrying("stage", self.stage)
                    await self._retrying("crosscheck", self.crosscheck)
                    for _ in range(2):
                        # A second round only when the node-local rows went away before the
                        # COPY read them (their agent's tmpfs was purged or lost).
                        agg = await self.aggregate(record=agg is None)
                        committed = await self.commit(agg)
                        if committed is not Commit.ROWS_GONE:
                            break
                    else:
                        raise self.rows_problem or AgentError(
                            "the aggregated rows vanished twice before the commit"
                        )
                    if committed is Commit.STOP:
                        return
                step = Step.ARCHIVE
            if step is Step.ARCHIVE:
                await self._archive_until_done(agg)
                step = Step.CLEANUP
            if step is Step.CLEANUP:
                await self.cleanup()
        except (CoordinatorError, asyncpg.PostgresError, OSError, ValueError) as e:
            # Anything but cancellation fails this batch alone, never the daemon; the files
            # stay in staging and the reason is in the ledger.
            run.error = str(e) if isinstance(e, CoordinatorError) else f"{type(e).__name__}: {e}"
            if not may_move(run.state, State.FAILED):
                # Its rows are in PostgreSQL: it never fails. It stays in status with the
                # error, and the next start resumes it from the ledger (archive, clean-up).
                self.log.error(
                    "step after the commit failed; resumed at the next start", error=run.error
                )
                return
            self.ctx.runs.move(run, State.FAILED)
            self.log.error("batch failed", error=run.error)
            await self._purge()  # node-local copies are never left behind
            await self.ledger.flush(run.batch_id)
            await self.ledger.set_state(
                run.batch_id, State.FAILED, error=run.error, finished_at=dt.datetime.now(dt.UTC)
            )
            self.ctx.runs.finish(run)
        finally:
            run.running = False

    async def _retrying(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Retry a step when an agent died mid-step (a few times, backing off), or when the
        node's tmpfs is full (until batch.deadline_s has passed, waiting for space to return)."""
        delay = 0.5
        attempt = 0
        nospace_since: float | None = None
        while True:
            attempt += 1
            try:
                await fn()
                return
            except NoSpaceError as e:
                now = time.monotonic()
                nospace_since = nospace_since or now
                if now - nospace_since >= self.cfg.batch.deadline_s:
                    raise NoSpaceError(
                        f"node-local tmpfs stayed full for {self.cfg.batch.deadline_s:.0f} s: {e}"
                    ) from e
                self.log.warning("tmpfs full, waiting for space", step=name, error=str(e))
                await anyio.sleep(min(2.0, self.cfg.batch.deadline_s / 4))
            except AgentError as e:
                if attempt >= STEP_ATTEMPTS:
                    raise
                self.log.warning(
                    "step failed, retrying",
                    step=name,
                    attempt=attempt,
                    error=str(e),
                    retry_in_s=delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _on_nodes(self, make: Callable[[int], Request[R]]) -> dict[int, R]:
        """Send one request per node in parallel; return the replies or raise the first error."""
        replies: dict[int, R] = {}
        errors: list[Exception] = []

        async def one(node: int) -> None:
            try:
                replies[node] = await self.ctx.hub.request(
                    node, make(node), within_s=self.cfg.agents.step_timeout_s
                )
            except CoordinatorError as e:
                errors.append(e)

        async with anyio.create_task_group() as tg:
            for n in self.cfg.node_ids:
                tg.start_soon(one, n)
        if errors:
            raise errors[0]
        return replies

    def _idents_for(self, node: int, idents: dict[str, Ident]) -> dict[str, Ident]:
        """File identities as node `node`'s agent can check them (see idents_for_agent)."""
        return idents_for_agent(idents, remote=self.cfg.node(node).remote)

    async def _set(self, state: State, *, durable: bool = False, **fields: Any) -> None:
        """Record a state: intermediate ones through the write-behind queue (the steps before
        the commit are redone on resume), the ones after the commit durably."""
        self.ctx.runs.move(self.run_, state)
        if durable:
            await self.ledger.flush(self.run_.batch_id)
            await self.ledger.set_state(self.run_.batch_id, state, **fields)
        else:
            # Written behind (a crash before the write resumes from the state before:
            # docs/reliability.md, "What a crash can lose").
            self.ledger.set_state_soon(self.run_.batch_id, state, **fields)
        hooks.crash_point(state.value)

    async def stage(self) -> None:
        """Copy the batch into every node's tmpfs (the only cross-node transfer)."""
        run = self.run_
        await self._set(State.STAGING)
        t0 = time.perf_counter()
        files = tuple(f"{m}.parquet" for m in run.models)
        # The agents copy exactly what the barrier counted (checked on the open file).
        idents = {f"{m}.parquet": run.counted[m] for m in run.models if m in run.counted}
        replies = await self._on_nodes(
            lambda n: Stage(batch_id=run.batch_id, files=files, idents=self._idents_for(n, idents))
        )
        run.timings.since(Phase.STAGING, t0)
        for n, r in replies.items():
            run.timings.set(Phase.STAGING, r.seconds * 1000, n)
        run.staged_bytes = {str(n): r.bytes for n, r in replies.items()}
        for n, r in sorted(replies.items()):
            run.add_usage(n, r)
            # Every node reads the same files' footers: the first that could tells.
            run.compression = run.compression or BatchCompression.from_reply(r)
        squeezed: dict[str, Any] = {}
        if run.compression is not None:
            squeezed = {
                "compressed_bytes": run.compression.compressed_bytes,
                "decoded_bytes": run.compression.decoded_bytes,
                "encode_cpu_s": run.compression.encode_cpu_s,
            }
        placement: dict[str, Any] = {
            str(n): r.placement for n, r in replies.items() if r.placement is not None
        }
        low = sorted(
            n
            for n, p in placement.items()
            if float(p.get("fraction", 1.0)) < self.cfg.placement_min_fraction
        )
        for node_key, p in placement.items():
            self.ctx.last_placement[int(node_key)] = float(p.get("fraction", 0.0))
        if low:
            # Flagged, not failed: the data is intact, only slower to read than promised.
            placement["below_min"] = low
            run.placement_flag = (
                f"placement below {self.cfg.placement_min_fraction} on node(s) {', '.join(low)}"
            )
            self.log.warning(
                "node-local placement below the minimum",
                nodes=low,
                fractions={n: placement[n].get("fraction") for n in low},
            )
        run.placement = placement
        await self._set(
            State.STAGED,
            staged_bytes=run.staged_bytes,
            timings=run.timings,
            placement=placement,
            node_usage=run.usage_rows(),
            **squeezed,
        )
        self.log.info("batch staged", bytes=run.staged_bytes)

    async def crosscheck(self) -> None:
        """Ask each node to cross-check its models; wait for the files (the second barrier)."""
        run = self.run_
        await self._set(State.CROSSCHECKING)
        t0 = time.perf_counter()
        models = list(run.models)
        run.cc_counted = {}  # an earlier attempt's files are rewritten now, legitimately
        replies = await self._on_nodes(
            lambda n: Crosscheck(batch_id=run.batch_id, models=tuple(models))
        )
        counted: dict[str, tuple[int, int, int]] = {}
        for n, r in replies.items():
            run.timings.set(Phase.CROSSCHECK, float(r.seconds) * 1000, n)
            run.add_usage(n, r)
            reported = r.idents  # (inode, size, mtime_ns) of each file it wrote
            if self.cfg.node(n).remote:  # as that agent's kernel numbers inodes: ours, please
                reported = await anyio.to_thread.run_sync(
                    idents_seen_here, self.ctx.scanner.root, run.batch_id, reported
                )
            counted |= reported
        # The agents publish before they reply, so every file is final now, and the barrier
        # counts exactly the files they wrote: any other file under those names (a look
        # before the replies may have seen an earlier attempt's) is a rewrite.
        await self.ctx.barrier.crosschecks(run, counted, self.cfg.barrier.reconcile_s)
        run.timings.since(Phase.CROSSCHECK, t0)
        await self._set(State.CROSSCHECKED, timings=run.timings, node_usage=run.usage_rows())

    async def aggregate(self, *, record: bool = True) -> AggregateFiles:
        """Have one node's agent aggregate the batch; the rows stay in its node-local memory
        (aggregates.csv and aggregates.parquet) and only the summary comes back. The node
        follows the batch id; a retry after an agent failure moves to the next node."""
        run = self.run_
        if record:
            await self._set(State.AGGREGATING)
        t0 = time.perf_counter()
        attempt = 0
        agg: AggregateFiles | None = None

        async def step() -> None:
            nonlocal attempt, agg
            node = aggregate_node(run.batch_id, self.cfg.node_ids, attempt)
            attempt += 1
            # The agent copies the cross-check files the second barrier counted, or refuses.
            idents = {
                f"crosscheck_{m}.parquet": run.cc_counted[m]
                for m in run.models
                if m in run.cc_counted
            }
            # An agent in another kernel leaves the rows in the batch's staging folder, the
            # one folder both kernels see; otherwise they stay in its node's memory.
            remote = self.cfg.node(node).remote
            via: RowsVia = "staging" if remote else "tmpfs"
            reply = await self.ctx.hub.request(
                node,
                Aggregate(
                    batch_id=run.batch_id,
                    models=run.models,
                    idents=self._idents_for(node, idents),
                    rows_via=via,
                ),
                within_s=self.cfg.agents.step_timeout_s,
            )
            run.add_usage(node, reply)
            agg = AggregateFiles.from_reply(
                reply,
                node,
                run.batch_id,
                via=via,
                rows_root=self.cfg.paths.staging if remote else self.cfg.agent_paths(node).tmpfs,
                local_root=self.cfg.agent_paths(node).tmpfs,
            )

        await self._retrying("aggregate", step)
        assert agg is not None  # _retrying returns only after a step that set it
        run.timings.since(Phase.AGGREGATE, t0)
        run.timings.set(Phase.AGGREGATE, agg.seconds * 1000, agg.node)
        return agg

    async def commit(self, agg: AggregateFiles) -> Commit:
        """Rows and the ledger's `committed` in one transaction. A retry after a lost
        acknowledgement finds it committed and goes on; a batch that had already finished
        before (published again) is quarantined instead, and one failed meanwhile (by the
        deadline) stops."""
        run = self.run_
        t0 = time.perf_counter()
        rows = _rows_file(agg, remote=self.cfg.node(agg.node).remote)
        while True:
            try:
                found = await self.ledger.commit(
                    run.batch_id, agg.summary, rows, fields={"timings": run.timings}
                )
                break
            except NotLeaderError:
                await anyio.sleep(1.0)  # writes wait until leadership is back
            except AgentError as e:
                self.log.warning("aggregated rows gone before the commit", error=str(e))
                return Commit.ROWS_GONE
            except RowsRefused as e:
                # Not the file the agent wrote (a link, a rewrite: nothing of it committed).
                # Aggregating again writes a fresh one; a second refusal fails the batch.
                self.rows_problem = e
                self.log.error("aggregated rows refused; aggregating again", error=str(e))
                return Commit.ROWS_GONE
        run.timings.since(Phase.COMMIT, t0)
        if found is State.FAILED:
            self.log.warning("batch was marked failed meanwhile; its files stay in staging")
            self.ctx.runs.settle(run, found)
            self.ctx.runs.finish(run)
            return Commit.STOP
        if found in (State.DONE, State.DEGRADED):
            self.log.warning(
                "batch had already finished; its files are quarantined", state=found.value
            )
            await anyio.to_thread.run_sync(self.ctx.barrier.quarantine_all, run.batch_id, found)
            await self._purge()
            self.ctx.runs.settle(run, found)
            self.ctx.runs.finish(run, count=False)  # counted when it finished the first time
            return Commit.STOP
        if found is None:
            self.ctx.metrics.batch_committed(agg.summary)
        await self._set(
            State.COMMITTED, durable=True, timings=run.timings, node_usage=run.usage_rows()
        )
        self.log.info(
            "batch committed",
            rows=agg.summary.rows,
            wrote=found is None,
            kappa=agg.summary.fleiss_kappa,
            aggregated_on=agg.node,
        )
        return Commit.GO_ON

    async def archive(self, agg: AggregateFiles) -> None:
        """The aggregating agent copies the batch into the lake (raw results from its node's
        copies, cross-check results from staging, its aggregates.parquet last); the
        coordinator's own process copies nothing. An Iceberg lake's commit is the
        coordinator's, in the ledger's transaction (`_archive_iceberg`)."""
        if self.ctx.lake is not None:
            async with self.ctx.lake_lock:
                await self._archive_iceberg(agg, self.ctx.lake)
            return
        run = self.run_
        t0 = time.perf_counter()
        reply = await self.ctx.hub.request(
            agg.node,
            Archive(
                batch_id=run.batch_id,
                date=run.date,
                models=run.models,
                # Where a node copy is gone, staging's file is archived only if it is the
                # one the barrier counted.
                idents=self._idents_for(
                    agg.node, {f"{m}.parquet": run.counted[m] for m in run.counted}
                ),
            ),
            within_s=self.cfg.agents.step_timeout_s,
        )
        key = batch_key(run.batch_id, run.date)
        if reply.lake_path != key:
            raise ProtocolError(
                f"agent on node {agg.node}: archived {run.batch_id} at "
                f"{reply.lake_path!r}, expected {key!r} (relative to the lake's root)"
            )
        path = batch_path(self.ctx.lake_root, run.batch_id, run.date)
        run.timings.since(Phase.ARCHIVE, t0)
        run.timings.set(Phase.ARCHIVE, float(reply.seconds) * 1000, agg.node)
        await self._set(
            State.ARCHIVED,
            durable=True,
            lake_path=path,
            timings=run.timings,
            node_usage=run.usage_rows(),  # an aggregation done again after the commit
        )
        self.log.info("batch archived", lake=path, bytes=reply.bytes, node=agg.node)

    async def _archive_iceberg(self, agg: AggregateFiles, lake: LakeSpec) -> None:
        """The agent writes the batch's data files and each table's next metadata file from
        the tables' current metadata locations; this process then swaps the locations in the
        catalog and marks the batch archived in one transaction (docs/lake.md). Raises
        LakeError when a table moved meanwhile (another writer): the retry prepares again."""
        run = self.run_
        t0 = time.perf_counter()
        bases = await self.ledger.lake_locations(lake.schema, lake.namespace)
        reply = await self.ctx.hub.request(
            agg.node,
            Archive(
                batch_id=run.batch_id,
                date=run.date,
                models=run.models,
                idents=self._idents_for(
                    agg.node, {f"{m}.parquet": run.counted[m] for m in run.counted}
                ),
                bases=bases,
                summary=agg.summary.to_wire(),
            ),
            within_s=self.cfg.agents.step_timeout_s,
        )
        commits = dict(reply.commits or {})
        if set(commits) != set(bases) or any(commits[t][0] != bases[t] for t in commits):
            raise ProtocolError(
                f"agent on node {agg.node}: archived {run.batch_id} from metadata "
                f"{commits}, expected the bases {bases}"
            )
        if len({bool(new) for _, new in commits.values()}) > 1:
            # The tables are committed together or not at all: some holding the batch and
            # others not is a lake someone else changed.
            raise LakeError(
                f"lake: batch {run.batch_id} is in some tables and not others: {commits}"
            )
        hooks.crash_point("lake_prepared")  # tests kill -9 here: files written, nothing committed
        run.timings.since(Phase.ARCHIVE, t0)
        run.timings.set(Phase.ARCHIVE, float(reply.seconds) * 1000, agg.node)
        where = commits["aggregates"][1] or bases["aggregates"]
        done = await self.ledger.commit_archive(
            run.batch_id,
            catalog_schema=lake.schema,
            namespace=lake.namespace,
            commits=commits,
            lake_path=where,
            timings=run.timings,
        )
        if not done:
            state = await self.ledger.get(run.batch_id)
            if state is not None and state["state"] in (State.ARCHIVED.value, State.DONE.value):
                self.log.warning("batch was archived before; nothing committed again")
            else:
                raise LakeError(f"lake: a table moved while {run.batch_id} was prepared")
        self.ctx.runs.move(run, State.ARCHIVED)
        hooks.crash_point(State.ARCHIVED.value)
        self.log.info("batch archived", lake=where, bytes=reply.bytes, node=agg.node)

    async def _archive_until_done(self, agg: AggregateFiles | None) -> None:
        """The rows are committed, so the lake must follow: retry a failing lake with backoff
        for as long as it takes (status shows the error meanwhile); never fail the batch.
        Without the agent's aggregates.parquet (a resumed batch, a purged tmpfs) the batch is
        aggregated again from its cross-check files, which stay in staging until cleanup."""
        run = self.run_
        delay = 1.0
        while True:
            try:
                # The memory of an agent in another kernel is not ours to look at: its
                # archive says when the aggregates are gone, and the next round aggregates.
                if agg is None or not (
                    self.cfg.node(agg.node).remote or _archivable(agg, run.models)
                ):
                    if agg is not None:
                        self.log.warning("aggregates gone from node memory; aggregating again")
                    agg = await self.aggregate(record=False)
                await self.archive(agg)
                self.run_.error = ""
                return
            except (OSError, CoordinatorError) as e:
                if agg is not None and self.cfg.node(agg.node).remote:
                    agg = None
                self.run_.error = f"archive failed, retrying in {delay:.0f} s: {e}"
                self.log.error("archive failed; retrying", error=str(e), retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _purge(self) -> None:
        for attempt in range(3):
            try:
                await self._on_nodes(lambda n: Purge(batch_id=self.run_.batch_id))
                return
            except CoordinatorError as e:
                # An agent died mid-purge: try again once it is back. Should that fail too,
                # the agent's next hello lists the copies and the daemon purges them then.
                self.log.warning("purge failed", error=str(e), attempt=attempt + 1)
                await anyio.sleep(0.5)

    async def cleanup(self) -> None:
        """Purge node-local copies, then remove the batch from staging; the batch is done."""
        run = self.run_
        t0 = time.perf_counter()
        await self._purge()
        await anyio.to_thread.run_sync(self.ctx.scanner.remove_batch, run.batch_id)
        run.timings.since(Phase.CLEANUP, t0)
        final = State.DEGRADED if run.degraded else State.DONE
        await self._set(
            final, durable=True, timings=run.timings, finished_at=dt.datetime.now(dt.UTC)
        )
        self.log.info("batch finished", state=final.value, timings=run.timings.to_json())
        self.ctx.runs.finish(run)


def _archivable(agg: AggregateFiles, models: tuple[str, ...]) -> bool:
    """True while the aggregating node still holds what its archive copies: the aggregates
    and the cross-check copies the vote read, each a regular file (looked at by descriptor
    from the node's tmpfs, never through a link: a link there is no copy of the vote's)."""
    folder = agg.parquet.parent
    names = [agg.parquet.name, *(f"crosscheck_{m}.parquet" for m in models)]
    try:
        with Dir.open(folder.parent) as tmpfs, tmpfs.sub(folder.name) as batch:
            return all(stat.S_ISREG(batch.lstat(n).st_mode) for n in names)
    except (OSError, ValueError):
        return False


def _rows_file(agg: AggregateFiles, *, remote: bool) -> RowsFile:
    """The rows CSV to COPY, as the agent reported it; an agent in another kernel numbers
    inodes its own way, so only size, mtime_ns and the content are compared."""
    if agg.rows_ident is None:
        raise ProtocolError(f"agent on node {agg.node}: aggregated reply without rows_ident")
    folder = agg.rows_csv.parent
    return RowsFile(
        folder.parent, folder.name, agg.rows_csv.name, agg.rows_ident, check_inode=not remote
    )
