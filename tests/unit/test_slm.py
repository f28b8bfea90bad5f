"""The SLM publishing SDK: atomic publish, name and column checks, Parquet checks, read-back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents import slm
from coordinator.core import files
from coordinator.core.errors import ParquetError


def result(n: int = 5, *, label: str = "cat") -> pa.Table:
    return pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "prediction": [label] * n,
            "score": [0.5 + k / 100 for k in range(n)],
            "extra": list(range(n)),
        }
    )


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- publish -------------------------------------------------------------------------------


def test_publish_writes_the_final_file_with_zstd_and_leaves_no_temp(tmp_path: Path) -> None:
    table = result()
    path = slm.publish(tmp_path, "b1", "slm-1", table)
    assert path == tmp_path / "b1" / "slm-1.parquet"
    assert listing(tmp_path / "b1") == ["slm-1.parquet"]
    assert pq.read_table(path).equals(table)  # extra columns are carried through
    meta = pq.read_metadata(path)
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_publish_shows_only_a_temp_name_until_the_file_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While writing, only the dot-temp exists; at the rename the temp is a complete file."""
    folder = tmp_path / "b1"
    seen_during_write: list[list[str]] = []
    seen_at_rename: list[tuple[str, str, int, bool]] = []
    real_write, real_rename = files.write_table, os.rename

    def watching_write(table: pa.Table, where: Any, **kw: Any) -> None:
        seen_during_write.append(listing(folder))
        real_write(table, where, **kw)
        seen_during_write.append(listing(folder))

    def watching_rename(src: Any, dst: Any, **kw: Any) -> None:
        # Renamed within the batch folder's descriptor (never by a path resolved again).
        assert kw["src_dir_fd"] == kw["dst_dir_fd"]
        here = Path(f"/proc/self/fd/{kw['src_dir_fd']}")
        assert here.resolve() == folder
        rows = slm.check_parquet(here / src).num_rows  # complete and readable before it is named
        seen_at_rename.append((src, dst, rows, (here / dst).exists()))
        real_rename(src, dst, **kw)

    monkeypatch.setattr(files, "write_table", watching_write)
    monkeypatch.setattr(os, "rename", watching_rename)
    slm.publish(tmp_path, "b1", "slm-1", result(7))
    assert seen_during_write == [[".slm-1.parquet.tmp"], [".slm-1.parquet.tmp"]]
    assert seen_at_rename == [(".slm-1.parquet.tmp", "slm-1.parquet", 7, False)]


def test_a_failing_write_leaves_neither_temp_nor_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(table: pa.Table, where: Any, **kw: Any) -> None:
        where.write(b"PAR1 and then the disk went away")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "write_table", half_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        slm.publish(tmp_path, "b1", "slm-1", result())
    assert listing(tmp_path / "b1") == []


def test_a_failing_republish_keeps_the_earlier_complete_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = slm.publish(tmp_path, "b1", "slm-1", result(3))

    def fail(table: pa.Table, where: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "write_table", fail)
    with pytest.raises(KeyboardInterrupt):
        slm.publish(tmp_path, "b1", "slm-1", result(9))
    assert listing(tmp_path / "b1") == ["slm-1.parquet"]
    assert pq.read_table(first).num_rows == 3


def test_publish_crosscheck_uses_the_crosscheck_prefix(tmp_path: Path) -> None:
    (tmp_path / "b1").mkdir()
    path = slm.publish_crosscheck(tmp_path, "b1", "slm-2", result())
    assert path.name == "crosscheck_slm-2.parquet"
    assert listing(tmp_path / "b1") == ["crosscheck_slm-2.parquet"]


@pytest.mark.parametrize(
    ("batch_id", "model"),
    [
        ("../escape", "slm-1"),
        ("b/1", "slm-1"),
        (".hidden", "slm-1"),
        ("", "slm-1"),
        ("b1", "slm 1"),
        ("b1", "../slm-1"),
        ("b1", "-slm"),
        ("b1", "m" * 129),
    ],
)
def test_publish_refuses_bad_names_and_writes_nothing(
    tmp_path: Path, batch_id: str, model: str
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ValueError, match="does not match"):
        slm.publish(staging, batch_id, model, result())
    with pytest.raises(ValueError, match="does not match"):
        slm.publish_crosscheck(staging, batch_id, model, result())
    assert list(tmp_path.rglob("*.parquet*")) == []
    assert listing(staging) == []


@pytest.mark.parametrize("drop", ["item_id", "prediction"])
def test_publish_requires_the_result_columns(tmp_path: Path, drop: str) -> None:
    with pytest.raises(ValueError, match=drop):
        slm.publish(tmp_path, "b1", "slm-1", result().drop_columns([drop]))
    assert not (tmp_path / "b1" / "slm-1.parquet").exists()


def test_score_is_optional(tmp_path: Path) -> None:
    path = slm.publish(tmp_path, "b1", "slm-1", result().drop_columns(["score"]))
    assert slm.read_result(path).column_names == ["item_id", "prediction", "extra"]


# --- check_parquet -------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return slm.publish(tmp_path, "b1", "slm-1", result(50))


def test_check_parquet_accepts_a_good_file(good: Path) -> None:
    assert slm.check_parquet(good).num_rows == 50


def test_check_parquet_rejects_a_truncated_file(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20):
        bad = tmp_path / f"cut{cut}.parquet"
        bad.write_bytes(data[:cut])
        with pytest.raises(ParquetError, match="footer"):
            slm.check_parquet(bad)


def test_check_parquet_rejects_bad_magic_at_the_head(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR0" + good.read_bytes()[4:])
    with pytest.raises(ParquetError, match="head"):
        slm.check_parquet(bad)


@pytest.mark.parametrize("content", [b"", b"PAR1", b"PAR1PAR1", b"PAR1\0\0\0PAR1"])
def test_check_parquet_rejects_a_too_short_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "short.parquet"
    bad.write_bytes(content)
    with pytest.raises(ParquetError, match="too short"):
        slm.check_parquet(bad)


def test_check_parquet_rejects_magic_around_a_corrupt_footer(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1" + b"\x07" * 64 + (40).to_bytes(4, "little") + b"PAR1")
    with pytest.raises(ParquetError, match="not a readable Parquet file"):
        slm.check_parquet(bad)


def test_check_parquet_on_a_missing_file_is_a_parquet_error(tmp_path: Path) -> None:
    with pytest.raises(ParquetError):
        slm.check_parquet(tmp_path / "absent.parquet")


# --- reading back --------------------------------------------------------------------------


def test_read_results_reads_each_model_with_an_optional_prefix(tmp_path: Path) -> None:
    for m, label in (("slm-1", "cat"), ("slm-2", "dog")):
        slm.publish(tmp_path, "b1", m, result(4, label=label))
        slm.publish_crosscheck(tmp_path, "b1", m, result(2, label=label.upper()))
    folder = tmp_path / "b1"
    plain = slm.read_results(folder, ["slm-1", "slm-2"])
    cross = slm.read_results(folder, ["slm-2", "slm-1"], prefix="crosscheck_")
    assert {m: t.num_rows for m, t in plain.items()} == {"slm-1": 4, "slm-2": 4}
    assert plain["slm-2"].column("prediction").to_pylist() == ["dog"] * 4
    assert set(cross) == {"slm-1", "slm-2"}
    assert cross["slm-1"].column("prediction").to_pylist() == ["CAT"] * 2


def test_read_result_rejects_a_file_without_the_result_columns(tmp_path: Path) -> None:
    path = tmp_path / "slm-1.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "label": ["x"]}), path)
    with pytest.raises(ParquetError, match="prediction"):
        slm.read_result(path)


def test_read_results_on_a_missing_model_is_a_parquet_error(tmp_path: Path) -> None:
    slm.publish(tmp_path, "b1", "slm-1", result())
    with pytest.raises(ParquetError, match="slm-2"):
        slm.read_results(tmp_path / "b1", ["slm-1", "slm-2"])
