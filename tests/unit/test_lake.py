"""The data lake: where an archived batch goes, what it holds, and re-running an archive."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.lake import Lake
from coordinator.core.errors import LakeError

DATE = "2024-05-01"


def aggregates(n: int = 3) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "consensus": ["cat"] * n,
            "votes": pa.array([2] * n, pa.int32()),
            "n_models": pa.array([3] * n, pa.int32()),
            "confidence": [2 / 3] * n,
        }
    )


def write_batch_files(tmp_path: Path, large: int = 250_000) -> list[Path]:
    """Three model files (slm-2's of `large` bytes, slm-3's empty) and one cross-check file in a
    staging batch folder, then the aggregates.parquet an agent wrote."""
    folder = tmp_path / "staging" / "b1"
    folder.mkdir(parents=True)
    paths = []
    for name, size in [
        ("slm-1.parquet", 1000),
        ("slm-2.parquet", large),
        ("slm-3.parquet", 0),
        ("crosscheck_slm-1.parquet", 77),
    ]:
        p = folder / name
        p.write_bytes(os.urandom(size))
        paths.append(p)
    # The aggregating agent's file comes last: its presence in the lake says the folder is whole.
    agg = tmp_path / "tmpfs" / "b1" / "aggregates.parquet"
    agg.parent.mkdir(parents=True)
    pq.write_table(aggregates(), agg)
    paths.append(agg)
    return paths


@pytest.fixture
def batch_files(tmp_path: Path) -> list[Path]:
    return write_batch_files(tmp_path)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_archive_writes_the_files_and_aggregates_under_date_and_batch(
    tmp_path: Path, batch_files: list[Path]
) -> None:
    lake_root = tmp_path / "lake"
    folder, written = Lake(str(lake_root)).archive("b1", DATE, batch_files)
    expected = lake_root.resolve() / "batches" / f"date={DATE}" / "batch=b1"
    assert folder == str(expected)
    assert sorted(p.name for p in expected.iterdir()) == sorted([p.name for p in batch_files])
    for src in batch_files:
        assert (expected / src.name).read_bytes() == src.read_bytes()
    assert pq.read_table(expected / "aggregates.parquet").equals(aggregates())
    assert written == sum(p.stat().st_size for p in expected.iterdir())


def test_archive_leaves_no_temp_files(tmp_path: Path, batch_files: list[Path]) -> None:
    lake_root = tmp_path / "lake"
    Lake(str(lake_root)).archive("b1", DATE, batch_files)
    assert [f for f in all_files(lake_root) if Path(f).name.startswith(".")] == []


def test_rerunning_an_archive_gives_the_same_lake(tmp_path: Path, batch_files: list[Path]) -> None:
    lake_root = tmp_path / "lake"
    lake = Lake(str(lake_root))
    first = lake.archive("b1", DATE, batch_files)
    before = {f: (lake_root / f).read_bytes() for f in all_files(lake_root)}
    second = lake.archive("b1", DATE, batch_files)
    after = {f: (lake_root / f).read_bytes() for f in all_files(lake_root)}
    assert second == first
    assert after == before


def test_a_rerun_replaces_a_file_left_incomplete_by_a_crash(
    tmp_path: Path, batch_files: list[Path]
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    folder, _ = lake.archive("b1", DATE, batch_files)
    target = Path(folder) / "slm-2.parquet"
    target.write_bytes(b"half")
    (Path(folder) / ".slm-2.parquet.tmp").write_bytes(b"leftover")
    lake.archive("b1", DATE, batch_files)
    assert target.read_bytes() == batch_files[1].read_bytes()
    assert lake.list_batch("b1", DATE) == sorted([p.name for p in batch_files])


def test_list_batch_names_the_archived_files_without_temps(
    tmp_path: Path, batch_files: list[Path]
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    folder, _ = lake.archive("b1", DATE, batch_files)
    (Path(folder) / ".stray.tmp").write_bytes(b"x")
    assert lake.list_batch("b1", DATE) == sorted([p.name for p in batch_files])


def test_list_batch_of_an_unknown_batch_is_empty(tmp_path: Path, batch_files: list[Path]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    lake.archive("b1", DATE, batch_files)
    assert lake.list_batch("b2", DATE) == []
    assert lake.list_batch("b1", "2024-05-02") == []


def test_batches_on_different_dates_are_kept_apart(tmp_path: Path, batch_files: list[Path]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    a, _ = lake.archive("b1", "2024-05-01", [batch_files[0], batch_files[-1]])
    b, _ = lake.archive("b1", "2024-05-02", [batch_files[1], batch_files[-1]])
    assert a != b
    assert lake.list_batch("b1", "2024-05-01") == ["aggregates.parquet", "slm-1.parquet"]
    assert lake.list_batch("b1", "2024-05-02") == ["aggregates.parquet", "slm-2.parquet"]


def test_a_relative_lake_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        Lake("lake").batch_path("b1", DATE)
        == f"{tmp_path.resolve()}/lake/batches/date={DATE}/batch=b1"
    )


def test_a_missing_source_file_is_a_lake_error(tmp_path: Path, batch_files: list[Path]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(LakeError, match=r"gone\.parquet"):
        lake.archive("b1", DATE, [*batch_files, tmp_path / "gone.parquet"])
    # Nothing is renamed into place before every copy is whole, so no half folder shows.
    assert lake.list_batch("b1", DATE) == []


def test_a_failed_archive_leaves_no_temp_file(tmp_path: Path, batch_files: list[Path]) -> None:
    lake_root = tmp_path / "lake"
    with pytest.raises(LakeError):
        Lake(str(lake_root)).archive("b1", DATE, [*batch_files, tmp_path / "gone.parquet"])
    assert [f for f in all_files(lake_root) if Path(f).name.startswith(".")] == []


def test_an_unwritable_lake_is_a_lake_error(tmp_path: Path, batch_files: list[Path]) -> None:
    blocker = tmp_path / "lake"
    blocker.write_bytes(b"a file where the lake folder should be")
    with pytest.raises(LakeError):
        Lake(str(blocker)).archive("b1", DATE, batch_files)


def _lake_with_ids(tmp_path: Path, ids: list[str]) -> Path:
    root = tmp_path / "lake"
    agg = tmp_path / "agg" / "aggregates.parquet"
    agg.parent.mkdir(parents=True)
    pq.write_table(aggregates(2), agg)
    for bid in ids:
        Lake(str(root)).archive(bid, DATE, [agg])
    return root


NUMERIC_IDS = ["0012", "20240501", "b-7"]


def test_hive_readers_infer_all_numeric_batch_ids_as_integers_by_default(tmp_path: Path) -> None:
    """The trap docs/lake.md warns of: without a flag, pyarrow reads '0012' back as 12, and
    DuckDB reads ids that are all numbers (and round-trip as such) as BIGINT."""
    import pyarrow.dataset as ds

    duckdb = pytest.importorskip("duckdb")
    root = _lake_with_ids(tmp_path, ["0012", "20240501"])
    inferred = ds.dataset(root / "batches", partitioning="hive").to_table()
    assert pa.types.is_integer(inferred.schema.field("batch").type)
    assert sorted(set(inferred.column("batch").to_pylist())) == [12, 20240501]
    root2 = _lake_with_ids(tmp_path / "2", ["7", "20240501"])
    rows = duckdb.sql(
        f"SELECT DISTINCT batch, typeof(batch) FROM read_parquet("
        f"'{root2}/batches/*/*/aggregates.parquet', hive_partitioning = true) ORDER BY 1"
    ).fetchall()
    assert rows == [(7, "BIGINT"), (20240501, "BIGINT")]


def test_hive_readers_given_string_partitions_read_batch_ids_as_written(tmp_path: Path) -> None:
    """The reader flags docs/lake.md gives: pyarrow's partitioning schema, DuckDB's hive_types."""
    import pyarrow.dataset as ds

    duckdb = pytest.importorskip("duckdb")
    root = _lake_with_ids(tmp_path, NUMERIC_IDS)
    strings = pa.schema([("date", pa.string()), ("batch", pa.string())])
    part = ds.partitioning(strings, flavor="hive")
    got = ds.dataset(root / "batches", partitioning=part).to_table()
    assert sorted(set(got.column("batch").to_pylist())) == sorted(NUMERIC_IDS)
    assert set(got.column("date").to_pylist()) == {DATE}
    rows = duckdb.sql(
        f"SELECT DISTINCT batch, date FROM read_parquet('{root}/batches/*/*/aggregates.parquet',"
        " hive_partitioning = true, hive_types = {'batch': VARCHAR, 'date': VARCHAR})"
    ).fetchall()
    assert sorted(rows) == sorted((b, DATE) for b in NUMERIC_IDS)
