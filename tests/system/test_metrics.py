"""Prometheus metrics: what the collector reads from a daemon, what the event calls count, the
HTTP endpoint, the dashboard's and alert rules' metric names, and a real daemon scraped after a
batch with its values checked against the ledger."""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core.batch import State
from coordinator.core.config import load_config
from coordinator.core.errors import ConfigError
from coordinator.core.messages import Crosschecked, Heartbeat, Hello, Staged
from coordinator.core.summary import AggregateSummary
from coordinator.core.timings import Timings
from coordinator.core.usage import BatchCompression
from coordinator.ctl.client import call
from coordinator.daemon.hub import AgentConn
from coordinator.daemon.metrics import Metrics, parse_listen, reason_label
from coordinator.daemon.runs import BatchRun
from coordinator.daemon.service import Daemon
from coordinator.daemon.status import Status
from tests.conftest import ROOT, Env, wait_until

DASHBOARD = ROOT / "docs" / "grafana" / "numa-coordinator.json"
ALERT_RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
# Metric names in PromQL: ours, and the process/python ones prometheus_client adds.
METRIC_NAME = re.compile(r"\b((?:numa_coordinator|process|python)_[a-zA-Z0-9_]+)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def parse(text: str) -> Samples:
    """Exposition text -> {(sample name, labels): value}, through prometheus_client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition has or declares (a labelled family with no child yet
    has HELP and TYPE lines but no samples)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + x for x in suffixes.get(fam.type, ("",))}
    return names


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k, _ in samples)[:200]}"
    return samples[key]


def scrape(m: Metrics) -> Samples:
    return parse(m.exposition().decode())


def make_daemon(tmp_path: Path) -> Daemon:
    """A real Daemon object (not running) with two nodes, for the collector to read."""
    (tmp_path / "staging").mkdir()
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(
        f"""
[paths]
staging = "{tmp_path}/staging"
lake = "{tmp_path}/lake"
node_tmpfs = "{tmp_path}/tmpfs/node{{node}}"
state_dir = "{tmp_path}/state"
runtime_dir = "{tmp_path}/run"

[batch]
models = ["m-a", "m-b", "m-c"]
quorum = 2

[[node]]
id = 0
models = ["m-a", "m-b"]

[[node]]
id = 1
models = ["m-c"]
"""
    )
    return Daemon(load_config(cfg), cfg)


def metrics_of(d: Daemon) -> Metrics:
    """A collector reading this daemon's status, as the daemon's own does."""
    return Metrics(d.config.node_ids, d.status)


def finished_run(d: Daemon, state: State = State.DONE) -> BatchRun:
    now = time.time()
    run = BatchRun("b-1", d.config, state, now - 10, now + 600)
    run.timings = Timings.from_json(
        {
            "barrier_wait_ms": 1500.0,
            "staging_ms": 250.0,
            "staging_node0_ms": 200.0,
            "staging_node1_ms": 240.0,
            "crosscheck_ms": 900.0,
            "crosscheck_node0_ms": 800.0,
            "crosscheck_node1_ms": 850.0,
            "aggregate_ms": 40.0,
            "aggregate_node1_ms": 35.0,
            "commit_ms": 30.0,
            "archive_ms": 60.0,
            "archive_node1_ms": 55.0,
            "cleanup_ms": 5.0,
        }
    )
    run.staged_bytes = {"0": 1000, "1": 3000}
    for n, remote in ((0, 0), (1, 1000)):
        run.add_usage(
            n,
            Staged(
                batch_id="b-1",
                bytes=1000,
                seconds=0.1,
                files={},
                tmpfs_free=1,
                node=n,
                copied_remote=remote,
                copied_absent=10,
                compressed_bytes=400,
                decoded_bytes=1400,
                encode_cpu_s=0.25,
                peak_rss=(n + 1) << 20,
            ),
        )
        run.add_usage(
            n,
            Crosschecked(
                batch_id="b-1",
                outputs={},
                seconds=0.1,
                node=n,
                read_bytes=1000,
                read_remote=7 * n,
                decode_cpu_s=0.5,
            ),
        )
    run.compression = BatchCompression(400, 1400, 0.25)
    return run


def batch_aggregate(kappa: float | None, agreement: dict[str, float | None]) -> AggregateSummary:
    return AggregateSummary(3, (), kappa, agreement, tuple(sorted(agreement)))


# -- events -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_finished_batch_counts_its_state_phases_per_node_phases_and_bytes(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    m.batch_finished(finished_run(d))
    s = scrape(m)
    assert value(s, "numa_coordinator_batches_total", state="done") == 1
    assert value(s, "numa_coordinator_batches_total", state="failed") == 0
    assert value(s, "numa_coordinator_batches_total", state="degraded") == 0
    phases = {
        "barrier_wait": 1.5,
        "staging": 0.25,
        "crosscheck": 0.9,
        "aggregate": 0.04,
        "commit": 0.03,
        "archive": 0.06,
        "cleanup": 0.005,
    }
    for phase, seconds in phases.items():
        h = "numa_coordinator_batch_phase_duration_seconds"
        assert value(s, f"{h}_count", phase=phase) == 1
        assert value(s, f"{h}_sum", phase=phase) == pytest.approx(seconds)
    h = "numa_coordinator_node_phase_duration_seconds"
    assert value(s, f"{h}_sum", node="0", phase="staging") == pytest.approx(0.2)
    assert value(s, f"{h}_sum", node="1", phase="staging") == pytest.approx(0.24)
    assert value(s, f"{h}_sum", node="1", phase="crosscheck") == pytest.approx(0.85)
    # The aggregating agent's steps: on its node only.
    assert value(s, f"{h}_sum", node="1", phase="aggregate") == pytest.approx(0.035)
    assert value(s, f"{h}_sum", node="1", phase="archive") == pytest.approx(0.055)
    assert value(s, f"{h}_count", node="0", phase="aggregate") == 0
    # 0.85 s lies in the (0.5, 1] bucket: below 1 nothing, from 1 on the one observation.
    assert value(s, f"{h}_bucket", node="1", phase="crosscheck", le="0.5") == 0
    assert value(s, f"{h}_bucket", node="1", phase="crosscheck", le="1.0") == 1
    assert value(s, "numa_coordinator_staged_bytes_total", node="0") == 1000
    assert value(s, "numa_coordinator_staged_bytes_total", node="1") == 3000
    # The per-node accounting: each step's bytes, those from another node, the CPU, the peak.
    for n in ("0", "1"):
        assert value(s, "numa_coordinator_node_read_bytes_total", node=n, step="stage") == 1000
        assert value(s, "numa_coordinator_node_read_bytes_total", node=n, step="crosscheck") == 1000
        assert value(s, "numa_coordinator_node_read_bytes_total", node=n, step="aggregate") == 0
        nim = "numa_coordinator_source_not_in_memory_bytes_total"
        assert value(s, nim, node=n, step="stage") == 10
        assert value(s, "numa_coordinator_decode_cpu_seconds_total", node=n) == 0.5
    x = "numa_coordinator_cross_node_bytes_total"
    assert value(s, x, node="0", step="stage") == 0
    assert value(s, x, node="1", step="stage") == 1000
    assert value(s, x, node="1", step="crosscheck") == 7
    assert value(s, "numa_coordinator_agent_peak_rss_bytes", node="0") == 1 << 20
    assert value(s, "numa_coordinator_agent_peak_rss_bytes", node="1") == 2 << 20
    assert value(s, "numa_coordinator_files_compressed_bytes_total") == 400
    assert value(s, "numa_coordinator_files_decoded_bytes_total") == 1400
    assert value(s, "numa_coordinator_encode_cpu_seconds_total") == 0.25
    assert value(s, "numa_coordinator_compression_ratio") == 3.5
    finished = value(s, "numa_coordinator_last_batch_finished_timestamp_seconds", state="done")
    assert time.time() - 5 < finished <= time.time()


@pytest.mark.anyio
async def test_series_exist_before_the_first_batch_so_increase_sees_it(tmp_path):
    m = metrics_of(make_daemon(tmp_path))
    s = scrape(m)
    for state in ("done", "degraded", "failed"):
        assert value(s, "numa_coordinator_batches_total", state=state) == 0
    assert value(s, "numa_coordinator_batch_phase_duration_seconds_count", phase="commit") == 0
    for node in ("0", "1"):
        assert value(s, "numa_coordinator_staged_bytes_total", node=node) == 0
        h = "numa_coordinator_node_phase_duration_seconds_count"
        assert value(s, h, node=node, phase="staging") == 0
        for step in ("stage", "crosscheck", "aggregate_copy", "aggregate"):
            assert value(s, "numa_coordinator_cross_node_bytes_total", node=node, step=step) == 0
    # The last batch's gauges are missing until there is one, not 0.
    names = {name for name, _ in s}
    assert not names & {
        "numa_coordinator_compression_ratio",
        "numa_coordinator_agent_peak_rss_bytes",
    }
    # No `_created` companions: they would be series of their own in the text format.
    assert not any(name.endswith("_created") for name, _ in s)


@pytest.mark.anyio
async def test_committed_batch_sets_kappa_and_agreement_and_a_later_one_replaces_them(tmp_path):
    m = metrics_of(make_daemon(tmp_path))
    assert ("numa_coordinator_fleiss_kappa", frozenset()) not in scrape(m)  # none committed yet
    m.batch_committed(batch_aggregate(0.62, {"m-a": 0.9, "m-b": None}))
    s = scrape(m)
    assert value(s, "numa_coordinator_fleiss_kappa") == pytest.approx(0.62)
    assert value(s, "numa_coordinator_consensus_agreement_ratio", model="m-a") == 0.9
    assert math.isnan(value(s, "numa_coordinator_consensus_agreement_ratio", model="m-b"))
    assert value(s, "numa_coordinator_aggregate_rows_total") == 3
    m.batch_committed(batch_aggregate(None, {"m-c": 0.5}))
    s = scrape(m)
    assert math.isnan(value(s, "numa_coordinator_fleiss_kappa"))
    ratios = {
        dict(k[1])["model"] for k in s if k[0] == "numa_coordinator_consensus_agreement_ratio"
    }
    assert ratios == {"m-c"}
    assert value(s, "numa_coordinator_aggregate_rows_total") == 6


@pytest.mark.anyio
async def test_failed_batch_counts_as_failed_and_keeps_the_last_committed_agreement(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    m.batch_committed(batch_aggregate(0.4, {"m-a": 0.7}))
    run = finished_run(d, State.FAILED)
    run.timings = Timings.from_json({"barrier_wait_ms": 100.0})
    run.staged_bytes = {}
    m.batch_finished(run)
    s = scrape(m)
    assert value(s, "numa_coordinator_batches_total", state="failed") == 1
    assert value(s, "numa_coordinator_batches_total", state="done") == 0
    assert value(s, "numa_coordinator_fleiss_kappa") == pytest.approx(0.4)
    assert value(s, "numa_coordinator_batch_phase_duration_seconds_count", phase="staging") == 0
    assert (
        "numa_coordinator_last_batch_finished_timestamp_seconds",
        frozenset({("state", "done")}),
    ) not in s


@pytest.mark.anyio
async def test_barrier_latency_runs_from_the_newest_counted_file_to_ready(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    run = finished_run(d, State.READY)
    ready_at = 1_800_000_000.0
    run.counted = {
        "m-a": (1, 10, int((ready_at - 5.0) * 1e9)),
        "m-b": (2, 10, int((ready_at - 0.25) * 1e9)),  # the newest
    }
    m.batch_ready(run, ready_at)
    run.counted = {}  # went on at the deadline: no file to measure from
    m.batch_ready(run, ready_at)
    s = scrape(m)
    assert value(s, "numa_coordinator_barrier_latency_seconds_count") == 1
    assert value(s, "numa_coordinator_barrier_latency_seconds_sum") == pytest.approx(0.25)


@pytest.mark.anyio
async def test_loop_lag_samples_land_in_the_histogram_and_negative_ones_count_as_zero(tmp_path):
    m = metrics_of(make_daemon(tmp_path))
    m.loop_lag(0.003)
    m.loop_lag(-0.001)
    s = scrape(m)
    assert value(s, "numa_coordinator_event_loop_lag_seconds_count") == 2
    assert value(s, "numa_coordinator_event_loop_lag_seconds_sum") == pytest.approx(0.003)
    assert value(s, "numa_coordinator_event_loop_lag_seconds_bucket", le="0.0005") == 1


# -- state read at scrape time -------------------------------------------------------------------


class _NoStream:
    """Stands in for an agent's socket: the collector never touches it."""


def hello(node: int) -> Hello:
    """A connected agent's hello."""
    return Hello(
        node=node,
        pid=4711,
        version="0",
        models=(),
        tmpfs="/dev/shm/x",
        staged_batches=(),
        policy="bind",
        mems=(node,),
        cpus=(0,),
    )


@pytest.mark.anyio
async def test_agents_watcher_and_config_are_read_from_the_daemon_at_scrape_time(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    conn = AgentConn(node=0, hello=hello(0), stream=_NoStream())  # type: ignore[arg-type]
    conn.heartbeat = Heartbeat(node=0, time=time.time(), tmpfs_used=4096, tmpfs_free=1 << 30)
    conn.last_heartbeat = time.time() - 2.0
    d.hub.agents[0] = conn
    d.hub.restarts = {1: 3}
    d.last_placement = {0: 0.995}
    st = d.scanner.stats
    st.armed = True
    st.events = 12
    st.reconcile_scans = 4
    st.rejected = {"unknown model 'x-1'": 2, "unknown model 'x-2'": 1, "bad batch folder name": 1}
    st.quarantined = {"corrupt": 1, "rewritten": 2}
    d.runs.add(BatchRun("w-1", d.config, State.WAITING, time.time(), time.time() + 60))
    d.runs.add(BatchRun("s-1", d.config, State.STAGING, time.time(), time.time() + 60))
    d.reloader.generation = 3
    s = scrape(m)
    assert value(s, "numa_coordinator_agent_connected", node="0") == 1
    assert value(s, "numa_coordinator_agent_connected", node="1") == 0
    age = value(s, "numa_coordinator_agent_last_heartbeat_age_seconds", node="0")
    assert 2.0 <= age < 10.0
    assert (
        "numa_coordinator_agent_last_heartbeat_age_seconds",
        frozenset({("node", "1")}),
    ) not in s
    assert value(s, "numa_coordinator_node_tmpfs_used_bytes", node="0") == 4096
    assert value(s, "numa_coordinator_node_tmpfs_free_bytes", node="0") == 1 << 30
    assert value(s, "numa_coordinator_agent_restarts_total", node="1") == 3
    assert value(s, "numa_coordinator_agent_restarts_total", node="0") == 0
    assert value(s, "numa_coordinator_placement_ratio", node="0") == pytest.approx(0.995)
    assert value(s, "numa_coordinator_placement_min_ratio") == pytest.approx(0.99)
    assert value(s, "numa_coordinator_watcher_armed") == 1
    assert value(s, "numa_coordinator_watcher_events_total") == 12
    assert value(s, "numa_coordinator_reconcile_scans_total") == 4
    # Reasons lose the names they quote, so a stray file name cannot grow the label set.
    assert value(s, "numa_coordinator_files_rejected_total", reason="unknown model") == 3
    assert value(s, "numa_coordinator_files_rejected_total", reason="bad batch folder name") == 1
    assert value(s, "numa_coordinator_files_quarantined_total", reason="rewritten") == 2
    assert value(s, "numa_coordinator_batches_in_flight", state="waiting") == 1
    assert value(s, "numa_coordinator_batches_in_flight", state="staging") == 1
    assert value(s, "numa_coordinator_batches_in_flight", state="committed") == 0
    assert value(s, "numa_coordinator_config_generation") == 3
    assert value(s, "numa_coordinator_daemon_state", state="starting") == 1
    assert value(s, "numa_coordinator_daemon_state", state="running") == 0
    assert value(s, "numa_coordinator_database_up") == 0
    assert value(s, "numa_coordinator_staging_free_bytes") > 0
    assert value(s, "numa_coordinator_build_info", version=d.status().daemon.version) == 1
    # Read at scrape time: the agent goes away, the next scrape says so.
    del d.hub.agents[0]
    d.state = "running"
    s = scrape(m)
    assert value(s, "numa_coordinator_agent_connected", node="0") == 0
    assert ("numa_coordinator_node_tmpfs_free_bytes", frozenset({("node", "0")})) not in s
    assert value(s, "numa_coordinator_daemon_state", state="running") == 1


@pytest.mark.anyio
async def test_reload_metrics_follow_prometheus_and_keep_the_last_success_time(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    s = scrape(m)
    assert value(s, "numa_coordinator_config_last_reload_successful") == 1
    ts = "numa_coordinator_config_last_reload_success_timestamp_seconds"
    assert value(s, ts) == pytest.approx(d.started_at)  # the config loaded at start
    d.reloader.last_reload = {"at": 1_800_000_000.0, "ok": True, "error": ""}
    assert value(scrape(m), ts) == 1_800_000_000.0
    d.reloader.last_reload = {"at": 1_800_000_100.0, "ok": False, "error": "batch.quorum: bad"}
    s = scrape(m)
    assert value(s, "numa_coordinator_config_last_reload_successful") == 0
    assert value(s, ts) == 1_800_000_000.0
    # The daemon's own record of the last success wins when it keeps one.
    d.reloader.last_reload = {**d.reloader.last_reload, "last_success_at": 1_800_000_050.0}
    assert value(scrape(m), ts) == 1_800_000_050.0


@pytest.mark.anyio
async def test_a_collector_bug_is_counted_and_logged_never_raised_into_the_daemon(tmp_path):
    d = make_daemon(tmp_path)

    def broken() -> Status:
        raise KeyError("status changed shape")

    m = Metrics(d.config.node_ids, broken)
    s = scrape(m)
    assert value(s, "numa_coordinator_scrape_errors_total") == 1
    assert value(s, "numa_coordinator_batches_total", state="done") == 0  # the rest is served


def test_reason_labels_drop_quoted_names_and_keep_the_reason():
    assert reason_label("unknown model 'slm-99'") == "unknown model"
    assert reason_label("cross-check of unknown model 'x'") == "cross-check of unknown model"
    assert reason_label("name does not match <model>.parquet") == (
        "name does not match <model>.parquet"
    )
    assert reason_label("'x'") == "unknown"


def test_listen_addresses_parse_host_port_and_bracketed_ipv6_and_reject_the_rest():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("9464", ":9464", "host:", "host:http", "host:70000"):
        with pytest.raises(ConfigError, match=r"metrics\.listen"):
            parse_listen(bad)


# -- the HTTP endpoint -------------------------------------------------------------------------


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers, method=headers.pop("method", "GET"))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.anyio
async def test_http_endpoint_serves_metrics_refuses_the_rest_and_stops_on_cancel(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    m.batch_finished(finished_run(d))
    async with anyio.create_task_group() as tg:
        await tg.start(m.serve, "127.0.0.1:0")
        [(host, port)] = m.addresses
        base = f"http://{host}:{port}"
        code, headers, body = await anyio.to_thread.run_sync(_get, f"{base}/metrics")
        assert code == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert value(parse(body.decode()), "numa_coordinator_batches_total", state="done") == 1
        code, headers, body = await anyio.to_thread.run_sync(
            lambda: _get(f"{base}/metrics", Accept="application/openmetrics-text; version=1.0.0")
        )
        assert code == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        code, _, _ = await anyio.to_thread.run_sync(_get, f"{base}/nothing")
        assert code == 404
        code, headers, _ = await anyio.to_thread.run_sync(
            lambda: _get(f"{base}/metrics", method="POST")
        )
        assert code == 405
        assert headers["Allow"] == "GET, HEAD"
        # A client that connects and says nothing does not hold up other scrapes.
        with socket.create_connection((host, port)):
            code, _, _ = await anyio.to_thread.run_sync(_get, f"{base}/metrics")
            assert code == 200
        tg.cancel_scope.cancel()
    assert m.addresses == []
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


@pytest.mark.anyio
async def test_a_listen_address_in_use_is_a_config_error_naming_the_key(tmp_path):
    m = metrics_of(make_daemon(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            ConfigError, match=re.escape(f"metrics.listen 127.0.0.1:{port}: cannot listen")
        ):
            await m.serve(f"127.0.0.1:{port}")


# -- the dashboard and the shipped alert rules ----------------------------------------------------


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def alert_exprs() -> list[str]:
    """The `expr:` lines of the shipped Prometheus rules, docs/prometheus/alerts.yml."""
    return re.findall(r"^\s+expr:\s*(.+)$", ALERT_RULES.read_text(), re.M)


@pytest.fixture
def full_exposition(tmp_path: Path) -> Samples:
    """The exposition of a daemon that has seen one of everything."""

    async def build() -> Samples:
        d = make_daemon(tmp_path)
        m = metrics_of(d)
        d.hub.agents[0] = AgentConn(node=0, hello=hello(0), stream=_NoStream())  # type: ignore[arg-type]
        d.hub.agents[0].heartbeat = Heartbeat(node=0, time=0.0, tmpfs_used=1, tmpfs_free=2)
        d.last_placement = {0: 1.0}
        d.scanner.stats.rejected = {"unknown model 'x'": 1}
        d.scanner.stats.quarantined = {"corrupt": 1}
        m.batch_committed(batch_aggregate(0.5, {"m-a": 1.0}))
        m.batch_finished(finished_run(d))
        m.barrier_latency(0.1)
        m.loop_lag(0.001)
        return scrape(m)

    return anyio.run(build)


def test_every_metric_the_dashboard_queries_exists_in_the_exposition(full_exposition):
    names = {name for name, _ in full_exposition}
    used = {n for e in dashboard_exprs() for n in METRIC_NAME.findall(e)}
    assert len(used) >= 25  # the regexp found the queries at all
    assert used <= names, f"dashboard queries metrics that do not exist: {sorted(used - names)}"


def test_every_metric_the_shipped_alert_rules_use_exists_in_the_exposition(full_exposition):
    names = {name for name, _ in full_exposition}
    exprs = alert_exprs()
    assert len(exprs) >= 10  # one per alert
    used = {n for e in exprs for n in METRIC_NAME.findall(e)}
    assert used <= names, f"alert rules use metrics that do not exist: {sorted(used - names)}"


def test_dashboard_panels_have_unique_ids_a_place_and_the_chosen_data_source():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


# -- a real daemon -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def http_scrape(port: int, host: str | None = None) -> Samples:
    """The daemon's endpoint, parsed (see `without_host`)."""
    return without_host(http_text(port), host)


def without_host(text: str, host: str | None = None) -> Samples:
    """A daemon's exposition, parsed; every sample carries the `host` label ([host] id, by
    default this machine's hostname), which is checked and then left out of the keys."""
    want = host or socket.gethostname()
    hosts = {
        s.labels.get("host") for fam in text_string_to_metric_families(text) for s in fam.samples
    }
    assert hosts == {want}, hosts
    return {
        (name, frozenset((k, v) for k, v in labels if k != "host")): v
        for (name, labels), v in parse(text).items()
    }


@pytest.mark.slow
def test_real_daemon_endpoint_shows_its_agent_database_and_config(env: Env, daemon):
    port = free_port()
    env.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    daemon().start()
    s = http_scrape(port)
    assert value(s, "numa_coordinator_agent_connected", node="0") == 1
    assert value(s, "numa_coordinator_database_up") == 1
    assert value(s, "numa_coordinator_database_leader") == 1
    assert value(s, "numa_coordinator_daemon_state", state="running") == 1
    assert value(s, "numa_coordinator_config_generation") == 1
    assert value(s, "numa_coordinator_config_last_reload_successful") == 1
    # The agent's heartbeat reaches this endpoint, labelled by its node.
    s = wait_until(
        lambda: (
            (s := http_scrape(port))
            and ("numa_coordinator_node_tmpfs_free_bytes", frozenset({("node", "0")})) in s
            and s
        ),
        20,
        "the agent's first heartbeat",
    )
    assert value(s, "numa_coordinator_node_tmpfs_free_bytes", node="0") > 0


@pytest.mark.slow
def test_real_daemon_scraped_after_a_batch_matches_the_ledger(env: Env, daemon):
    from tests.system.test_flow import ROWS, publish_all

    port = free_port()
    env.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    d = daemon().start()
    publish_all(env, "m-001", seed=21)
    row = d.wait_state("m-001", {"done", "failed", "degraded"})
    assert row["state"] == "done", row["error"]

    # The ledger's `done` is written just before the daemon forgets the batch: wait for it.
    def counted() -> Samples | None:
        s = http_scrape(port)
        return s if value(s, "numa_coordinator_batches_total", state="done") == 1 else None

    s = wait_until(counted, 20, "the batch to be counted")
    assert value(s, "numa_coordinator_batches_total", state="failed") == 0
    timings = row["timings"]
    h = "numa_coordinator_batch_phase_duration_seconds"
    for key, phase in (
        ("barrier_wait_ms", "barrier_wait"),
        ("staging_ms", "staging"),
        ("crosscheck_ms", "crosscheck"),
        ("aggregate_ms", "aggregate"),
        ("commit_ms", "commit"),
        ("archive_ms", "archive"),
        ("cleanup_ms", "cleanup"),
    ):
        assert value(s, f"{h}_count", phase=phase) == 1, phase
        assert value(s, f"{h}_sum", phase=phase) == pytest.approx(timings[key] / 1000), phase
    h = "numa_coordinator_node_phase_duration_seconds"
    assert value(s, f"{h}_sum", node="0", phase="staging") == pytest.approx(
        timings["staging_node0_ms"] / 1000
    )
    assert value(s, f"{h}_sum", node="0", phase="crosscheck") == pytest.approx(
        timings["crosscheck_node0_ms"] / 1000
    )
    assert value(s, "numa_coordinator_staged_bytes_total", node="0") == row["staged_bytes"]["0"]
    assert value(s, "numa_coordinator_aggregate_rows_total") == row["rows"] == ROWS
    assert value(s, "numa_coordinator_fleiss_kappa") == pytest.approx(row["fleiss_kappa"])
    for model, agreement in row["consensus_agreement"].items():
        got = value(s, "numa_coordinator_consensus_agreement_ratio", model=model)
        assert got == pytest.approx(agreement), model
    got = value(s, "numa_coordinator_placement_ratio", node="0")
    assert got == pytest.approx(row["placement"]["0"]["fraction"])
    assert value(s, "numa_coordinator_barrier_latency_seconds_count") == 1
    assert value(s, "numa_coordinator_batches_in_flight", state="waiting") == 0

    # The control socket serves the same registry.
    c = without_host(call(env.socket, "metrics"))
    assert value(c, "numa_coordinator_batches_total", state="done") == 1
    assert value(c, "numa_coordinator_fleiss_kappa") == pytest.approx(row["fleiss_kappa"])
    assert value(c, f"{h}_sum", node="0", phase="staging") == pytest.approx(
        timings["staging_node0_ms"] / 1000
    )

    # And everything the dashboard and the alert rules query is there on a real daemon.
    names = exposed_names(http_text(port))
    used = {n for e in dashboard_exprs() + alert_exprs() for n in METRIC_NAME.findall(e)}
    assert used <= names, sorted(used - names)


def _reply(m: Metrics, head: str) -> tuple[int, bytes]:
    raw = m.http_reply(head.encode())
    status, _, body = raw.partition(b"\r\n\r\n")
    return int(status.split(b" ")[1]), body


def test_ready_answers_200_only_once_started_as_the_leader_and_live_always(tmp_path):
    d = make_daemon(tmp_path)
    m = metrics_of(d)
    host = d.config.host.id
    steps = [
        ("starting", False, 503, "not ready: starting: starting"),
        (
            "connecting",
            False,
            503,
            "not ready: connecting: connecting to the database and taking the leader lock",
        ),
        (
            "standby",
            False,
            503,
            f"not ready: standby: another coordinator holds the leader lock of host {host!r}; "
            "this one waits",
        ),
        ("running", True, 200, f"ready: running, the leader of host {host!r}, serving agents"),
        ("stopping", True, 503, "not ready: stopping: stopping"),
    ]
    for state, ready, code, text in steps:
        d.state, d.ready = state, ready
        assert _reply(m, "GET /ready HTTP/1.1\r\nHost: x") == (code, (text + "\n").encode())
        assert _reply(m, "HEAD /ready HTTP/1.1\r\nHost: x") == (code, b"")
        assert _reply(m, "GET /live HTTP/1.1\r\nHost: x") == (200, f"alive: {state}\n".encode())
    assert _reply(m, "POST /ready HTTP/1.1\r\nHost: x")[0] == 405
