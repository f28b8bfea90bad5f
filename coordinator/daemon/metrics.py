"""Prometheus metrics (docs/observability.md): one registry per daemon, served over HTTP and on
the control socket.

Two kinds of metric. What happened (batches by final state, phase durations, bytes staged,
barrier latency, event-loop lag) is counted when it happens, through the few calls the daemon
makes: `batch_ready`, `batch_committed`, `batch_finished`, `loop_lag`. What *is* (agents
connected, heartbeat age, tmpfs free, database up, config generation, watcher counters) is read
from the daemon at scrape time by a collector, so the daemon needs no calls for it and a scrape
never shows a stale copy. Agents' numbers reach this one endpoint through their heartbeats and
step replies, labelled by `node`.

Everything runs on the event loop (the HTTP endpoint is an anyio handler, not a thread), so a
scrape reads the daemon's state without locks.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from coordinator import __version__
from coordinator.core.batch import FINAL, State
from coordinator.core.errors import ConfigError
from coordinator.core.summary import AggregateSummary
from coordinator.daemon.runs import BatchRun
from coordinator.daemon.status import Status

log = structlog.get_logger("coordinator.daemon.metrics")

PREFIX = "numa_coordinator"

# Ledger timing key -> `phase` label of numa_coordinator_batch_phase_duration_seconds.
PHASES: Mapping[str, str] = {
    "barrier_wait_ms": "barrier_wait",
    "staging_ms": "staging",
    "crosscheck_ms": "crosscheck",
    "aggregate_ms": "aggregate",
    "commit_ms": "commit",
    "archive_ms": "archive",
    "cleanup_ms": "cleanup",
}
# Phases whose per-node parts (`staging_node0_ms`, `crosscheck_node1_ms`) are observed.
NODE_PHASES = ("staging", "crosscheck", "aggregate", "archive")
# `step` label -> the NodeUsage fields of its bytes: all, on another node, not in memory.
_STEPS: Mapping[str, tuple[str, str, str]] = {
    "stage": ("stage_copied_bytes", "stage_remote_bytes", "stage_absent_bytes"),
    "crosscheck": ("crosscheck_read_bytes", "crosscheck_remote_bytes", ""),
    "aggregate_copy": (
        "aggregate_copied_bytes",
        "aggregate_copied_remote_bytes",
        "aggregate_copied_absent_bytes",
    ),
    "aggregate": ("aggregate_read_bytes", "aggregate_remote_bytes", ""),
}
FINAL_STATES = tuple(s.value for s in State if s in FINAL)
IN_FLIGHT_STATES = tuple(s.value for s in State if s not in FINAL)
DAEMON_STATES = ("starting", "connecting", "standby", "running", "degraded", "stopping", "stopped")

# fmt: off
# A phase takes milliseconds (commit of a small batch) to the whole deadline (barrier wait).
PHASE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
)
# Last file to ready is debounce + settle + a scan: tens of ms when the watcher sees it, up
# to barrier.reconcile_s when only a reconciliation scan does.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# The loop should never block for more than a few milliseconds (docs/architecture.md).
LAG_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)
# fmt: on

HTTP_HEAD_MAX = 16 * 1024
HTTP_TIMEOUT_S = 5.0
_QUOTED = re.compile(r"\s*('[^']*'|\"[^\"]*\")")


def reason_label(reason: str) -> str:
    """A rejection reason without the names it quotes, so the label set stays small."""
    return _QUOTED.sub("", reason).strip() or "unknown"


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ConfigError naming metrics.listen."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics.listen: expected host:port such as 127.0.0.1:9464, got {listen!r}"
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass
class _LastBatch:
    """The 'last batch' values, kept here and shown by the collector once known."""

    fleiss_kappa: float | None = None
    agreement: dict[str, float | None] = field(default_factory=dict)
    committed: bool = False
    finished_at: dict[str, float] = field(default_factory=dict)  # final state -> Unix time
    compression_ratio: float | None = None  # decoded / compressed of its models' files
    peak_rss: dict[str, float] = field(default_factory=dict)  # node -> its agent's peak RSS


class Metrics:
    """The daemon's metrics: a private registry, the calls that count events, the endpoint."""

    def __init__(
        self, node_ids: Iterable[int], status: Callable[[], Status], *, host: str = ""
    ) -> None:
        # The text format would show every counter's `_created` as an extra gauge series;
        # nothing here uses it. (A process-wide switch: the daemon has only this registry.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.status = status  # the daemon's snapshot, read at each scrape
        self.registry = CollectorRegistry(auto_describe=False)
        self.addresses: list[tuple[str, int]] = []  # where serve() listens, once started
        self.last = _LastBatch()
        self.scrape_errors = 0
        reg = self.registry
        p = PREFIX
        self.batches = Counter(
            f"{p}_batches",
            "Batches finished by this process, by final state.",
            ["state"],
            registry=reg,
        )
        self.phase = Histogram(
            f"{p}_batch_phase_duration_seconds",
            "Duration of each phase of a finished batch (barrier_wait: first file to ready).",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=reg,
        )
        self.node_phase = Histogram(
            f"{p}_node_phase_duration_seconds",
            "Duration of a batch's staging and cross-check on one node, as its agent measured.",
            ["node", "phase"],
            buckets=PHASE_BUCKETS,
            registry=reg,
        )
        self.barrier = Histogram(
            f"{p}_barrier_latency_seconds",
            "From the newest counted file of a batch (its mtime) to the batch being ready.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.staged_bytes = Counter(
            f"{p}_staged_bytes",
            "Bytes copied from staging into a node's tmpfs (finished batches).",
            ["node"],
            registry=reg,
        )
        self.rows = Counter(
            f"{p}_aggregate_rows", "Aggregate rows (items) of committed batches.", registry=reg
        )
        # The per-node accounting of finished batches (docs/numa.md §2, core.usage).
        self.node_read = Counter(
            f"{p}_node_read_bytes",
            "Bytes a node's agent copied (stage, aggregate_copy) or read (crosscheck,"
            " aggregate) for finished batches.",
            ["node", "step"],
            registry=reg,
        )
        self.remote = Counter(
            f"{p}_cross_node_bytes",
            "Of numa_coordinator_node_read_bytes, those whose pages were on another node's"
            " memory (for crosscheck and aggregate: not on the agent's node; expected 0).",
            ["node", "step"],
            registry=reg,
        )
        self.absent = Counter(
            f"{p}_source_not_in_memory_bytes",
            "Bytes a node's agent copied whose source pages were in no node's memory (read"
            " from storage into its own node).",
            ["node", "step"],
            registry=reg,
        )
        self.decode_cpu = Counter(
            f"{p}_decode_cpu_seconds",
            "CPU seconds a node's agent spent reading the models' files (zstd decompression"
            " and Parquet decoding) for its cross-checks.",
            ["node"],
            registry=reg,
        )
        self.compressed = Counter(
            f"{p}_files_compressed_bytes",
            "Column-chunk bytes of finished batches' models' files as stored (zstd).",
            registry=reg,
        )
        self.decoded = Counter(
            f"{p}_files_decoded_bytes",
            "The same column chunks' bytes once decompressed.",
            registry=reg,
        )
        self.encode_cpu = Counter(
            f"{p}_encode_cpu_seconds",
            "CPU seconds the SDK recorded writing finished batches' models' files (Parquet"
            " encoding and zstd compression), where every file of the batch recorded them.",
            registry=reg,
        )
        self.lag = Histogram(
            f"{p}_event_loop_lag_seconds",
            "How late the event loop woke a sleeping task (sampled).",
            buckets=LAG_BUCKETS,
            registry=reg,
        )
        # Series that exist from the start, so rate() and increase() see the first batch.
        for s in FINAL_STATES:
            self.batches.labels(state=s)
        for ph in PHASES.values():
            self.phase.labels(phase=ph)
        for n in node_ids:
            self.staged_bytes.labels(node=str(n))
            self.decode_cpu.labels(node=str(n))
            for step in _STEPS:
                self.node_read.labels(node=str(n), step=step)
                self.remote.labels(node=str(n), step=step)
            for step in ("stage", "aggregate_copy"):
                self.absent.labels(node=str(n), step=step)
            for ph in NODE_PHASES:
                self.node_phase.labels(node=str(n), phase=ph)
        reg.register(_StateCollector(self))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        reg.register(GC_COLLECTOR)
        # What is served: every series with a `host` label ([host] id), so that the hosts
        # sharing one database tell apart in one Prometheus (and in the dashboard's $host).
        self.exposed: CollectorRegistry = reg
        if host:
            self.exposed = CollectorRegistry(auto_describe=False)
            self.exposed.register(_WithHost(reg, host))

    # -- events (called by the daemon) --------------------------------------------------------

    def barrier_latency(self, seconds: float) -> None:
        """Record the time from a batch's last file landing to the batch being ready."""
        self.barrier.observe(max(seconds, 0.0))

    def batch_ready(self, run: BatchRun, ready_at: float) -> None:
        """A batch passed its barrier at `ready_at` (Unix time): record its barrier latency from
        the newest counted file; nothing when none was counted (went on at the deadline)."""
        if run.counted:
            newest = max(ident[2] for ident in run.counted.values()) / 1e9
            self.barrier_latency(ready_at - newest)

    def batch_committed(self, agg: AggregateSummary) -> None:
        """A batch's rows are in the database: its agreement becomes the 'last batch' values."""
        self.rows.inc(agg.rows)
        self.last.fleiss_kappa = agg.fleiss_kappa
        self.last.agreement = dict(agg.consensus_agreement)
        self.last.committed = True

    def batch_finished(self, run: BatchRun) -> None:
        """A batch reached a final state: count it and record its phase durations and bytes."""
        state = run.state.value
        self.batches.labels(state=state).inc()
        self.last.finished_at[state] = time.time()
        for phase, ms in run.timings.phases():
            self.phase.labels(phase=phase.value).observe(ms / 1000)
        for phase, n, ms in run.timings.nodes():
            if phase in NODE_PHASES:
                self.node_phase.labels(node=str(n), phase=phase.value).observe(ms / 1000)
        for node, nbytes in run.staged_bytes.items():
            self.staged_bytes.labels(node=str(node)).inc(nbytes)
        for n, u in run.usage.items():
            node = str(n)
            for step, (total, remote, absent) in _STEPS.items():
                self.node_read.labels(node=node, step=step).inc(getattr(u, total) or 0)
                self.remote.labels(node=node, step=step).inc(getattr(u, remote) or 0)
                if absent:
                    self.absent.labels(node=node, step=step).inc(getattr(u, absent) or 0)
            self.decode_cpu.labels(node=node).inc(u.decode_cpu_s or 0.0)
        if run.usage:  # the last batch's peaks: only the nodes it has one of
            self.last.peak_rss = {
                str(n): float(u.peak_rss_bytes)
                for n, u in run.usage.items()
                if u.peak_rss_bytes is not None
            }
        c = run.compression
        if c is not None:
            self.compressed.inc(c.compressed_bytes)
            self.decoded.inc(c.decoded_bytes)
            if c.encode_cpu_s is not None:
                self.encode_cpu.inc(c.encode_cpu_s)
            self.last.compression_ratio = c.ratio

    def loop_lag(self, seconds: float) -> None:
        """Record one event-loop lag sample."""
        self.lag.observe(max(seconds, 0.0))

    # -- exposition ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (what the control socket returns)."""
        return generate_latest(self.exposed)

    async def serve(
        self, listen: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve `GET /metrics`, `/ready` and `/live` on `listen` ("127.0.0.1:9464") until
        cancelled."""
        host, port = parse_listen(listen)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as e:
            raise ConfigError(f"metrics.listen {listen}: cannot listen: {e.strerror or e}") from e
        self.addresses = [
            (str(ln.extra(SocketAttribute.local_address)[0]), ln.extra(SocketAttribute.local_port))
            for ln in listener.listeners
        ]
        log.info("metrics endpoint listening", addresses=[f"{h}:{p}" for h, p in self.addresses])
        task_status.started()
        try:
            async with listener:
                await listener.serve(self._handle_http)
        finally:
            self.addresses = []

    async def _handle_http(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(HTTP_TIMEOUT_S):
                    head = await _read_head(stream)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            try:
                reply = self.http_reply(head)
            except Exception:  # a scrape must never take the daemon down
                log.exception("metrics request failed")
                reply = _response(500, "text/plain; charset=utf-8", b"internal error\n")
            try:
                await stream.send(reply)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    def readiness(self) -> tuple[int, str]:
        """``GET /ready``: 200 only on the coordinator that serves agents now, the leader of
        its host (start-up done, READY=1 sent; running, or degraded with the database away);
        503 with the reason on a standby, while starting or connecting, and while stopping.
        A Kubernetes Service routes agents only to Ready pods, so only to the leader."""
        d = self.status().daemon
        who = f"host {d.host!r}" if d.host else "its host"
        if d.ready and d.state in ("running", "degraded"):
            return 200, f"ready: {d.state}, the leader of {who}, serving agents"
        why = {
            "standby": f"another coordinator holds the leader lock of {who}; this one waits",
            "starting": "starting",
            "connecting": "connecting to the database and taking the leader lock",
            "stopping": "stopping",
            "stopped": "stopped",
        }.get(d.state, "not serving agents")
        return 503, f"not ready: {d.state}: {why}"

    def liveness(self) -> tuple[int, str]:
        """``GET /live``: 200 whenever the event loop answers, leader or standby alike."""
        return 200, f"alive: {self.status().daemon.state}"

    def http_reply(self, head: bytes) -> bytes:
        """The whole HTTP response to one request head (GET or HEAD of /metrics)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "text/plain; charset=utf-8", b"bad request\n")
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain; charset=utf-8", b"GET only\n", allow="GET, HEAD")
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        if path == "/":
            body = (
                b"numa-coordinator: metrics at /metrics, readiness at /ready, liveness at /live\n"
            )
            return _response(200, "text/plain; charset=utf-8", body, head_only=head_only)
        if path in ("/ready", "/live"):
            code, text = self.readiness() if path == "/ready" else self.liveness()
            body = (text + "\n").encode()
            return _response(code, "text/plain; charset=utf-8", body, head_only=head_only)
        if path != "/metrics":
            return _response(404, "text/plain; charset=utf-8", b"not found; try /metrics\n")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return _response(200, content_type, encoder(self.exposed), head_only=method == "HEAD")


class _WithHost(Collector):
    """Every metric of a registry, each sample labelled `host`."""

    def __init__(self, inner: CollectorRegistry, host: str) -> None:
        self.inner = inner
        self.host = host

    def collect(self) -> Iterable[Metric]:
        for m in self.inner.collect():
            out = Metric(m.name, m.documentation, m.type, m.unit)
            out.samples = [s._replace(labels={"host": self.host, **s.labels}) for s in m.samples]
            yield out


async def _read_head(stream: SocketStream) -> bytes:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive()
        if len(buf) > HTTP_HEAD_MAX:
            raise anyio.BrokenResourceError("request head too long")
    return bytes(buf.split(b"\r\n\r\n", 1)[0])


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _response(
    code: int, content_type: str, body: bytes, *, head_only: bool = False, allow: str = ""
) -> bytes:
    head = [
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Internal Server Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        head.append(f"Allow: {allow}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if head_only else body)


Kind = type[GaugeMetricFamily] | type[CounterMetricFamily]
G, C = GaugeMetricFamily, CounterMetricFamily


def _family(
    kind: Kind, name: str, doc: str, values: float | Mapping[str, float], label: str = ""
) -> Metric:
    """One metric family: a single value, or one sample per key of `values` under `label`."""
    if not isinstance(values, Mapping):
        return kind(f"{PREFIX}_{name}", doc, value=values)
    fam = kind(f"{PREFIX}_{name}", doc, labels=[label])
    for key, v in sorted(values.items()):
        fam.add_metric([key], v)
    return fam


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


# Per-node values from the status's agents: metric -> (kind, AgentInfo field, help).
_AGENT_METRICS: tuple[tuple[str, Kind, str, str], ...] = (
    ("agent_restarts", C, "restarts", "Restarts of the node's agent (--with-agents)."),
    (
        "agent_last_heartbeat_age_seconds",
        G,
        "last_heartbeat_age_s",
        "Seconds since the node's agent last sent a heartbeat.",
    ),
    ("node_tmpfs_used_bytes", G, "tmpfs_used", "Bytes of batches in the node's tmpfs."),
    ("node_tmpfs_free_bytes", G, "tmpfs_free", "Free bytes on the node's tmpfs."),
    (
        "placement_ratio",
        G,
        "last_placement",
        "Fraction of the last staged batch's pages on the node's own memory.",
    ),
)


class _StateCollector(Collector):
    """Reads the daemon's state at scrape time: its `status()` and a few counters."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._reload_ok_at: float | None = None

    def collect(self) -> Iterable[Metric]:
        """Every state metric; after a bug, what was built and the error count (never raises)."""
        out: list[Metric] = []
        try:
            out += self._state()
        except Exception:
            self.m.scrape_errors += 1
            log.exception("metrics collector failed")
        doc = "Scrapes whose state collector failed (the log has the error)."
        out.append(_family(C, "scrape_errors", doc, self.m.scrape_errors))
        return out

    def _state(self) -> list[Metric]:
        st = self.m.status()
        last = self.m.last
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info", "Version of the daemon.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        state = st.daemon.state
        out = [
            info,
            _family(
                G,
                "daemon_state",
                "1 for the daemon's current state (degraded: running without the database).",
                {s: float(s == state) for s in {*DAEMON_STATES, state}},
                "state",
            ),
        ]

        # Config, with the reload metrics named as Prometheus names its own.
        cfg = st.config
        lr = cfg.last_reload
        if lr.ok and lr.at:
            self._reload_ok_at = lr.at
        ok_at = lr.last_success_at or self._reload_ok_at or st.daemon.started_at
        out += [
            _family(G, "config_generation", "1 at start, +1 per reload.", cfg.generation),
            _family(
                G,
                "config_last_reload_successful",
                "1 if the last config reload succeeded (or none was tried).",
                float(lr.ok),
            ),
            _family(
                G,
                "config_last_reload_success_timestamp_seconds",
                "When the config was last loaded successfully (Unix time).",
                ok_at,
            ),
        ]

        # Batches in flight, and the last finished and committed ones.
        in_flight = dict.fromkeys(IN_FLIGHT_STATES, 0.0)
        for batch_state, n in st.in_flight_by_state().items():
            in_flight[batch_state.value] = in_flight.get(batch_state.value, 0.0) + n
        doc = "Batches the daemon is working on, by state."
        out.append(_family(G, "batches_in_flight", doc, in_flight, "state"))
        doc = "When a batch last reached each final state (Unix time)."
        out.append(
            _family(G, "last_batch_finished_timestamp_seconds", doc, last.finished_at, "state")
        )
        if last.committed:
            doc = "Fleiss' kappa of the last committed batch (NaN: undefined for it)."
            out.append(_family(G, "fleiss_kappa", doc, _nan(last.fleiss_kappa)))
            doc = "Each model's agreement with the consensus in the last committed batch."
            agreement = {k: _nan(v) for k, v in last.agreement.items()}
            out.append(_family(G, "consensus_agreement_ratio", doc, agreement, "model"))

        if last.compression_ratio is not None:
            doc = "Decoded / compressed bytes of the last finished batch's models' files."
            out.append(_family(G, "compression_ratio", doc, last.compression_ratio))
        if last.peak_rss:
            doc = "Each node's agent's peak resident set over the last finished batch's steps."
            out.append(_family(G, "agent_peak_rss_bytes", doc, last.peak_rss, "node"))

        # The file barrier.
        w = st.watcher
        out += [
            _family(G, "watcher_armed", "1 while the staging watcher is armed.", float(w.armed)),
            _family(C, "watcher_events", "File events the watcher delivered.", w.events),
            _family(C, "watcher_restarts", "Watcher failures (re-created).", w.watcher_restarts),
            _family(C, "reconcile_scans", "Reconciliation scans of staging.", w.reconcile_scans),
            _family(
                C,
                "reconcile_recovered",
                "Changes found by a reconciliation scan that no watcher event had reported.",
                w.recovered_by_reconcile,
            ),
            _family(
                G,
                "quarantine_usable",
                "0 while staging/.quarantine is refused (a link, or cannot be made).",
                float(not w.quarantine_refused),
            ),
            _family(
                C,
                "quarantine_failures",
                "Files that had to be quarantined but could not be moved (logged).",
                w.quarantine_failed,
            ),
            _family(
                C,
                "scan_errors",
                "Looks at a batch folder that failed with an error (logged; looked at again).",
                w.scan_errors,
            ),
        ]
        for kind, counts, doc in (
            ("rejected", w.rejected, "Names in staging that were ignored, by reason."),
            ("quarantined", w.quarantined, "Files moved to staging/.quarantine, by reason."),
        ):
            by_reason: dict[str, float] = {}
            for reason, n in counts.items():
                by_reason[reason_label(reason)] = by_reason.get(reason_label(reason), 0) + n
            out.append(_family(C, f"files_{kind}", doc, by_reason, "reason"))

        # Agents, by node: what the coordinator sees, and what their heartbeats and replies say.
        agents = st.agents
        doc = "1 while the node's staging agent is connected."
        connected = {str(a.node): float(a.connected) for a in agents}
        out.append(_family(G, "agent_connected", doc, connected, "node"))
        for name, kind_, key, doc in _AGENT_METRICS:
            values = {
                str(a.node): v for a in agents if isinstance(v := getattr(a, key), int | float)
            }
            out.append(_family(kind_, name, doc, values, "node"))
        doc = "Agent connections refused (TLS, certificate name, hello), by reason."
        refused = {k: float(v) for k, v in st.agents_refused.items()}
        out.append(_family(C, "agents_refused", doc, refused, "reason"))
        doc = "Configured placement.min_fraction: a batch below it on a node is flagged."
        out.append(_family(G, "placement_min_ratio", doc, cfg.placement_min_fraction))

        # Database and local disk.
        db = st.database
        out += [
            _family(G, "database_up", "1 while PostgreSQL is reachable.", float(db.connected)),
            _family(G, "database_leader", "1 while holding the leader lock.", float(db.leader)),
        ]
        doc = "State changes waiting to be written to PostgreSQL."
        out.append(_family(G, "database_queued_writes", doc, db.queued_writes))
        try:
            s = os.statvfs(cfg.staging)
        except OSError:
            pass
        else:
            doc = "Free bytes on the staging filesystem."
            out.append(_family(G, "staging_free_bytes", doc, s.f_bavail * s.f_frsize))
        return out
