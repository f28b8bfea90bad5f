"""The benchmark harness at tiny sizes, so it never rots: every row gets our figure, its anchor
and a ratio, and results.json and the docs block render. No timing is asserted here (speed goals
live in `make bench`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.bench import register_cli, run_bench
from coordinator.bench.report import render_docs, render_text, rows_from_results, write_results

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(pg_dsn: str) -> tuple[dict[str, Any], list[Any]]:
    return run_bench(quick=True, dsn=pg_dsn, command="coordinatorctl bench --quick")


def test_quick_bench_runs_every_phase_without_errors(
    quick_run: tuple[dict[str, Any], list[Any]],
) -> None:
    doc, _ = quick_run
    assert doc["errors"] == []
    assert doc["quick"] is True


def test_every_row_has_ours_and_every_anchored_row_an_anchor_and_a_ratio(
    quick_run: tuple[dict[str, Any], list[Any]],
) -> None:
    doc, _ = quick_run
    keys = {r["key"] for r in doc["rows"]}
    for key in (
        "barrier_p99",
        "staging",
        "staging_two",
        "ingest_psql",
        "ingest_executemany",
        "parquet_size",
        "parquet_write",
        "archive",
        "lag_staging",
        "lag_commit",
        "lag_archive",
        "cpu_batch",
        "cpu_idle",
        "e2e",
    ):
        assert key in keys, f"row {key} missing"
    for row in doc["rows"]:
        assert row["ours"] is not None, f"{row['key']}: no figure of ours ({row['note']})"
        if row["anchor_label"] and "not found" not in row["anchor_label"]:
            assert row["anchor"] is not None, f"{row['key']}: no anchor"
            assert row["ratio"] is not None, f"{row['key']}: no ratio"


def test_a_quick_run_judges_no_target(quick_run: tuple[dict[str, Any], list[Any]]) -> None:
    doc, _ = quick_run
    assert all(r["met"] is None for r in doc["rows"])


def test_results_json_round_trips_into_the_table_and_the_docs_block(
    quick_run: tuple[dict[str, Any], list[Any]], tmp_path: Path
) -> None:
    doc, rows = quick_run
    out = tmp_path / "bench" / "results.json"
    write_results(out, doc)
    again = json.loads(out.read_text())
    assert [r.key for r in rows_from_results(again)] == [r.key for r in rows]
    text = render_text(rows)
    assert all(r.figure[:40] in text for r in rows)
    docs = render_docs(again)
    assert "| figure | ours |" in docs and again["machine"]["kernel"] in docs


def test_the_bench_subcommand_takes_the_documented_options() -> None:
    p = argparse.ArgumentParser()
    register_cli(p.add_subparsers(dest="command"))
    args = p.parse_args(
        ["bench", "--batches", "40", "--size-mb", "50", "--quick", "--out", "x.json", "--json"]
    )
    assert (args.batches, args.size_mb, args.quick, args.out, args.json) == (
        40,
        50.0,
        True,
        "x.json",
        True,
    )
    assert callable(args.func)
