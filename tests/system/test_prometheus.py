"""Prometheus for real: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and a real Prometheus (Debian package prometheus) scrapes a real daemon
through a batch. Its HTTP API then has the batch counters, phase histograms and agent gauges with
the values the ledger holds, the Grafana dashboard's queries parse and use only scraped metrics,
and the alert rules, loaded as shipped, evaluate without error."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import slm
from coordinator.core.errors import BatchFinishedError
from tests.conftest import MODELS, ROOT, Daemon, Env, wait_until
from tests.system.test_flow import ROWS, db_rows, publish_all, tables
from tests.system.test_metrics import METRIC_NAME, dashboard_exprs, free_port

RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "docs" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "numa-coordinator.json"
JOB = "numa-coordinator"  # the job name alerts.yml assumes (NumaCoordinatorDown)

OBSERVABILITY = ROOT / "docs" / "observability.md"

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="promtool/prometheus not installed (Debian package prometheus)",
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_names(rules: str) -> list[str]:
    return re.findall(r"^\s+- alert:\s*(\S+)\s*$", rules, re.M)


# -- the rules file and its unit tests ------------------------------------------------------------


@needs_prometheus
def test_alert_rules_pass_promtool_check_rules_and_a_broken_rule_does_not(tmp_path: Path) -> None:
    names = alert_names(RULES.read_text())
    assert len(names) >= 10 and len(set(names)) == len(names), names
    done = promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(names)} rules found" in done.stdout
    # promtool really parses the expressions: one bad operator and the file is refused.
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace("_successful == 0", "_successful === 0", 1))
    done = promtool("check", "rules", broken)
    assert done.returncode != 0
    assert "parse error" in done.stdout + done.stderr


@needs_prometheus
def test_every_alert_fires_in_the_rule_unit_tests_and_some_stay_quiet() -> None:
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    # Which alerts the cases expect firing (a list of alerts) and quiet (`exp_alerts: []`).
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:(.*)", RULE_TESTS.read_text())
    firing = {name for name, rest in cases if not rest.strip()}
    quiet = {name for name, rest in cases if rest.strip() == "[]"}
    names = set(alert_names(RULES.read_text()))
    assert firing == names, f"alerts no case fires: {sorted(names - firing)}"
    assert len(quiet) >= 4, quiet


@needs_prometheus
def test_the_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """Guards the test above: the cases pin the thresholds, so a rule that drifts fails them."""
    rules = RULES.read_text()
    drifted = rules.replace(
        "numa_coordinator_placement_ratio < 0.99", "numa_coordinator_placement_ratio < 0.5", 1
    )
    assert drifted != rules
    (tmp_path / "alerts.yml").write_text(drifted)
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    done = promtool("test", "rules", tmp_path / "alerts.test.yml")
    assert done.returncode != 0
    assert "NumaCoordinatorPlacementLow" in done.stdout + done.stderr


def test_the_observability_doc_lists_every_shipped_alert() -> None:
    doc = OBSERVABILITY.read_text()
    table = set(re.findall(r"^\| `(NumaCoordinator\w+)` \|", doc, re.M))
    assert table == set(alert_names(RULES.read_text()))
    assert "prometheus/alerts.yml" in doc and "prometheus/alerts.test.yml" in doc
    assert "expr:" not in doc  # the rules live in the file only, not in a copy that drifts


# -- a real Prometheus ---------------------------------------------------------------------------


class Prometheus:
    """A prometheus server on 127.0.0.1 with its own port and storage, scraping `targets` every
    second and evaluating alerts.yml as shipped."""

    def __init__(self, root: Path, targets: list[str]) -> None:
        self.root = root
        self.port = free_port()
        self.targets = targets
        self.log = root / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": self.targets}]}
                    ],
                },
                indent=1,
            )
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, 30, "prometheus to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def api(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        """GET /api/v1/<path>; the JSON reply, errors (HTTP 400, 422) included."""
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            return json.loads(e.read())  # type: ignore[no-any-return]

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def vector(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """An instant query's result: {labels (without __name__, job, instance, host): value}.
        Every series of the daemon's carries `host`, its [host] id (the hostname here)."""
        reply = self.query(expr)
        assert reply["status"] == "success", (expr, reply)
        for r in reply["data"]["result"]:
            if r["metric"].get("__name__", "").startswith("numa_coordinator_"):
                assert r["metric"].get("host") == socket.gethostname(), r["metric"]
        drop = {"__name__", "job", "instance", "host"}
        return {
            frozenset((k, v) for k, v in r["metric"].items() if k not in drop): float(r["value"][1])
            for r in reply["data"]["result"]
        }

    def value(self, expr: str, **labels: str) -> float:
        got = self.vector(expr)
        key = frozenset(labels.items())
        assert key in got, f"{expr} has no series {labels}; it has {sorted(map(dict, got))}"
        return got[key]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    """Factory for real Prometheus servers; each one is stopped at the end of the test."""
    made: list[Prometheus] = []

    def make(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path / f"prometheus-{len(made)}", targets)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop()
    for p in made:
        assert p.proc is not None and p.proc.poll() is not None, "prometheus did not stop"


def batch_scraped(
    env: Env,
    daemon: Callable[..., Daemon],
    prometheus: Callable[[list[str]], Prometheus],
    *,
    mishaps: bool = False,
) -> tuple[Prometheus, Daemon, str, dict[str, Any]]:
    """A daemon with its metrics endpoint, a Prometheus scraping it, and one batch done while it
    scrapes; returns when a scrape that counts the batch is in Prometheus. With `mishaps`, also
    a stray file in the batch (rejected) and a model published again after the batch is done
    (quarantined), so that the series labelled by reason exist too."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    env.write_config(metrics={"listen": target})
    d = daemon().start()
    prom = prometheus([target])
    wait_until(
        lambda: prom.vector(f'up{{job="{JOB}"}}').get(frozenset()) == 1.0,
        30,
        "prometheus to scrape the daemon",
    )
    if mishaps:
        (env.staging / "p-001").mkdir()
        (env.staging / "p-001" / "notes.txt").write_text("not a result")
    publish_all(env, "p-001", seed=31)
    done = frozenset({("state", "done")})
    row = d.wait_state("p-001", {"done", "failed", "degraded"})
    assert row["state"] == "done", row["error"]
    if mishaps:
        # Published again after the batch is done: the daemon quarantines it. A publish that
        # meets the daemon removing the finished batch's folder is refused (BatchFinishedError):
        # after its rename its file is quarantined all the same, before it nothing was written.
        # Publish again until the daemon has quarantined a file.
        again = tables(32)[MODELS[0]]

        def quarantined() -> bool:
            with contextlib.suppress(BatchFinishedError):
                slm.publish(env.staging, "p-001", MODELS[0], again)
            return bool(d.status()["watcher"]["quarantined"])

        wait_until(quarantined, 60, "a republished file quarantined")
        for family in ("rejected", "quarantined"):
            wait_until(
                lambda f=family: prom.vector(f"numa_coordinator_files_{f}_total"),
                30,
                f"a scrape with a file {family}",
            )
    wait_until(
        lambda: prom.vector('numa_coordinator_batches_total{state="done"}').get(done) == 1.0,
        30,
        "a scrape that counts the batch",
    )
    return prom, d, target, row


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_a_batch_with_the_values_the_ledger_holds(
    env: Env, daemon: Callable[..., Daemon], prometheus: Callable[[list[str]], Prometheus]
) -> None:
    prom, d, _, _ = batch_scraped(env, daemon, prometheus)
    [ledger] = db_rows(env, f'SELECT * FROM "{env.schema}".batches WHERE batch_id = $1', "p-001")
    states = db_rows(env, f'SELECT state, count(*) AS n FROM "{env.schema}".batches GROUP BY 1')
    by_state = {r["state"]: r["n"] for r in states}
    assert by_state == {"done": 1}

    # Batch counters: one per final state, as the ledger counts them.
    got = prom.vector("numa_coordinator_batches_total")
    final = ("done", "degraded", "failed")
    assert got == {frozenset({("state", s)}): float(by_state.get(s, 0)) for s in final}
    rows = db_rows(env, f'SELECT count(*) AS n FROM "{env.schema}".aggregates')[0]["n"]
    assert rows == ledger["rows"] == ROWS
    assert prom.value("numa_coordinator_aggregate_rows_total") == rows
    finished = ledger["finished_at"]
    assert isinstance(finished, dt.datetime)
    when = prom.value("numa_coordinator_last_batch_finished_timestamp_seconds", state="done")
    assert abs(when - finished.timestamp()) < 5

    # Phase histograms: one observation per phase, of the ledger's time.
    timings = json.loads(ledger["timings"])
    h = "numa_coordinator_batch_phase_duration_seconds"
    for phase in ("barrier_wait", "staging", "crosscheck", "aggregate", "commit", "archive"):
        assert prom.value(f"{h}_count", phase=phase) == 1, phase
        seconds = timings[f"{phase}_ms"] / 1000
        assert prom.value(f"{h}_sum", phase=phase) == pytest.approx(seconds), phase
        # The one observation sits in the first bucket at or above it, and every later one.
        buckets = prom.vector(f'{h}_bucket{{phase="{phase}"}}')
        for labels, count in buckets.items():
            le = float(dict(labels)["le"])
            assert count == (1.0 if le >= seconds else 0.0), (phase, le, seconds)
    h = "numa_coordinator_node_phase_duration_seconds"
    for phase in ("staging", "crosscheck"):
        seconds = timings[f"{phase}_node0_ms"] / 1000
        assert prom.value(f"{h}_sum", node="0", phase=phase) == pytest.approx(seconds), phase
        assert prom.value(f"{h}_count", node="0", phase=phase) == 1, phase
    staged = json.loads(ledger["staged_bytes"])
    assert prom.value("numa_coordinator_staged_bytes_total", node="0") == staged["0"] > 0

    # The aggregate's gauges, from the ledger's row of the batch.
    assert prom.value("numa_coordinator_fleiss_kappa") == pytest.approx(ledger["fleiss_kappa"])
    agreement = json.loads(ledger["consensus_agreement"])
    assert len(agreement) == 7
    got = prom.vector("numa_coordinator_consensus_agreement_ratio")
    assert {dict(k)["model"]: v for k, v in got.items()} == pytest.approx(agreement)

    # Agent gauges: the node's placement as the ledger recorded it, and the agent as it is.
    placement = json.loads(ledger["placement"])
    got_ratio = prom.value("numa_coordinator_placement_ratio", node="0")
    assert got_ratio == pytest.approx(placement["0"]["fraction"])
    agents = d.status()["agents"]
    assert [a["node"] for a in agents if a["connected"]] == [0]
    assert prom.value("numa_coordinator_agent_connected", node="0") == 1
    assert prom.value("numa_coordinator_agent_restarts_total", node="0") == 0
    assert 0 <= prom.value("numa_coordinator_agent_last_heartbeat_age_seconds", node="0") < 10
    assert prom.value("numa_coordinator_node_tmpfs_free_bytes", node="0") > 0
    assert prom.value("numa_coordinator_batches_in_flight", state="waiting") == 0


def grafana(expr: str, job: str, instance: str, host: str = socket.gethostname()) -> str:
    """A dashboard expression as Grafana sends it: its variables replaced ($__rate_interval is
    at least four scrape intervals)."""
    return (
        expr.replace("$__rate_interval", "15s")
        .replace("$instance", instance)
        .replace("$job", job)
        .replace("$host", host)
    )


@pytest.mark.slow
@needs_prometheus
def test_dashboard_queries_parse_and_alert_rules_evaluate_on_the_scraped_series(
    env: Env, daemon: Callable[..., Daemon], prometheus: Callable[[list[str]], Prometheus]
) -> None:
    prom, _, target, _ = batch_scraped(env, daemon, prometheus, mishaps=True)
    names = set(prom.api("label/__name__/values")["data"])

    # The check can fail: a broken expression is refused by the same API.
    reply = prom.query("sum by (phase (numa_coordinator_batches_total)")
    assert (reply["status"], reply["errorType"]) == ("error", "bad_data")

    exprs = dashboard_exprs()
    queries = [e for e in exprs if not e.startswith("label_values(")]
    assert len(queries) >= 30
    for expr in queries:
        reply = prom.query(grafana(expr, JOB, target))
        assert reply["status"] == "success", (expr, reply)
    used = {n for e in exprs for n in METRIC_NAME.findall(e)}
    assert len(used) >= 25
    assert used <= names, f"the dashboard queries metrics never scraped: {sorted(used - names)}"
    # The template variables: label_values(selector, label) as Grafana asks for it.
    variables = [e for e in exprs if e.startswith("label_values(")]
    assert len(variables) == 3
    for expr in variables:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", grafana(expr, JOB, target))
        assert m, expr
        reply = prom.api(f"label/{m[2]}/values", **{"match[]": m[1]})
        assert reply["status"] == "success", (expr, reply)
        expected = {"job": JOB, "instance": target, "host": socket.gethostname()}[m[2]]
        assert reply["data"] == [expected], (expr, reply)

    # The alert rules, loaded as shipped: every metric they use is scraped, and every rule has
    # been evaluated without an error.
    used = {
        n
        for e in re.findall(r"^\s+expr:\s*(.+)$", RULES.read_text(), re.M)
        for n in METRIC_NAME.findall(e)
    }
    assert used <= names, f"the alert rules use metrics never scraped: {sorted(used - names)}"

    def evaluated() -> list[dict[str, Any]] | None:
        groups = prom.api("rules", type="alert")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        never = "0001-01-01T00:00:00Z"
        return rules if rules and all(r["lastEvaluation"] != never for r in rules) else None

    rules = wait_until(evaluated, 30, "every alert rule to be evaluated")
    assert sorted(r["name"] for r in rules) == sorted(alert_names(RULES.read_text()))
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # A healthy daemon that just finished a batch: nothing failed, nobody is missing.
    states = {r["name"]: r["state"] for r in rules}
    for name in (
        "NumaCoordinatorBatchFailed",
        "NumaCoordinatorAgentMissing",
        "NumaCoordinatorDatabaseDown",
        "NumaCoordinatorDown",
    ):
        assert states[name] == "inactive", (name, states)
