"""`coordinatorctl demo`: the whole flow on the embedded default, with a synthetic producer.

Starts the daemon with its agents (which starts embedded PostgreSQL), publishes N batches of 7
models with known per-model accuracy, waits for each batch to finish, checks the consensus in
PostgreSQL against the known truth, and stops everything it started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from agents import slm
from coordinator.core.batch import FINAL
from coordinator.core.errors import ControlError, CoordinatorError, DaemonNotRunning
from coordinator.core.topology import parse_cpulist
from coordinator.ctl.client import call

MODELS = tuple(f"slm-{i}" for i in range(1, 8))
# Each model is right with its own probability; wrong answers spread over the other labels.
ACCURACY = dict(zip(MODELS, (0.90, 0.85, 0.80, 0.75, 0.70, 0.66, 0.62), strict=True))
LABELS = ("alpha", "beta", "gamma", "delta", "epsilon")


def synthetic_batch(
    rows: int, seed: int, accuracy: dict[str, float] | None = None
) -> tuple[np.ndarray, dict[str, pa.Table]]:
    """Truth labels and one result table per model for a batch of `rows` items."""
    acc = accuracy or ACCURACY
    rng = np.random.default_rng(seed)
    labels = np.array(LABELS)
    truth = rng.integers(0, len(LABELS), rows)
    item_ids = pa.array([f"item-{seed}-{i:07d}" for i in range(rows)])
    tables = {}
    for m, p in acc.items():
        right = rng.random(rows) < p
        shift = rng.integers(1, len(LABELS), rows)  # never 0: a wrong answer is another label
        pred = np.where(right, truth, (truth + shift) % len(LABELS))
        score = np.where(right, rng.uniform(0.5, 1.0, rows), rng.uniform(0.2, 0.8, rows))
        tables[m] = pa.table(
            {"item_id": item_ids, "prediction": labels[pred], "score": score.astype("float64")}
        )
    return labels[truth], tables


def host_nodes(sysfs_root: str = "/") -> list[int]:
    """NUMA nodes of this machine that have both CPUs and memory."""
    base = Path(sysfs_root) / "sys/devices/system/node"
    try:
        cpu = set(parse_cpulist((base / "has_cpu").read_text()))
        mem = set(parse_cpulist((base / "has_memory").read_text()))
    except OSError:
        return [0]
    return sorted(cpu & mem) or [0]


def write_config(
    state: Path,
    run: Path,
    tmpfs: Path,
    nodes: list[int],
    *,
    dsn: str = "",
    schema: str = "numa_coordinator",
    deadline_s: float = 120.0,
    lake_format: str = "parquet",
) -> Path:
    """A coordinator.toml for the demo, with every path under the demo's folders."""
    assign: dict[int, list[str]] = {n: [] for n in nodes}
    for i, m in enumerate(MODELS):
        assign[nodes[i % len(nodes)]].append(m)
    node_tables = "".join(
        f"\n[[node]]\nid = {n}\nmodels = {json.dumps(ms)}\n" for n, ms in assign.items()
    )
    text = f"""# written by coordinatorctl demo
[paths]
staging = "{state}/staging"
lake = "{state}/lake"
node_tmpfs = "{tmpfs}/node{{node}}"
state_dir = "{state}"
runtime_dir = "{run}"

[batch]
models = {json.dumps(list(MODELS))}
deadline_s = {deadline_s}
quorum = 7

[database]
dsn = "{dsn}"
schema = "{schema}"

[barrier]
reconcile_s = 2.0

[lake]
format = "{lake_format}"
{node_tables}"""
    path = state / "coordinator.toml"
    path.write_text(text)
    return path


def _tail(log: Path | None, lines: int = 20) -> str:
    """The last lines of the daemon's log, for an error message (the log may be removed)."""
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


def wait_ready(
    sock: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0, log: Path | None = None
) -> None:
    """Wait until the daemon answers on its control socket; a daemon that exits first is an
    error that carries the end of its log (`log`), since the demo's folders may be removed."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise CoordinatorError(
                f"coordinatord exited with {proc.returncode} during start-up{_tail(log)}"
            )
        try:
            if call(sock, "status", timeout=5)["daemon"]["ready"]:
                return
            time.sleep(0.1)
        except ControlError:
            time.sleep(0.1)
    raise CoordinatorError(f"coordinatord did not answer on {sock} within {timeout:.0f} s")


def wait_final(sock: Path, batch_id: str, timeout: float) -> dict[str, Any]:
    """Poll the ledger until the batch reaches a final state; return its row."""
    t_end = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < t_end:
        try:
            row = call(sock, "show", batch_id=batch_id)
        except DaemonNotRunning:
            raise
        except ControlError:
            row = {}
        if row.get("state") in {s.value for s in FINAL}:
            return row
        time.sleep(0.1)
    raise CoordinatorError(
        f"batch {batch_id} did not finish within {timeout:.0f} s (last state {row.get('state')})"
    )


async def _consensus(dsn: str, schema: str, batch_id: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f'SELECT item_id, consensus FROM "{schema}".aggregates WHERE batch_id = $1', batch_id
        )
    finally:
        await conn.close()
    return {r["item_id"]: r["consensus"] for r in rows}


def run_demo(
    batches: int = 3,
    rows: int = 10_000,
    state_dir: str | None = None,
    timeout: float = 300.0,
    lake_format: str = "parquet",
) -> dict[str, Any]:
    """Run the demo end to end and return its summary (`coordinatorctl demo --json`; the keys
    and their meaning are tested in tests/system/test_demo.py). `consensus_accuracy` is None for a
    batch with no consensus in PostgreSQL (a failed one)."""
    import anyio

    if batches < 1 or rows < 1:
        raise CoordinatorError(f"demo: --batches and --rows must be at least 1 ({batches}, {rows})")
    keep = state_dir is not None
    state = Path(state_dir or tempfile.mkdtemp(prefix="numa-demo-")).resolve()
    state.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="numa-run-", dir="/tmp"))
    tmpfs_base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    tmpfs = Path(tempfile.mkdtemp(prefix="numa-demo-", dir=tmpfs_base))
    nodes = host_nodes()
    cfg = write_config(state, run, tmpfs, nodes, lake_format=lake_format)
    log_path = state / "coordinatord.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.daemon", "--config", str(cfg), "--with-agents"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
    sock = run / "control.sock"
    out: dict[str, Any] = {"batches": [], "nodes": nodes, "state_dir": str(state)}
    try:
        wait_ready(sock, proc, log=log_path)
        status = call(sock, "status")
        dsn = status["database"]["dsn"]
        schema = status["database"]["schema"]
        stamp = time.strftime("%Y%m%dT%H%M%S")
        produced = []
        for i in range(batches):
            batch_id = f"demo-{stamp}-{i:03d}"
            truth, tables = synthetic_batch(rows, seed=1000 + i)
            order = list(MODELS)
            random.Random(i).shuffle(order)  # files land in any order
            for m in order:
                slm.publish(state / "staging", batch_id, m, tables[m])
            produced.append((batch_id, truth, tables))
        for batch_id, truth, tables in produced:
            row = wait_final(sock, batch_id, timeout)
            consensus = anyio.run(_consensus, dsn, schema, batch_id)
            ids = tables[MODELS[0]].column("item_id").to_pylist()
            hits = sum(consensus.get(item) == t for item, t in zip(ids, truth, strict=True))
            model_acc = {
                m: round(float(np.mean(np.asarray(t.column("prediction")) == truth)), 4)
                for m, t in tables.items()
            }
            out["batches"].append(
                {
                    "batch_id": batch_id,
                    "state": row["state"],
                    "rows": row["rows"] or 0,
                    "rows_in_database": len(consensus),
                    "consensus_accuracy": round(hits / len(truth), 4) if consensus else None,
                    "model_accuracy": model_acc,
                    "fleiss_kappa": row["fleiss_kappa"],
                    "timings_ms": row["timings"],
                    "staged_bytes": row["staged_bytes"],
                    "lake_path": row["lake_path"],
                    "error": row["error"],
                }
            )
        out["database"] = {
            "dsn": dsn,
            "schema": schema,
            "embedded": True,
            "rows_total": sum(b["rows_in_database"] for b in out["batches"]),
        }
        out["lake"] = {
            "root": str(state / "lake"),
            "files": sorted(
                str(p.relative_to(state / "lake")) for p in (state / "lake").rglob("*.parquet")
            ),
        }
        if lake_format == "iceberg":
            out["lake"] |= iceberg_queries(cfg, dsn)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out["daemon_exit"] = proc.returncode
        shutil.rmtree(tmpfs, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        if not keep:
            shutil.rmtree(state, ignore_errors=True)
    out["ok"] = bool(out["batches"]) and all(b["state"] == "done" for b in out["batches"])
    return out


def iceberg_queries(cfg: Path, dsn: str) -> dict[str, Any]:
    """The Iceberg lake's tables and one-line queries of its aggregates a user can paste:
    pyiceberg (installed with the project) and DuckDB (with its iceberg extension)."""
    from coordinator.core.config import load_config
    from coordinator.core.iceberg import lake_spec
    from coordinator.ctl import lake

    spec = lake_spec(load_config(cfg), dsn)
    tables = {t["table"]: t["metadata"] for t in lake.tables(spec)}
    where = tables[spec.identifier("aggregates")]
    return {
        "format": "iceberg",
        "tables": tables,
        "query_python": (
            'python -c "from pyiceberg.table import StaticTable; '
            f"t = StaticTable.from_metadata('{where}').scan().to_arrow(); "
            "print(t.group_by('batch_id').aggregate([('item_id', 'count')]).to_pylist())\""
        ),
        "query_sql": (
            "INSTALL iceberg; LOAD iceberg; SELECT batch_id, count(*) AS items, "
            f"avg(confidence) AS confidence FROM iceberg_scan('{where}') GROUP BY ALL ORDER BY 1;"
        ),
    }


def render(summary: dict[str, Any]) -> str:
    """The demo summary for a person."""
    lines = [
        f"numa-coordinator demo: {len(summary['batches'])} batches on NUMA node(s) "
        f"{summary['nodes']}"
    ]
    for b in summary["batches"]:
        best = max(b["model_accuracy"].values())
        lines.append(
            f"\n● {b['batch_id']}  state={b['state']}  rows={b['rows']} "
            f"(in PostgreSQL: {b['rows_in_database']})"
        )
        kappa, acc = b["fleiss_kappa"], b["consensus_accuracy"]
        if acc is None:
            lines.append(f"    no consensus in PostgreSQL (best single model {best:.4f})")
        elif kappa is not None:
            lines.append(
                f"    consensus accuracy {acc:.4f}  (best single model {best:.4f})  "
                f"Fleiss' kappa {kappa:.4f}"
            )
        else:
            lines.append(f"    consensus accuracy {acc:.4f}")
        lines.append(
            "    models: " + "  ".join(f"{m}={a:.3f}" for m, a in b["model_accuracy"].items())
        )
        t = b["timings_ms"]
        keys = (
            "barrier_wait_ms",
            "staging_ms",
            "crosscheck_ms",
            "aggregate_ms",
            "commit_ms",
            "archive_ms",
            "cleanup_ms",
        )
        lines.append(
            "    phases (ms): "
            + "  ".join(f"{k.removesuffix('_ms')}={t[k]:.1f}" for k in keys if k in t)
        )
        lines.append(
            "    staged bytes per node: "
            + "  ".join(f"node{n}={v}" for n, v in b["staged_bytes"].items())
        )
        if b.get("error"):
            lines.append(f"    error: {b['error']}")
    if "database" in summary:
        lines.append(
            f"\ndatabase: {summary['database']['rows_total']} aggregate rows in schema "
            f"{summary['database']['schema']} (embedded PostgreSQL)"
        )
        lake = summary["lake"]
        if lake.get("format") == "iceberg":
            lines.append(
                f"lake: Iceberg tables {', '.join(lake['tables'])} under {lake['root']}"
                f" ({len(lake['files'])} data files)"
            )
            lines.append(f"  read it with pyiceberg:  {lake['query_python']}")
            lines.append(f"  or in DuckDB:            {lake['query_sql']}")
        else:
            lines.append(f"lake: {len(lake['files'])} Parquet files under {lake['root']}")
    lines.append("\nresult: " + ("every batch done" if summary["ok"] else "NOT every batch done"))
    return "\n".join(lines)
