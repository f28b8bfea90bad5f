"""The sustained benchmark's by-hand anchor does the same work as the agents: DuckDB's
cross-check files and aggregates hold the rows the project's cross-check and vote give for the
same results (missing items, null predictions and ties included), so its time is the time of the
same work; and the rows' `met` rules (tests/system/test_bench_smoke.py runs the phase)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.consensus import aggregate
from agents.crosscheck import crosscheck
from coordinator.bench import duck, sustained
from coordinator.bench.harness import Measured, Params
from coordinator.core.summary import COPY_COLUMNS

pytest.importorskip("duckdb", reason="the anchor is DuckDB (the dev extra installs it)")

MODELS = ("m-a", "m-b", "m-c", "m-d")


def results(tmp_path: Path) -> dict[str, Path]:
    """Four models' results: items some model lacks, a null prediction, NaN and null scores, a
    2-2 tie decided by the mean score and a tie of equal means decided by the smaller label."""
    rows = {
        "m-a": [("i1", "x", 0.9), ("i2", "x", 0.2), ("i3", "y", 0.5), ("i4", None, 0.1),
                ("i5", "x", float("nan")), ("i6", "z", 0.5)],
        "m-b": [("i1", "x", 0.8), ("i2", "x", 0.3), ("i3", "z", 0.5), ("i5", "y", 0.4),
                ("i6", "z", 0.5)],
        "m-c": [("i1", "y", 0.7), ("i2", "y", 0.9), ("i3", "y", 0.5), ("i5", "y", None),
                ("i6", "w", 0.5), ("i7", "x", 0.6)],
        "m-d": [("i2", "y", 0.9), ("i4", None, 0.2), ("i6", "w", 0.5), ("i8", None, 0.3)],
    }  # fmt: skip
    paths = {}
    for m, rs in rows.items():
        ids, preds, scores = zip(*rs, strict=True)
        t = pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "prediction": pa.array(preds, pa.string()),
                "score": pa.array(scores, pa.float64()),
            }
        )
        paths[m] = tmp_path / f"{m}.parquet"
        pq.write_table(t, paths[m])
    return paths


def comparable(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The rows with a NaN score spelled out (NaN equals nothing, itself included)."""
    nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    return [{k: "NaN" if nan(v) else v for k, v in r.items()} for r in rows]


def test_duckdb_cross_check_writes_the_rows_of_the_agents_cross_check(tmp_path: Path) -> None:
    src = results(tmp_path)
    tables = {m: pq.read_table(p) for m, p in src.items()}
    (tmp_path / "out").mkdir()
    written = duck.crosscheck(src, tmp_path / "out", threads=2)
    assert [p.name for p in written] == [f"crosscheck_{m}.parquet" for m in MODELS]
    for m, path in zip(MODELS, written, strict=True):
        ours = crosscheck(m, tables).to_pylist()
        theirs = pq.read_table(path).to_pylist()
        assert comparable(theirs) == comparable(ours), m


def test_duckdb_vote_gives_the_agents_consensus_and_the_copy_csv(tmp_path: Path) -> None:
    src = results(tmp_path)
    tables = {m: pq.read_table(p) for m, p in src.items()}
    (tmp_path / "out").mkdir()
    checks = duck.crosscheck(src, tmp_path / "out", threads=1)
    out = tmp_path / "agg"
    out.mkdir()
    duck.aggregate(checks, out, "b-1", threads=1)
    csv_path = out / "aggregates.csv"
    ours = aggregate({m: crosscheck(m, tables) for m in MODELS}).items
    theirs = pq.read_table(out / "aggregates.parquet")
    cols = ["item_id", "consensus", "votes", "n_models", "confidence"]
    assert theirs.select(cols).to_pylist() == ours.select(cols).to_pylist()
    with open(csv_path, newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == COPY_COLUMNS
    assert [r[:2] for r in lines[1:]] == [["b-1", i] for i in ours.column("item_id").to_pylist()]
    # i8: nobody predicted it: no consensus, confidence 0 for COPY.
    assert lines[-1][1:4] == ["i8", "", "0"] and float(lines[-1][5]) == 0.0


# -- the rows' rules on synthetic series ---------------------------------------------------------


def measured(
    *, wall_s: float, per_batch_s: float, flight: list[float], quick: bool = False
) -> Measured:
    m = Measured(params=Params(quick=quick))
    share = per_batch_s / len(sustained.STEPS)
    m.sustained = {
        "threads": 2,
        "duckdb": "1.4.4",
        "wall_s": wall_s,
        "batches": [
            {"batch_id": f"b{i}", "latency_s": 5.0 * (i + 1), "in_flight_s": x}
            for i, x in enumerate(flight)
        ],
        "anchor": [
            dict.fromkeys(sustained.STEPS, share),
            dict.fromkeys(sustained.STEPS, 2 * share),  # the slower run does not count
        ],
    }
    return m


FLAT = [10.0, 9.0, 10.0, 10.5, 9.5, 10.0, 10.0, 10.0, 10.0, 10.0]


def judged(m: Measured) -> dict[str, sustained.Row]:
    return {r.key: r.evaluate(thresholds=not m.params.quick) for r in sustained.rows(m)}


def test_throughput_is_batches_per_hour_against_the_serial_anchor_and_must_beat_it() -> None:
    rows = judged(measured(wall_s=80.0, per_batch_s=10.0, flight=FLAT))
    r = rows["sustained_throughput"]
    assert (r.ours, r.anchor) == (10 / 80 * 3600, 360.0)
    assert r.ratio == pytest.approx(1.25) and r.met is True
    at_par = judged(measured(wall_s=100.0, per_batch_s=10.0, flight=FLAT))
    assert at_par["sustained_throughput"].ratio == pytest.approx(1.0)
    assert at_par["sustained_throughput"].met is False  # overlap must make it better than 1.0x
    worse = judged(measured(wall_s=120.0, per_batch_s=10.0, flight=FLAT))
    assert worse["sustained_throughput"].met is False


def test_the_growth_row_holds_at_its_limit_fails_past_it_and_flags_a_rising_series() -> None:
    def growth(flight: list[float]) -> sustained.Row:
        return judged(measured(wall_s=80.0, per_batch_s=10.0, flight=flight))["sustained_growth"]

    assert growth(FLAT).met is True
    at_limit = growth([*FLAT[:7], 15.0, 15.0, 15.0])
    assert at_limit.ratio == 1.5 and at_limit.met is True
    past = growth([*FLAT[:7], 15.1, 15.1, 15.1])
    assert past.met is False
    slow_rise = [10.0 + 0.05 * i for i in range(10)]  # +4.5 %: within 1.5x, but every batch up
    r = growth(slow_rise)
    assert r.ratio is not None and r.ratio < 1.5
    assert r.met is False and "rising at every batch: YES" in r.note


def test_the_worst_latency_is_reported_against_the_last_batch_by_hand_unjudged() -> None:
    r = judged(measured(wall_s=80.0, per_batch_s=10.0, flight=FLAT))["sustained_latency"]
    assert (r.ours, r.anchor, r.met) == (50.0, 100.0, None)


def test_a_quick_run_judges_nothing_and_a_run_without_the_phase_has_no_rows() -> None:
    rows = judged(measured(wall_s=500.0, per_batch_s=10.0, flight=FLAT, quick=True))
    assert rows and all(r.met is None for r in rows.values())
    for r in rows.values():
        for v in (r.ours, r.anchor, r.ratio):
            assert v is not None and math.isfinite(v) and v > 0
    assert sustained.rows(Measured(params=Params())) == []
