"""The benchmark's DuckDB anchor does the work ours does: on the same staged files it writes the
same cross-check files, aggregates.parquet and aggregates.csv, row for row and value for value.
So the ratio `make bench` shows between the two is a ratio between two ways of one job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from coordinator.bench import anchors
from coordinator.ctl.demo import synthetic_batch

duckdb = pytest.importorskip("duckdb", reason="DuckDB is a dev dependency (pyproject.toml)")
from coordinator.bench import duck  # noqa: E402

ROWS = 3_000


def awkward_batch() -> dict[str, pa.Table]:
    """The demo's models with what real results have: items some models lack, items only one
    model has, null predictions, an item nobody predicted, a NaN and a null score, a model
    whose file is not sorted by item_id, and ties: one broken by the mean score, one (equal
    means) by the smaller label."""
    _, tables = synthetic_batch(ROWS, seed=11)
    rng = np.random.default_rng(5)
    out = {}
    for k, (m, t) in enumerate(sorted(tables.items())):
        keep = rng.random(t.num_rows) > 0.05 * k  # later models lack more items
        t = t.filter(pa.array(keep))
        pred = t.column("prediction").to_pylist()
        score = t.column("score").to_pylist()
        for i in range(k, len(pred), 97):
            pred[i] = None
        score[3] = float("nan")
        score[4] = None
        ids = t.column("item_id").to_pylist()
        # item-x: nobody predicts it; item-y: only this model has it; item-z*: the ties.
        ids += ["item-x", f"item-y-{m}", "item-z1", "item-z2"]
        pred += [None, "cat", "a" if k < 2 else "b" if k < 4 else None, "a" if k % 2 else "b"]
        score += [0.3, 0.9, 0.5, 0.2 + 0.1 * k]
        t = pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "prediction": pa.array(pred, pa.string()),
                "score": pa.array(score, pa.float64()),
            }
        )
        out[m] = t.take(pa.array(np.arange(t.num_rows)[::-1])) if k == 2 else t
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[anchors.BareWork, Path, list[str]]:
    root = tmp_path_factory.mktemp("duck")
    sources = anchors.write_sources(root / "sources", awkward_batch())
    staged = root / "staged"
    anchors.stage_copies(sources, staged)
    models = list(sources)
    ours = anchors.bare_work(staged, root / "ours", root / "local", models, threads=2)
    duck.run({m: staged / f"{m}.parquet" for m in models}, root / "duckdb", "bare", threads=2)
    return ours, root / "duckdb", models


def rows(path: Path) -> list[dict[str, object]]:
    return pq.read_table(path).to_pylist()


def same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def assert_same_rows(ours: list[dict[str, object]], theirs: list[dict[str, object]]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.keys() == b.keys(), i
        assert all(same(a[k], b[k]) for k in a), (i, a, b)


Both = tuple[anchors.BareWork, Path, list[str]]


def test_the_cross_check_files_hold_the_same_rows(both: Both) -> None:
    ours, theirs, models = both
    for m, path in zip(models, ours.crosscheck_files, strict=True):
        assert path.name == f"crosscheck_{m}.parquet"
        assert_same_rows(rows(path), rows(theirs / path.name))
    # The batch has what it should for the comparison to mean something.
    z = {r["item_id"]: r for r in rows(ours.crosscheck_files[0])}
    assert z["item-y-slm-1"]["n_others"] == 0 and z["item-x"]["n_others"] == 0
    assert any(r["agree_models"] and r["n_agree"] < r["n_others"] for r in z.values())


def test_the_aggregates_hold_the_same_rows(both: Both) -> None:
    ours, theirs, _ = both
    got = rows(ours.aggregates_parquet)
    assert_same_rows(got, rows(theirs / "aggregates.parquet"))
    by_id = {r["item_id"]: r for r in got}
    assert by_id["item-x"]["consensus"] is None and by_id["item-x"]["n_models"] == 0
    assert by_id["item-z1"]["consensus"] == "a"  # 2 against 2, equal means: the smaller label
    assert len(got) == ROWS + 3 + 7


def test_the_rows_csv_holds_the_same_rows(both: Both) -> None:
    ours, theirs, _ = both
    types = {
        "batch_id": pa.string(),
        "item_id": pa.string(),
        "consensus": pa.string(),
        "votes": pa.int32(),
        "n_models": pa.int32(),
        "confidence": pa.float64(),
    }
    opts = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    got = pacsv.read_csv(ours.aggregates_csv, convert_options=opts)
    assert got.column_names == list(types)
    assert_same_rows(
        got.to_pylist(),
        pacsv.read_csv(theirs / "aggregates.csv", convert_options=opts).to_pylist(),
    )


def test_duckdb_runs_with_the_thread_count_it_is_given(tmp_path: Path) -> None:
    sources = anchors.write_sources(tmp_path / "s", awkward_batch())
    times = duck.run(sources, tmp_path / "out", "b", threads=1)
    assert times.crosscheck_s > 0 and times.aggregate_s > 0
    con = duck.connect(3)
    try:
        assert con.execute("SELECT current_setting('threads')").fetchone() == (3,)
    finally:
        con.close()
