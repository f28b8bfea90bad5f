"""The aggregation step as an agent runs it: files in, node-local rows and a summary out; the
summary's wire form; which node aggregates; and the checks the coordinator makes of the reply."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from agents import aggregation, slm
from agents.aggregation import rows_csv, summarise
from agents.consensus import PairAgreement, aggregate
from agents.crosscheck import crosscheck
from coordinator.core.batch import aggregate_node
from coordinator.core.errors import NoSpaceError, ParquetError, ProtocolError
from coordinator.core.messages import Aggregated, from_dict
from coordinator.core.roots import Dir
from coordinator.core.rowsfile import RowsIdent
from coordinator.core.summary import COPY_COLUMNS, AggregateFiles, AggregateSummary
from tests.conftest import mounted_tmpfs
from tests.tables import result

TABLES = {
    "slm-1": result([("i1", "cat", 0.9), ("i,2", 'say "hi"', 0.5), ("i3", None, None)]),
    "slm-2": result([("i1", "cat", 0.8), ("i,2", "dog", 0.6), ("i3", None, None)]),
    "slm-3": result([("i1", "dog", 0.4), ("i,2", 'say "hi"', 0.3), ("i4", "x", 0.1)]),
}


def aggregate_batch(
    staging: Path, local: Path, batch_id: str, models: list[str], node: int
) -> AggregateFiles:
    """The agent's call: staging's folder b1 and the node-local folder, opened as folders."""
    local.mkdir(parents=True, exist_ok=True)
    with Dir.open(staging / "b1") as src, Dir.open(local) as dst:
        return aggregation.aggregate_batch(src, dst, local, batch_id, models, node)


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """A staging folder whose batch b1 holds the three models' cross-check results."""
    staging = tmp_path / "staging"
    (staging / "b1").mkdir(parents=True)
    for m in TABLES:
        slm.publish_crosscheck(staging, "b1", m, crosscheck(m, TABLES))
    return staging


def test_aggregate_batch_writes_the_rows_node_locally_and_returns_only_a_summary(
    staged: Path, tmp_path: Path
) -> None:
    local = tmp_path / "tmpfs" / "b1"
    out = aggregate_batch(staged, local, "b1", list(TABLES), node=1)
    expected = aggregate({m: crosscheck(m, TABLES) for m in TABLES})
    assert out.summary == summarise(expected)
    assert out.summary.rows == 4
    assert (out.node, out.rows_csv, out.parquet) == (
        1,
        local / "aggregates.csv",
        local / "aggregates.parquet",
    )
    assert out.rows_csv.read_bytes() == rows_csv(expected.items, "b1")
    # What the coordinator checks before its COPY: the file as written, and its bytes' hash.
    st = out.rows_csv.stat()
    assert out.rows_ident == RowsIdent(
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        hashlib.sha256(rows_csv(expected.items, "b1")).hexdigest(),
    )
    assert pq.read_table(out.parquet).equals(expected.items)
    assert pq.read_metadata(out.parquet).row_group(0).column(0).compression == "ZSTD"
    copies = [f"crosscheck_{m}.parquet" for m in TABLES]
    assert sorted(p.name for p in local.iterdir()) == sorted(
        ["aggregates.csv", "aggregates.parquet", *copies]
    )
    for name in copies:  # what the archive takes to the lake: the bytes the vote read
        assert (local / name).read_bytes() == (staged / "b1" / name).read_bytes()


def test_the_rows_csv_reads_back_as_the_aggregate_with_batch_id_first(staged: Path) -> None:
    """Quoting, nulls and the confidence of an item nobody voted on, as COPY will read them."""
    agg = aggregate(TABLES)
    back = pacsv.read_csv(
        io.BytesIO(rows_csv(agg.items, "b-1")),
        convert_options=pacsv.ConvertOptions(
            column_types={"item_id": pa.string(), "consensus": pa.string()},
            strings_can_be_null=True,
        ),
    )
    assert tuple(back.column_names) == COPY_COLUMNS
    assert set(back.column("batch_id").to_pylist()) == {"b-1"}
    rows = {r["item_id"]: r for r in back.to_pylist()}
    assert rows["i,2"]["consensus"] == 'say "hi"'
    assert rows["i3"]["consensus"] is None and rows["i3"]["confidence"] == 0.0
    assert rows["i1"]["votes"] == 2 and rows["i1"]["n_models"] == 3


def test_an_unaggregatable_result_is_a_parquet_error_naming_the_model_and_writes_nothing(
    staged: Path, tmp_path: Path
) -> None:
    dup = result([("i1", "cat", 0.9), ("i1", "dog", 0.5)])
    slm.publish_crosscheck(staged, "b1", "slm-2", dup)
    local = tmp_path / "tmpfs" / "b1"
    with pytest.raises(ParquetError, match=r"'slm-2'.*duplicates"):
        aggregate_batch(staged, local, "b1", list(TABLES), node=0)
    assert not local.exists() or list(local.iterdir()) == []


def test_a_missing_crosscheck_file_is_an_error_naming_it(staged: Path, tmp_path: Path) -> None:
    (staged / "b1" / "crosscheck_slm-3.parquet").unlink()
    with pytest.raises((OSError, ParquetError), match="crosscheck_slm-3"):
        aggregate_batch(staged, tmp_path / "tmpfs" / "b1", "b1", list(TABLES), node=0)


@pytest.mark.parametrize("bad", ["../b1", "b1/x", ".hidden"])
def test_a_bad_batch_id_is_refused_before_any_file_is_read(
    staged: Path, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ValueError, match="batch_id"):
        aggregate_batch(staged, tmp_path / "x", bad, list(TABLES), node=0)


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A real 64 KiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(64) as mnt:
        yield mnt


def test_a_full_node_tmpfs_is_no_space_and_leaves_no_temp_file(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    """NoSpaceError (which the coordinator waits out) rather than a plain failure."""
    staging = tmp_path / "staging"
    (staging / "b1").mkdir(parents=True)
    rows = [(f"item-{i:06d}", f"label-{i % 7}", 0.5) for i in range(20_000)]
    big = {"slm-1": result(rows), "slm-2": result(rows)}
    for m in big:
        slm.publish_crosscheck(staging, "b1", m, crosscheck(m, big))
    local = small_tmpfs / "b1"
    with pytest.raises(NoSpaceError, match="no space"):
        aggregate_batch(staging, local, "b1", list(big), node=0)
    assert [p.name for p in local.iterdir() if p.name.startswith(".")] == []


# -- the summary on the wire -------------------------------------------------------------------


def test_the_summary_survives_its_wire_form() -> None:
    s = summarise(aggregate(TABLES))
    assert AggregateSummary.from_wire(s.to_wire()) == s
    assert s.agreement and all(isinstance(p, PairAgreement) for p in s.agreement)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"rows": -1}, "rows"),
        ({"rows": "12"}, "rows"),
        ({"rows": True}, "rows"),
        ({"fleiss_kappa": "high"}, "fleiss_kappa"),
        ({"agreement": [["a", "b", 0.5]]}, "ValueError"),
        ({"consensus_agreement": {"slm-1": float("inf")}}, "consensus_agreement"),
        ({"models": None}, "TypeError"),
    ],
)
def test_a_malformed_summary_is_a_protocol_error_naming_the_field(
    patch: dict[str, object], field: str
) -> None:
    wire = {**summarise(aggregate(TABLES)).to_wire(), **patch}
    with pytest.raises(ProtocolError, match=field):
        AggregateSummary.from_wire(wire)


def test_a_summary_missing_a_field_is_a_protocol_error() -> None:
    wire = summarise(aggregate(TABLES)).to_wire()
    del wire["agreement"]
    with pytest.raises(ProtocolError, match="agreement"):
        AggregateSummary.from_wire(wire)


def reply(_: Path, **over: object) -> Aggregated:
    """An `aggregated` reply of node 1's agent, as the hub decodes it from the wire."""
    wire: dict[str, object] = {
        "type": "aggregated",
        "batch_id": "b1",
        "summary": summarise(aggregate(TABLES)).to_wire(),
        "rows_csv": "b1/aggregates.csv",
        "parquet": "b1/aggregates.parquet",
        "seconds": 1.5,
        "rows_ident": [41, 300, 1795878000223456789],
        "rows_sha256": "ab" * 32,
        "req": 3,
        "node": 1,
    }
    msg = from_dict({**wire, **over})
    assert isinstance(msg, Aggregated)
    return msg


def test_a_reply_naming_the_batch_own_files_is_taken(tmp_path: Path) -> None:
    local = tmp_path / "node1"
    files = AggregateFiles.from_reply(
        reply(local), 1, "b1", via="tmpfs", rows_root=local, local_root=local
    )
    assert (files.node, files.rows_csv, files.seconds) == (1, local / "b1/aggregates.csv", 1.5)
    assert files.parquet == local / "b1/aggregates.parquet"
    assert files.summary.rows == 4
    assert files.rows_ident == RowsIdent(41, 300, 1795878000223456789, "ab" * 32)


def test_an_agent_in_another_kernel_leaves_its_rows_in_staging(tmp_path: Path) -> None:
    local, staging = tmp_path / "node1", tmp_path / "staging"
    files = AggregateFiles.from_reply(
        reply(local, rows_csv="b1/.aggregates.csv"),
        1,
        "b1",
        via="staging",
        rows_root=staging,
        local_root=local,
    )
    assert (files.rows_csv, files.parquet) == (
        staging / "b1/.aggregates.csv",
        local / "b1/aggregates.parquet",
    )
    with pytest.raises(ProtocolError, match=re.escape("rows_csv is 'b1/aggregates.csv'")):
        AggregateFiles.from_reply(
            reply(local), 1, "b1", via="staging", rows_root=staging, local_root=local
        )


@pytest.mark.parametrize(
    "over",
    [
        {"rows_csv": "/etc/shadow"},
        {"parquet": "/var/lib/other/aggregates.parquet"},
        {"rows_csv": "/dev/shm/node1/b1/aggregates.csv"},  # absolute: never taken
        {"rows_csv": "b2/aggregates.csv"},  # another batch's
        {"rows_sha256": "AB" * 32},  # not as hashlib writes it
        {"rows_sha256": ""},
        {"rows_csv": "b1/../b2/aggregates.csv"},
        {"batch_id": "b2", "rows_csv": "b2/aggregates.csv", "parquet": "b2/aggregates.parquet"},
    ],
)
def test_a_reply_naming_any_other_file_is_refused(tmp_path: Path, over: dict[str, object]) -> None:
    """The coordinator streams what the reply names into PostgreSQL and the lake: only the
    batch's own files in that node's folder are ever read."""
    local = tmp_path / "node1"
    with pytest.raises(ProtocolError, match="agent on node 1"):
        AggregateFiles.from_reply(
            reply(local, **over), 1, "b1", via="tmpfs", rows_root=local, local_root=local
        )


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"rows_csv": None}, "rows_csv"),
        ({"seconds": "soon"}, "seconds"),
        ({"summary": []}, "summary"),
        ({"rows_ident": [1, 2]}, "rows_ident"),
        ({"rows_sha256": 7}, "rows_sha256"),
    ],
)
def test_a_mistyped_reply_is_refused_before_it_is_read(
    tmp_path: Path, over: dict[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError, match=f"aggregated: field '{field}'"):
        reply(tmp_path, **over)


def test_a_malformed_summary_in_a_reply_is_refused(tmp_path: Path) -> None:
    local = tmp_path / "node1"
    with pytest.raises(ProtocolError, match="aggregate summary"):
        AggregateFiles.from_reply(
            reply(local, summary={"rows": 1}),
            1,
            "b1",
            via="tmpfs",
            rows_root=local,
            local_root=local,
        )


# -- which node aggregates ---------------------------------------------------------------------


def test_the_aggregating_node_is_stable_per_batch_and_spread_over_the_nodes() -> None:
    nodes = (0, 1)
    ids = [f"batch-{i:04d}" for i in range(200)]
    first = [aggregate_node(b, nodes) for b in ids]
    assert first == [aggregate_node(b, nodes) for b in ids]
    share = first.count(0) / len(first)
    assert 0.3 < share < 0.7, share


def test_a_retry_moves_to_the_next_node_and_comes_round_again() -> None:
    nodes = (0, 1, 3)
    start = aggregate_node("b1", nodes)
    seq = [aggregate_node("b1", nodes, attempt) for attempt in range(4)]
    assert seq[0] == start
    assert sorted(seq[:3]) == [0, 1, 3]
    assert seq[3] == start
    assert aggregate_node("b1", (5,), 7) == 5


def test_no_nodes_is_an_error() -> None:
    with pytest.raises(ValueError, match="no nodes"):
        aggregate_node("b1", ())
