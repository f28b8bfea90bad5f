"""`coordinatorctl bench`: how close the coordinator gets to the bare work, measured side by side.

Runs synthetic batches of 7 models through the real daemon, agents and PostgreSQL and measures
each figure next to its anchor in the same run (docs/benchmarks.md). Prints a table (figure,
ours, anchor, ratio, target, met?) and writes bench/results.json. `--quick` runs every path at
tiny sizes with no thresholds (the smoke test in `make test`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.bench import sustained
from coordinator.bench.report import (
    Row,
    machine,
    median,
    merge_results,
    percentile,
    render_text,
    write_results,
)

__all__ = ["build_rows", "register_cli", "run_bench"]

DEFAULT_OUT = "bench/results.json"
MB = 1e6


def _med(xs: list[float] | None) -> float | None:
    return median(x for x in (xs or []) if not math.isnan(x))


def _best(xs: list[float] | None) -> float | None:
    """Best of the alternated repetitions: noise from a shared machine only ever adds time."""
    return min(xs) if xs else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _per_s(amount: float, seconds: float | None) -> float | None:
    return amount / seconds if seconds else None


def _staging_note(st: dict[str, list[float]], key: str, cp: float | None, nbytes: int) -> str:
    copy, check = _best(st.get(f"{key}_copy_s")), _best(st.get(f"{key}_placement_s"))
    if not copy or not cp:
        return ""
    rate = f"{nbytes / MB / copy:,.0f} MB/s, " if nbytes else ""
    return (
        f"the copy alone (the agent's own timing): {copy:.3f} s, {rate}{cp / copy:.2f}x the "
        f"speed of cp; the page-placement check after it (move_pages over every page): "
        f"{check or 0:.3f} s"
    )


def _executemany_note(psql_rps: float | None, many_rps: float | None) -> str:
    if not psql_rps or not many_rps:
        return ""
    return (
        f"asyncpg's executemany pipelines its rows: psql \\copy itself is only "
        f"{psql_rps / many_rps:.1f}x executemany on this machine, so no client path reaches "
        f"10x; ours is measured against both"
    )


def _lag_note(got: dict[str, Any] | None) -> str:
    if not got:
        return "no samples in this step"
    text = f"max {got['max']:.1f} ms over {got['n']} ticks"
    if "max_run_wait" in got:
        text += (
            f" (the loop's thread waited {got['max_run_wait']:.1f} ms of it for a CPU; "
            f"{100 * got['worst_run_wait_share']:.0f} % of the lag of the ticks at or above "
            f"p99 was such waiting)"
        )
    return text


def _latency_rows(
    key: str, what: str, series: list[dict[str, float]], where: str, quick: bool, p99_note: str = ""
) -> list[Row]:
    """p50 and p99 rows of a barrier latency series (last rename -> ready) beside its anchor;
    the p99 target is <= 20 ms and <= 1.5x anchor + 2 ms."""
    ours = [b["ours_ms"] for b in series]
    anchor = [b["anchor_ms"] for b in series if not math.isnan(b["anchor_ms"])]
    n = len(ours)
    short = "" if n >= 30 or quick else f"only {n} batches: p99 needs >= 30"
    return [
        Row(
            f"{key}_p50",
            f"{what}: last rename -> ready, p50 ({n} batches)",
            "ms",
            percentile(ours, 50) if ours else None,
            percentile(anchor, 50) if anchor else None,
            where,
            "—",
        ),
        Row(
            f"{key}_p99",
            f"{what}: last rename -> ready, p99 ({n} batches)",
            "ms",
            percentile(ours, 99) if ours else None,
            percentile(anchor, 99) if anchor else None,
            where,
            "<= 20 ms and <= 1.5x anchor + 2 ms",
            lambda o, a, r: o <= 20 and a is not None and o <= 1.5 * a + 2,
            note="; ".join(x for x in (short, p99_note) if x),
        ),
    ]


def _bare(m: Any, step: str) -> float:
    """The best time of the same functions called bare on the agents' threads: the first run
    (whose files the archive and ingest phases use) or the DuckDB rounds' runs of ours."""
    return float(min([m.bare[f"{step}_s"], *m.crosscheck.get(f"ours_{step}_s", [])]))


def _duck_steps(m: Any) -> tuple[float, float] | None:
    """DuckDB's cross-check and aggregation seconds (best of the run), if it ran."""
    cc = m.crosscheck
    a, b = _best(cc.get("duckdb_crosscheck_s")), _best(cc.get("duckdb_aggregate_s"))
    return (a, b) if a is not None and b is not None else None


def _steps_total(cc: dict[str, list[float]], key: str) -> float | None:
    """The best cross-check + aggregation of one kind of run (the two steps of one run)."""
    a, b = cc.get(f"{key}_crosscheck_s"), cc.get(f"{key}_aggregate_s")
    return min(x + y for x, y in zip(a, b, strict=True)) if a and b else None


def _crosscheck_rows(m: Any) -> list[Row]:
    """Ours against DuckDB doing the same cross-check and vote, and ours on one thread against
    ours on the agents' threads."""
    cc, n = m.crosscheck, m.threads
    if not cc:
        return []
    ours, duck = _steps_total(cc, "ours"), _steps_total(cc, "duckdb")
    steps = ""
    if duck is not None:
        steps = (
            f"cross-check {_best(cc['ours_crosscheck_s']):.2f} s against DuckDB's "
            f"{_best(cc['duckdb_crosscheck_s']):.2f} s, aggregation "
            f"{_best(cc['ours_aggregate_s']):.2f} s against {_best(cc['duckdb_aggregate_s']):.2f} s"
            "; "
        )
    rows = [
        Row(
            "crosscheck_duckdb",
            f"cross-check + aggregation, 7 models x {m.rows:,} items ({n} threads)",
            "s",
            ours,
            duck,
            f"DuckDB {m.duckdb}, same files in and out, threads = {n}"
            if m.duckdb
            else "DuckDB not found (pip install duckdb)",
            "<= 0.6x",
            lambda o, a, r: r is not None and r <= 0.6,
            note=steps + "both read the 7 staged zstd files and write the 7 cross-check files, "
            "then read those and write aggregates.parquet and aggregates.csv (zstd 3); ours "
            "also copies the cross-check files into a node-local folder first and computes "
            "pair agreement, Fleiss' kappa and each model's agreement with the consensus, "
            "as the aggregating agent does",
        )
    ]
    one, many = _best(cc.get("one_crosscheck_s")), _best(cc.get("ours_crosscheck_s"))
    agg_one, agg_many = _best(cc.get("one_aggregate_s")), _best(cc.get("ours_aggregate_s"))
    cores = ""
    if cc.get("ours_cores") and many:
        # The cores the fastest run on n threads got: below n, the machine had none to spare.
        best = cc["ours_crosscheck_s"].index(many)
        cores = (
            f"; the fastest run on {n} threads got {cc['ours_cores'][best]:.2f} cores "
            f"(CPU-s / wall-s of the run), those on 1 thread "
            + ", ".join(f"{c:.2f}" for c in cc.get("one_cores", []))
        )
    rows.append(
        Row(
            "crosscheck_threads",
            f"cross-check: 1 thread against {n} (the speed-up)",
            "s",
            one if n > 1 else None,
            many,
            f"the same on {n} threads",
            ">= 1.6x",
            lambda o, a, r: r is not None and r >= 1.6,
            note=(
                f"the aggregation: {agg_one:.2f} s on 1 thread, {agg_many:.2f} s on {n} "
                f"({agg_one / agg_many:.2f}x)" + cores
                if n > 1 and agg_one and agg_many
                else "this process may run on one CPU only: nothing to compare"
            ),
        )
    )
    return rows


def _memory_rows(m: Any) -> list[Row]:
    """The memory-budget batch (bench.memory): the agent's highest step peak against the
    budget."""
    got = m.memory
    if not got:
        return []
    steps = {k: got[k] for k in ("stage", "crosscheck", "aggregate")}
    peaks = [s["peak_rss"] for s in steps.values() if s.get("peak_rss")]
    budget = got["budget"]
    seconds = sum(s["seconds"] for s in steps.values())
    return [
        Row(
            "memory_budget",
            f"agent peak RSS, 7 models x {got['file_bytes'] / 7 / MB:,.0f} MB "
            f"({got['rows']:,} rows each)",
            "MB",
            max(peaks) / MB if peaks else None,
            budget / MB,
            "agents.memory_budget",
            "<= the budget",
            lambda o, a, r: a is not None and o <= a,
            note=(
                f"{got['compressed_bytes'] / MB:,.0f} MB compressed, "
                f"{got['decoded_bytes'] / MB:,.0f} MB decoded; "
                + "; ".join(
                    f"{k} {s['peak_rss'] / MB:,.0f} MB in {s['seconds']:.1f} s"
                    + (f", {s['ranges']} ranges" if s.get("ranges") else "")
                    for k, s in steps.items()
                    if s.get("peak_rss")
                )
                + f"; {got['rows'] * 7 / seconds / 1e6:.2f} M rows/s over the three steps "
                f"on {got['threads']} threads"
            ),
        )
    ]


def build_rows(m: Any) -> list[Row]:
    """The table's rows from what the run measured (`harness.Measured`)."""
    rows: list[Row] = []
    quick = m.params.quick

    # Barrier: inotify beside a bare inotify reader; the notify backend beside a bare LISTEN
    # client (each file announced by the SDK's PgNotifier after its rename; the daemon's
    # reconcile_s is 3600, so every batch fired on an announcement).
    rows += _latency_rows("barrier", "barrier", m.barrier, f"inotify reader ({m.reader})", quick)
    rows += _latency_rows(
        "notify",
        "barrier, notify backend",
        m.notify,
        f"bare LISTEN client ({m.listen_reader or 'asyncpg'})",
        quick,
        p99_note="each file announced by the SDK's PgNotifier after its rename; the daemon's "
        "reconcile_s is 3600, so every batch fired on an announcement; the anchor hears the "
        "same announcements and looks at no folder",
    )

    # Staging.
    st = m.staging
    one_agent, one_cp = _best(st.get("one_agent")), _best(st.get("one_cp"))
    rows.append(
        Row(
            "staging",
            "staging throughput into node-local tmpfs (one agent)",
            "MB/s",
            _per_s(m.staging_bytes / MB, one_agent),
            _per_s(m.staging_bytes / MB, one_cp),
            "cp, same files, same tmpfs",
            ">= 0.8x",
            lambda o, a, r: r is not None and r >= 0.8,
            note=_staging_note(st, "one_agent", one_cp, m.staging_bytes),
        )
    )
    rows.append(
        Row(
            "staging_two",
            "staging both nodes: two agents at once, wall time",
            "s",
            _best(st.get("two_agents")),
            _best(st.get("two_cp")),
            "two cp at once",
            "<= 1.1x",
            lambda o, a, r: r is not None and r <= 1.1,
            note="this machine has one NUMA node: both agents run bound to node 0 (sharing "
            "its cores), each into its own tmpfs folder, driven through the project's Hub; "
            + _staging_note(st, "two_agents", _best(st.get("two_cp")), 0),
        )
    )

    # Database ingest.
    ing = m.ingest
    secs = ing.get("seconds", {})
    nrows, sub = ing.get("rows", 0), ing.get("subset", 0)
    ours_rps = _per_s(nrows, _best(secs.get("ours")))
    psql_rps = _per_s(nrows, _best(secs.get("psql")))
    rows.append(
        Row(
            "ingest_psql",
            f"database ingest ({nrows:,} rows): Ledger.commit",
            "rows/s",
            ours_rps,
            psql_rps,
            "psql \\copy, same rows, same table" if psql_rps else "psql not found",
            ">= 0.8x of psql",
            lambda o, a, r: r is not None and r >= 0.8,
        )
    )
    rows.append(
        Row(
            "ingest_executemany",
            "database ingest: Ledger.commit vs executemany",
            "rows/s",
            ours_rps,
            _per_s(sub, _best(secs.get("executemany"))),
            "asyncpg executemany" + (f", first {sub:,} rows" if sub < nrows else ""),
            ">= 10x",
            lambda o, a, r: r is not None and r >= 10,
            note=_executemany_note(psql_rps, _per_s(sub, _best(secs.get("executemany")))),
        )
    )
    import importlib.metadata as md

    rows.append(
        Row(
            "ingest_records",
            "database ingest: Ledger.commit vs copy_records_to_table",
            "rows/s",
            ours_rps,
            _per_s(sub, _best(secs.get("copy_records"))),
            f"asyncpg {md.version('asyncpg')} copy_records_to_table"
            + (f", first {sub:,} rows" if sub < nrows else ""),
            "—",
        )
    )

    # Parquet.
    z, s = m.codecs.get("zstd3", {}), m.codecs.get("snappy", {})
    like = m.codecs.get("sdk_snappy", {})
    if z and s:
        snappy = "pyarrow snappy, its defaults"

        def like_for_like(key: str) -> str:
            if not like:
                return ""
            return (
                f"the SDK's writer with snappy instead (the codec alone): {z[key] / like[key]:.2f}x"
            )

        rows.append(
            Row(
                "parquet_size",
                "Parquet: the SDK's zstd 3 writer, size of the 7 files",
                "MB",
                z["bytes"] / MB,
                s["bytes"] / MB,
                snappy,
                "<= 0.85x",
                lambda o, a, r: r is not None and r <= 0.85,
                note=like_for_like("bytes"),
            )
        )
        rows.append(
            Row(
                "parquet_write",
                "Parquet: the SDK's zstd 3 writer, write time",
                "s",
                z["write_s"],
                s["write_s"],
                snappy,
                "<= 1.3x",
                lambda o, a, r: r is not None and r <= 1.3,
                note=like_for_like("write_s") + "; files on tmpfs, best of the alternated runs",
            )
        )
        rows.append(
            Row(
                "parquet_read",
                "Parquet: zstd 3 read time (pq.read_table)",
                "s",
                z["read_s"],
                s["read_s"],
                snappy,
                "—",
            )
        )
        rows.append(
            Row(
                "parquet_cpu_write",
                "Parquet: zstd 3 write CPU per GB of Arrow data",
                "CPU-s/GB",
                z["write_cpu_s_per_gb"],
                s["write_cpu_s_per_gb"],
                snappy,
                "report",
                note=f"{z['raw_bytes'] / MB:.0f} MB of Arrow data in 7 tables, "
                f"{z['raw_bytes'] / z['bytes']:.1f}x compressed by zstd 3; read "
                f"{z['read_cpu_s_per_gb']:.2f} CPU-s/GB (snappy {s['read_cpu_s_per_gb']:.2f}); "
                f"compressing one SLM result of 100-400 MB costs "
                f"{0.1 * z['write_cpu_s_per_gb']:.2f}-{0.4 * z['write_cpu_s_per_gb']:.2f} "
                f"CPU-s to write here",
            )
        )

    rows += _crosscheck_rows(m)

    # Archive.
    ar = m.archive
    nbytes = (ar.get("bytes") or [0.0])[0]
    rows.append(
        Row(
            "archive",
            "archive to the lake (14 files + aggregates.parquet)",
            "MB/s",
            _per_s(nbytes / MB, _best(ar.get("ours_s"))),
            _per_s(nbytes / MB, _best(ar.get("anchor_s"))),
            "cp + sync of the same files",
            ">= 0.9x",
            lambda o, a, r: r is not None and r >= 0.9,
            note="Lake.archive as the aggregating agent runs it, copying the aggregates.parquet "
            "the aggregation wrote; the anchor `cp`s the same 15 files and `sync FILE...` "
            "fsyncs each copy and the folder, as the lake does",
        )
    )

    # The Iceberg lake's commit.
    lk = m.lake
    if lk:
        rows.append(
            Row(
                "lake_commit",
                "Iceberg commit of a batch (4 tables, the same data files)",
                "ms",
                _ms(_med(lk.get("ours_s"))),
                _ms(_med(lk.get("anchor_s"))),
                "pyiceberg add_files, SQL catalog",
                "<= 2x",
                lambda o, a, r: r is not None and r <= 2.0,
                note="ours: the agent's add_files through its preparing catalog (manifests and "
                "metadata files written and fsynced) and one PostgreSQL transaction with the four "
                "catalog compare-and-sets and the ledger's row; the anchor: pyiceberg's own "
                "add_files of the same files, a load and a commit per table, nothing fsynced, "
                f"{int((lk.get('rows') or [0])[0]):,} rows a table",
            )
        )

    # Event-loop lag.
    lag = m.lag.get("steps", {})
    idle = lag.get("idle_before", {})
    for step, target in (
        ("staging", True),
        ("crosscheck", False),
        ("aggregate", False),
        ("commit", True),
        ("archive", True),
    ):
        got = lag.get(step)
        rows.append(
            Row(
                f"lag_{step}",
                f"event-loop lag p99 during {step}",
                "ms",
                got["p99"] if got else None,
                idle.get("p99"),
                "idle, same run",
                "p99 <= 5 ms" if target else "—",
                (lambda o, a, r: o <= 5) if target else None,
                note=_lag_note(got),
            )
        )

    # CPU.
    full = m.full
    if full:
        pct = [f["daemon_cpu_s"] / f["wall_s"] * 100 for f in full]
        loop = [f["loop_cpu_s"] / f["wall_s"] * 100 for f in full]
        cpu_s = _med([f["daemon_cpu_s"] for f in full]) or 0.0
        wall = _med([f["wall_s"] for f in full]) or 0.0
        rows.append(
            Row(
                "cpu_batch",
                "daemon CPU per batch / batch wall time (whole process)",
                "%",
                _med(pct),
                None,
                "",
                "<= 2 %",
                lambda o, a, r: o <= 2,
                note=f"{cpu_s:.2f} CPU-s over {wall:.1f} s from the last rename to done",
            )
        )
        peak = _med([f["agent_peak_rss"] for f in full if f.get("agent_peak_rss")])
        rows.append(
            Row(
                "rss_batch",
                "agent peak RSS per full batch",
                "MB",
                peak / MB if peak else None,
                m.decoded_bytes / MB if m.decoded_bytes else None,
                "the batch's 7 results decoded (Arrow tables)",
                "report",
                note=f"the batch's files: {m.staging_bytes / MB:.0f} MB compressed (zstd 3); "
                "the agent stages, cross-checks all 7 models (one node here) and aggregates "
                f"on {m.threads} threads; VmHWM reset before each batch, mapped tmpfs pages "
                "included",
            )
        )
        rows.append(
            Row(
                "cpu_batch_loop",
                "daemon CPU per batch / batch wall (event-loop thread)",
                "%",
                _med(loop),
                None,
                "",
                "<= 2 %",
                lambda o, a, r: o <= 2,
                note="the coordination alone; the rest of the process is its worker threads "
                "(reading the agent's rows file for the COPY, scans, the clean-up)",
            )
        )
    if m.idle:
        rows.append(
            Row(
                "cpu_idle",
                f"daemon idle CPU over {m.idle['seconds']:.0f} s",
                "%",
                m.idle["daemon_pct"],
                None,
                "",
                "<= 0.5 % of a core",
                lambda o, a, r: o <= 0.5,
                note=f"event-loop thread {m.idle['loop_pct']:.2f} %; busiest threads: "
                + ", ".join(f"{k} {v:.2f} %" for k, v in list(m.idle["threads_pct"].items())[:3])
                + f"; the agent {m.idle['agent_pct']:.2f} %",
            )
        )

    rows.extend(_memory_rows(m))

    # End to end and its parts.
    if full:
        bar = _med([b["anchor_ms"] for b in m.barrier]) or 0.0
        duck = _duck_steps(m)
        parts = {
            "barrier": bar / 1000,
            "staging": one_cp or 0.0,
            "crosscheck": duck[0] if duck else _bare(m, "crosscheck"),
            "aggregate": duck[1] if duck else _bare(m, "aggregate"),
            "commit": _best(secs.get("psql")) or 0.0,
            "archive": _best(ar.get("anchor_s")) or 0.0,
        }
        rows.append(
            Row(
                "e2e",
                "end to end: last rename -> committed and archived",
                "s",
                _med([f["e2e_s"] for f in full]),
                sum(parts.values()),
                "sum of the anchors",
                "<= 1.2x",
                lambda o, a, r: r is not None and r <= 1.2,
                note="anchors: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                + (
                    f" (cross-check and aggregation: DuckDB on {m.threads} threads, same run)"
                    if duck
                    else " (cross-check and aggregation: no DuckDB, so the same functions called "
                    "bare in one process)"
                ),
            )
        )
        t = [f["timings"] for f in full]

        def step_s(key: str) -> float | None:
            return _med([x[key] / 1000 for x in t if key in x])

        # The steps against the same functions called bare: a regression guard, not a goal.
        for key, label, anchor_s in (
            ("crosscheck_ms", "cross-check step (agent)", _bare(m, "crosscheck")),
            ("aggregate_ms", "aggregate step (agent)", _bare(m, "aggregate")),
            ("commit_ms", "commit step (daemon)", parts["commit"]),
            ("archive_ms", "archive step (agent)", parts["archive"]),
        ):
            rows.append(
                Row(f"step_{key[:-3]}", label, "s", step_s(key), anchor_s, "its anchor above", "—")
            )
    rows += sustained.rows(m)
    for r in rows:
        r.evaluate(thresholds=not quick)
    if m.errors:
        rows.append(Row("errors", "errors", "", None, None, "", "", note="; ".join(m.errors)))
    return rows


def run_bench(
    *,
    batches: int = 30,
    size_mb: float = 20.0,
    quick: bool = False,
    dsn: str = "",
    command: str = "coordinatorctl bench",
    only: frozenset[str] | None = None,
) -> tuple[dict[str, Any], list[Row]]:
    """Run the benchmark; return the results document (rows, machine, raw figures)."""
    from dataclasses import asdict

    from coordinator.bench import harness

    p = (
        harness.Params.quick_run()
        if quick
        else harness.Params(barrier_batches=batches, file_mb=size_mb)
    )
    if quick and batches != 30:
        p.barrier_batches = batches
    p.only = only
    t0 = time.time()
    mach = machine()
    m = harness.run(p, dsn=dsn)
    rows = build_rows(m)
    return {
        "version": 1,
        "command": command,
        "started_at": dt.datetime.fromtimestamp(t0, dt.UTC).isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": time.time() - t0,
        "quick": quick,
        "machine": mach,
        "postgres": m.ingest.get("server_version", ""),
        "psql": m.psql,
        "duckdb": m.duckdb,
        "params": {
            **asdict(p),
            "rows": m.rows,
            "file_mb": m.file_bytes / MB,
            "decoded_bytes": m.decoded_bytes,
        },
        "rows": [r.as_dict() for r in rows],
        "raw": {
            "barrier": m.barrier,
            "notify": m.notify,
            "staging": m.staging,
            "staging_bytes": m.staging_bytes,
            "codecs": m.codecs,
            "bare": m.bare,
            "threads": m.threads,
            "crosscheck": m.crosscheck,
            "archive": m.archive,
            "idle": m.idle,
            "full": m.full,
            "lag": m.lag,
            "ingest": m.ingest,
            "lake": m.lake,
            "sustained": m.sustained,
            "memory": m.memory,
        },
        "errors": m.errors,
    }, rows


def cmd_bench(args: argparse.Namespace) -> int:
    """The `bench` subcommand: run, print the table (or JSON), write results.json."""
    if args.render:
        from coordinator.bench.report import render_docs

        print(render_docs(json.loads(Path(args.render).read_text())))
        return 0
    from coordinator.core.logs import configure

    configure("error", "console")  # the Hub and Ledger used in-process: errors, on stderr
    argv = ["coordinatorctl", "bench"]
    argv += [f"--batches {args.batches}"] if args.batches != 30 else []
    argv += [f"--size-mb {args.size_mb:g}"] if args.size_mb != 20.0 else []
    argv += ["--quick"] if args.quick else []
    only = None
    if args.only:
        from coordinator.bench.harness import PHASES

        only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
        if only - set(PHASES):
            print(f"coordinatorctl bench: --only takes {','.join(PHASES)}", file=sys.stderr)
            return 2
        argv.append(f"--only {args.only}")
    doc, rows = run_bench(
        batches=args.batches,
        size_mb=args.size_mb,
        quick=args.quick,
        command=" ".join(argv),
        only=only,
    )
    out = Path(args.out)
    if only and out.is_file():  # a partial run keeps the other phases' rows of the last one
        doc = merge_results(json.loads(out.read_text()), doc)
    write_results(out, doc)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render_text(rows))
        print(f"\nresults: {out}")
    if doc["errors"]:
        return 1
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `bench` to coordinatorctl's subcommands."""
    s = subparsers.add_parser("bench", help="measure against the anchors, side by side")
    s.add_argument(
        "--batches", type=int, default=30, help="batches in the barrier series (p99 needs >= 30)"
    )
    s.add_argument(
        "--size-mb",
        type=float,
        default=20.0,
        help="compressed size of each model's file in the full batches",
    )
    s.add_argument("--quick", action="store_true", help="tiny sizes, no thresholds (smoke)")
    s.add_argument("--out", default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    s.add_argument("--json", action="store_true", help="print the results document")
    s.add_argument("--only", help="run only these phases (comma-separated), e.g. barrier,idle")
    s.add_argument(
        "--render",
        metavar="RESULTS",
        help="print the Markdown block of a results file (for docs/benchmarks.md); run nothing",
    )
    s.set_defaults(func=cmd_bench)
