"""The per-batch accounting's pure parts: bytes by page status, a footer's compression, the peak
RSS line, how replies add up per node, the ledger's rows and what `show` prints."""

from __future__ import annotations

import errno
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.accounting import parse_hwm
from agents.placement import NOT_IN_MEMORY, PAGE, NodeBytes, bytes_by_status
from coordinator.core import files
from coordinator.core.messages import Aggregated, Crosschecked, Staged
from coordinator.core.usage import FIELDS, BatchCompression, NodeUsage
from coordinator.ctl.main import render_usage
from coordinator.daemon.ledger import MIGRATIONS, _usage_rows

# -- bytes by page status ------------------------------------------------------------------------


def test_every_page_counts_a_page_but_the_files_last_which_counts_what_is_left() -> None:
    size = 2 * PAGE + 100  # three pages, the last holding 100 bytes
    assert bytes_by_status([0, 1, 1], 0, size) == {0: PAGE, 1: PAGE + 100}
    assert bytes_by_status([1, 1, 0], 0, size) == {1: 2 * PAGE, 0: 100}
    assert sum(bytes_by_status([0, NOT_IN_MEMORY, 3], 0, size).values()) == size


def test_a_window_past_the_first_page_knows_where_the_file_ends() -> None:
    size = 5 * PAGE + 1
    # The window of pages 3..5: page 5 is the file's last (1 byte).
    assert bytes_by_status([0, 0, NOT_IN_MEMORY], 3, size) == {0: 2 * PAGE, NOT_IN_MEMORY: 1}
    # A window before the last page counts whole pages only.
    assert bytes_by_status([0, 0], 0, size) == {0: 2 * PAGE}


def test_a_file_of_whole_pages_and_an_empty_window() -> None:
    assert bytes_by_status([2, 2], 0, 2 * PAGE) == {2: 2 * PAGE}
    assert bytes_by_status([], 0, 0) == {}


def test_node_bytes_split_local_other_nodes_and_not_in_memory() -> None:
    b = NodeBytes(1, {1: 10, 0: 7, 3: 2, NOT_IN_MEMORY: 5, -errno.EFAULT: 1})
    assert (b.total, b.local, b.other_nodes, b.not_in_memory, b.not_local) == (25, 10, 9, 6, 15)
    assert b.nodes() == {"0": 7, "1": 10, "3": 2}


def test_node_bytes_add_up_and_refuse_another_nodes_view() -> None:
    total = NodeBytes(0, {0: 5}) + NodeBytes(0, {0: 1, 1: 4})
    assert total.by_status == {0: 6, 1: 4}
    with pytest.raises(ValueError, match="from node 1 to node 0's"):
        NodeBytes(0) + NodeBytes(1)


# -- a footer's compression ---------------------------------------------------------------------


def footer(table: pa.Table, **kw: object) -> pq.FileMetaData:
    buf = io.BytesIO()
    files.write_table(table, buf, **files.write_options(table), **kw)  # type: ignore[arg-type]
    buf.seek(0)
    return pq.read_metadata(buf)


def test_compression_sums_the_column_chunks_and_reads_the_writers_cpu() -> None:
    table = pa.table(
        {"item_id": [f"i{n:06d}" for n in range(20_000)], "prediction": ["a"] * 20_000}
    )
    md = footer(table, row_group_size=5_000)
    c = files.compression_of(md)
    assert md.num_row_groups == 4
    chunks = [md.row_group(r).column(i) for r in range(4) for i in range(2)]
    assert c.compressed == sum(x.total_compressed_size for x in chunks)
    assert c.decoded == sum(x.total_uncompressed_size for x in chunks)
    assert c.ratio is not None and c.ratio > 1
    assert c.encode_cpu_s is not None and 0 <= c.encode_cpu_s < 60


def test_a_file_without_the_entry_has_no_cpu_seconds() -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2]}), buf)
    buf.seek(0)
    assert files.compression_of(pq.read_metadata(buf)).encode_cpu_s is None


@pytest.mark.parametrize("bad", [b"soon", b"-1", b"nan", b"inf"])
def test_a_bad_cpu_entry_is_an_error_naming_the_file_and_the_key(bad: bytes) -> None:
    table = pa.table({"x": [1, 2]}).replace_schema_metadata({files.ENCODE_CPU_KEY: bad})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    with pytest.raises(
        ValueError, match=rf"^staging/b1/m\.parquet: metadata {files.ENCODE_CPU_KEY}"
    ):
        files.compression_of(pq.read_metadata(buf), "staging/b1/m.parquet")


def test_an_empty_file_has_no_ratio() -> None:
    assert files.Compression(0, 0, None).ratio is None


# -- the peak RSS line ----------------------------------------------------------------------------


def test_the_peak_is_read_from_the_vmhwm_line_in_kib() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t  100 kB\n"
    assert parse_hwm(status) == 12345 * 1024


@pytest.mark.parametrize("status", ["Name:\tx\nVmRSS:\t1 kB\n", "VmHWM:\t 3 MB\n"])
def test_a_status_without_a_vmhwm_in_kib_is_refused(status: str) -> None:
    with pytest.raises(ValueError, match="VmHWM"):
        parse_hwm(status)


# -- replies adding up per node ------------------------------------------------------------------


def staged(**kw: object) -> Staged:
    base: dict[str, object] = {
        "batch_id": "b1",
        "bytes": 100,
        "seconds": 0.1,
        "files": {},
        "tmpfs_free": 1,
        "node": 0,
    }
    return Staged(**{**base, **kw})  # type: ignore[arg-type]


def crosschecked(**kw: object) -> Crosschecked:
    return Crosschecked(batch_id="b1", outputs={}, seconds=0.1, node=0, **kw)  # type: ignore[arg-type]


def aggregated(**kw: object) -> Aggregated:
    base: dict[str, object] = {
        "batch_id": "b1",
        "summary": {},
        "rows_csv": "b1/aggregates.csv",
        "parquet": "b1/aggregates.parquet",
        "seconds": 0.1,
        "rows_ident": (1, 2, 3),
        "rows_sha256": "0" * 64,
        "node": 0,
    }
    return Aggregated(**{**base, **kw})  # type: ignore[arg-type]


def test_every_attempt_adds_its_bytes_and_the_peak_is_the_highest() -> None:
    u = NodeUsage()
    u.add(staged(bytes=100, copied_remote=60, copied_absent=40, peak_rss=500))
    u.add(staged(bytes=0, copied_remote=0, copied_absent=0, peak_rss=300))  # a retry: reused
    u.add(crosschecked(read_bytes=100, read_remote=0, decode_cpu_s=0.25, peak_rss=900, ranges=3))
    u.add(crosschecked(read_bytes=100, read_remote=0, decode_cpu_s=0.5))  # its peak unknown
    u.add(
        aggregated(
            copied_bytes=30,
            copied_remote=10,
            copied_absent=0,
            read_bytes=30,
            read_remote=2,
            peak_rss=700,
            ranges=2,
        )
    )
    assert u.as_row() == {
        "stage_copied_bytes": 100,
        "stage_remote_bytes": 60,
        "stage_absent_bytes": 40,
        "crosscheck_read_bytes": 200,
        "crosscheck_remote_bytes": 0,
        "aggregate_copied_bytes": 30,
        "aggregate_copied_remote_bytes": 10,
        "aggregate_copied_absent_bytes": 0,
        "aggregate_read_bytes": 30,
        "aggregate_remote_bytes": 2,
        "decode_cpu_s": 0.75,
        "peak_rss_bytes": 900,
        "work_ranges": 3,
    }
    assert u.remote_bytes == 60 + 10 + 2
    assert NodeUsage.from_row({**u.as_row(), "node": 0}) == u


def test_what_no_reply_told_stays_unknown_not_zero() -> None:
    u = NodeUsage()
    u.add(staged(bytes=100))  # an agent whose look failed: copied, but from where unknown
    assert u.stage_copied_bytes == 100
    assert u.stage_remote_bytes is None and u.crosscheck_read_bytes is None
    assert u.peak_rss_bytes is None


def test_the_batchs_compression_comes_from_a_staged_reply_that_has_it() -> None:
    assert BatchCompression.from_reply(staged()) is None
    c = BatchCompression.from_reply(staged(compressed_bytes=10, decoded_bytes=35))
    assert c == BatchCompression(10, 35, None)
    assert c.ratio == 3.5
    assert BatchCompression(0, 0, None).ratio is None


# -- the ledger's rows ----------------------------------------------------------------------------


def test_the_migrations_make_a_column_for_every_field() -> None:
    sql = MIGRATIONS[4] + MIGRATIONS[5]
    assert "node_usage" in MIGRATIONS[4]
    for f in FIELDS:
        assert f" {f} " in sql, f


def test_usage_rows_are_in_column_order_and_unknown_columns_are_refused() -> None:
    rows = _usage_rows("b1", {"1": {"stage_remote_bytes": 5}, 0: {}})
    assert rows[0] == ("b1", 1, *(5 if f == "stage_remote_bytes" else None for f in FIELDS))
    assert rows[1] == ("b1", 0, *([None] * len(FIELDS)))
    with pytest.raises(ValueError, match=r"node_usage of node 2: unknown column\(s\) \['x'\]"):
        _usage_rows("b1", {2: {"x": 1}})


# -- what show prints -----------------------------------------------------------------------------


def test_show_prints_the_ratio_and_each_nodes_bytes_cpu_and_peak() -> None:
    row = {
        "compressed_bytes": 1000,
        "decoded_bytes": 3500,
        "encode_cpu_s": 0.125,
        "node_usage": {
            "1": {**dict.fromkeys(FIELDS), "stage_copied_bytes": 4096, "stage_remote_bytes": 4096},
            "0": {
                **dict.fromkeys(FIELDS, 0),
                "stage_copied_bytes": 4096,
                "crosscheck_read_bytes": 4096,
                "decode_cpu_s": 0.5,
                "peak_rss_bytes": 7000,
            },
        },
    }
    lines = render_usage(row)
    assert lines[0] == (
        "compression:     3.50x (1000 B stored, 3.4 KiB decoded; SDK encode 0.125 s CPU)"
    )
    node0 = next(line for line in lines if line.strip().startswith("node0"))
    node1 = next(line for line in lines if line.strip().startswith("node1"))
    assert lines.index(node0) < lines.index(node1)
    assert "0 B / 4.0 KiB + 0 B" in node0  # the stage: nothing from another node
    assert "0.500 s" in node0 and "6.8 KiB (7.0x stored, 2.0x decoded)" in node0
    assert "4.0 KiB / 4.0 KiB + ?" in node1  # all from another node; whether in memory unknown
    assert node1.split()[-1] == "-"  # no peak reported


def test_show_says_when_the_sdk_recorded_no_cpu_and_prints_nothing_without_figures() -> None:
    lines = render_usage({"compressed_bytes": 10, "decoded_bytes": 20, "encode_cpu_s": None})
    assert lines == ["compression:     2.00x (10 B stored, 20 B decoded; SDK encode not recorded)"]
    assert render_usage({}) == []
