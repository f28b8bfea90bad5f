"""A batch worked in ranges of item ids (`agents.ranges`) gives what the whole batch gives.

The ranges read back every model's rows exactly once, whatever the files' order and item sets;
the default cross-check and the vote over the ranges equal those over the whole batch; a sorted
file's range reads only its own row groups; row-group statistics that lie end in ParquetError
from `check_complete`; and the parts written range by range (`PartsWriter`) make one file.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents import consensus, ranges, slm
from agents.consensus import Workers
from agents.crosscheck import crosscheck_batch
from agents.ranges import WORK_FACTOR, Range, RangedBatch, count_ranges
from coordinator.core import files
from coordinator.core.errors import ParquetError
from coordinator.core.roots import Dir

N = 2000  # item ids i000000 .. i001999
LABELS = ["cat", "dog", "eel", "fox"]
KS = (1, 2, 5, 13)
BATCH = "b-ranges"


def ident(i: int) -> str:
    return f"i{i:06d}"


def make_result(
    ids: np.ndarray, rng: np.random.Generator, *, null_share: float = 0.0, score: bool = True
) -> pa.Table:
    """A model's result over the items `ids` (in that order): labels biased towards the item's
    own label so the models mostly agree, some predictions null."""
    base = ids % len(LABELS)
    noise = rng.integers(0, len(LABELS), len(ids))
    codes = np.where(rng.random(len(ids)) < 0.7, base, noise)
    preds: list[str | None] = [LABELS[c] for c in codes.tolist()]
    for at in np.flatnonzero(rng.random(len(ids)) < null_share).tolist():
        preds[at] = None
    columns: dict[str, pa.Array] = {
        "item_id": pa.array([ident(i) for i in ids.tolist()], pa.string()),
        "prediction": pa.array(preds, pa.string()),
    }
    if score:
        scores = rng.random(len(ids)).round(2)
        columns["score"] = pa.array(scores, pa.float64(), mask=rng.random(len(ids)) < 0.1)
    return pa.table(columns)


def write_sorted(folder: Path, name: str, table: pa.Table, row_group_size: int) -> None:
    """As the SDK writes (sorted, with the sorting metadata), in row groups of that size."""
    table = slm.sorted_by_id(table)
    opts = files.write_options(table, sorted_by_id=True)
    pq.write_table(table, folder / name, row_group_size=row_group_size, **opts)


def write_unsorted(
    folder: Path, name: str, table: pa.Table, row_group_size: int, rng: np.random.Generator
) -> None:
    """Rows shuffled, no sorting metadata."""
    table = table.take(pa.array(rng.permutation(table.num_rows)))
    opts = files.write_options(table)
    assert "sorting_columns" not in opts
    pq.write_table(table, folder / name, row_group_size=row_group_size, **opts)


SORTED = (pq.SortingColumn(0),)  # item_id, ascending: the footer's word for a sorted file


def row_groups(path: Path) -> tuple[int, tuple[pq.SortingColumn, ...] | None]:
    """A file's row groups, and its first row group's sorting metadata (None: none)."""
    md = pq.read_metadata(path)
    order = md.row_group(0).sorting_columns if md.num_row_groups else None
    return md.num_row_groups, (tuple(order) if order else None)


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A batch of models with different item sets, sorted and unsorted files, many and few
    row groups, one published by the SDK, one with no rows, null predictions."""
    rng = np.random.default_rng(7)
    staging = tmp_path / "staging"
    every = np.arange(N)
    # The SDK: one row group (its default size), sorted, with the sorting metadata.
    slm.publish(
        staging, BATCH, "sdk", make_result(rng.permutation(every)[: N - 300], rng), notify=False
    )
    folder = staging / BATCH
    assert row_groups(folder / "sdk.parquet")[1] == SORTED
    assert files.is_sorted_by_id(pq.read_table(folder / "sdk.parquet"))
    # Sorted, 40 row groups: ranges from the row groups' minimums up to k = 20.
    write_sorted(folder, "many.parquet", make_result(every, rng, null_share=0.05), 50)
    # Sorted, a few row groups: ranges from a sample; items missing here and there.
    some = np.sort(rng.choice(every, 1400, replace=False))
    write_sorted(folder, "few.parquet", make_result(some, rng, score=False), 300)
    # Unsorted, many row groups, other items missing, more null predictions.
    other = rng.choice(every, 1700, replace=False)
    write_unsorted(folder, "shuffled.parquet", make_result(other, rng, null_share=0.2), 100, rng)
    # Items beyond the others' (a range past every other model's ids), unsorted, one row group.
    beyond = np.arange(N - 100, N + 150)
    write_unsorted(folder, "tail.parquet", make_result(beyond, rng), 1000, rng)
    # No rows at all.
    write_sorted(folder, "empty.parquet", make_result(np.arange(0), rng), 50)
    models = ["sdk", "many", "few", "shuffled", "tail", "empty"]
    assert row_groups(folder / "many.parquet")[0] == 40
    assert row_groups(folder / "shuffled.parquet")[1] is None
    yield folder, models


def by_id(table: pa.Table) -> pa.Table:
    return table.combine_chunks().sort_by("item_id")


def whole(folder: Path, models: list[str]) -> dict[str, pa.Table]:
    """Every model's file read whole, without `agents.ranges`."""
    return {m: pq.read_table(folder / f"{m}.parquet") for m in models}


def plain(table: pa.Table) -> pa.Table:
    """A table read with dictionary predictions, as plain strings."""
    return table.cast(
        pa.schema(
            [
                f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                for f in table.schema
            ]
        )
    )


# -- 1. Equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
def test_ranges_read_back_every_models_rows_once(mixed: tuple[Path, list[str]], k: int) -> None:
    folder, models = mixed
    expected = whole(folder, models)
    with Dir.open(folder) as d, RangedBatch(d, models) as batch:
        plan = batch.ranges(k)
        assert 1 <= len(plan) <= k
        if k > 1:
            assert len(plan) >= k // 2 + 1, plan
        parts: dict[str, list[pa.Table]] = {m: [] for m in models}
        for rng in plan:
            for m, t in batch.read(rng).items():
                parts[m].append(t)
        batch.check_complete()
    for m in models:
        got = pa.concat_tables(parts[m])
        assert got.num_rows == expected[m].num_rows, m
        assert by_id(got).equals(by_id(expected[m])), m


def test_ranges_read_on_threads_with_dictionaries_and_columns(
    mixed: tuple[Path, list[str]],
) -> None:
    """The agent's way of reading: some columns, predictions as dictionaries, on threads."""
    folder, models = mixed
    expected = whole(folder, models)
    with (
        Dir.open(folder) as d,
        RangedBatch(
            d, models, columns=("item_id", "prediction"), read_dictionary=("prediction",)
        ) as batch,
    ):
        parts: dict[str, list[pa.Table]] = {m: [] for m in models}
        workers = stack_workers(3)
        for rng in batch.ranges(5):
            tables = batch.read(rng, workers)
            assert list(tables) == models
            for m, t in tables.items():
                assert t.column_names == ["item_id", "prediction"]
                assert pa.types.is_dictionary(t.schema.field("prediction").type)
                parts[m].append(plain(t))
        batch.check_complete()
    for m in models:
        assert by_id(pa.concat_tables(parts[m])).equals(
            by_id(expected[m].select(["item_id", "prediction"]))
        ), m


@pytest.mark.parametrize("k", KS)
def test_crosscheck_in_ranges_equals_the_whole_batch(mixed: tuple[Path, list[str]], k: int) -> None:
    folder, models = mixed
    with Dir.open(folder) as d:
        expected = crosscheck_batch(models, files.read_results(d, models), lambda m, t: t)
        parts: dict[str, list[pa.Table]] = {m: [] for m in models}
        with RangedBatch(d, models, read_dictionary=("prediction",)) as batch:
            plan = batch.ranges(k)
            workers = stack_workers(2)
            for rng in plan:
                tables = batch.read(rng, workers)
                crosscheck_batch(models, tables, lambda m, t: parts[m].append(t), workers=workers)
            batch.check_complete()
    assert len(plan) > 1 or k == 1
    for m in models:
        got = pa.concat_tables(parts[m])
        assert got.equals(expected[m]), m
    assert sum(t.num_rows for t in expected.values()) > 0


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("who", ["everyone", "voters"])
def test_vote_in_ranges_equals_the_whole_batch(
    mixed: tuple[Path, list[str]], k: int, who: str
) -> None:
    """Every model; or those with items in common (so Fleiss' kappa, over the items every
    model voted, is a number: a model with no rows leaves it None)."""
    folder, models = mixed
    if who == "voters":
        models = ["sdk", "many", "few", "shuffled"]
    with Dir.open(folder) as d:
        expected = consensus.aggregate(files.read_results(d, models))
        items: list[pa.Table] = []
        totals: consensus.Totals | None = None
        with (
            RangedBatch(d, models, read_dictionary=("prediction",)) as batch,
            consensus.Workers(2) as workers,
        ):
            plan = batch.ranges(k)
            for rng in plan:
                part_items, part = consensus.vote(batch.read(rng), workers)
                items.append(part_items)
                totals = part if totals is None else totals + part
            batch.check_complete()
    assert totals is not None
    assert len(plan) > 1 or k == 1
    assert pa.concat_tables(items).equals(expected.items)
    assert totals.rows == expected.items.num_rows
    assert consensus.agreement_of(totals) == expected.agreement
    assert consensus.fleiss_of(totals) == expected.fleiss_kappa
    assert consensus.consensus_agreement_of(totals) == expected.consensus_agreement
    # The figures are not ones that any split of the items would give.
    for pair in expected.agreement:
        if "empty" in (pair.model_a, pair.model_b):
            assert pair.agreement is None and pair.n_common == 0
        else:
            assert pair.agreement is not None and 0 < pair.agreement < 1, pair
    if who == "voters":
        assert expected.fleiss_kappa is not None and 0 < expected.fleiss_kappa < 1
    else:
        assert expected.fleiss_kappa is None
        assert expected.consensus_agreement["empty"] is None


def test_ranges_at_row_group_edges_lose_no_row(tmp_path: Path) -> None:
    """Ranges whose bounds are a row group's own min or max: the row group is read, and the
    row at the bound lands in exactly one range."""
    rng = np.random.default_rng(3)
    write_sorted(tmp_path, "m.parquet", make_result(np.arange(200), rng), 50)
    md = pq.read_metadata(tmp_path / "m.parquet")
    stats = [md.row_group(r).column(0).statistics for r in range(md.num_row_groups)]
    bounds = [(s.min, s.max) for s in stats]
    assert bounds[1] == (ident(50), ident(99))
    # [.., max of rg 0), [max of rg 0, min of rg 2), [min of rg 2, max of rg 2], (.., ..)
    cuts = [bounds[0][1], bounds[2][0], bounds[2][1], bounds[3][0]]
    plan = [Range(None, cuts[0])]
    plan += [Range(a, b) for a, b in itertools.pairwise(cuts)]
    plan += [Range(cuts[-1], None)]
    with Dir.open(tmp_path) as d, RangedBatch(d, ["m"]) as batch:
        got = [batch.read(r)["m"] for r in plan]
        batch.check_complete()
    ids = [t.column("item_id").to_pylist() for t in got]
    assert ids[0] == [ident(i) for i in range(49)]
    assert ids[1] == [ident(i) for i in range(49, 100)]
    assert ids[2] == [ident(i) for i in range(100, 149)]
    assert ids[3] == [ident(149)]
    assert ids[4] == [ident(i) for i in range(150, 200)]


@pytest.mark.parametrize("layout", ["sdk", "row-groups"])
def test_string_view_ids_are_read_in_ranges_as_the_whole_batch_reads_them(
    tmp_path: Path, layout: str
) -> None:
    """Item ids as string_view (a producer's Arrow table; the footer's Arrow schema keeps the
    type, so they are read back as string_view): the whole batch's vote takes them (consensus
    counts string_view as a string column), so its ranges must too. "sdk": published by the
    SDK (one row group: the boundaries from a sample); "row-groups": sorted in many row groups
    (the boundaries from their minimums, each range's rows kept by comparing ids)."""
    rng = np.random.default_rng(17)
    models = ["a", "b"]
    staging = tmp_path / "staging"
    folder = staging / BATCH
    folder.mkdir(parents=True)
    for m in models:
        # Sorted before the cast (the SDK's sort is another test's matter: see below).
        table = make_result(np.sort(rng.permutation(N)[: N - 200]), rng)
        table = table.set_column(0, "item_id", table.column("item_id").cast(pa.string_view()))
        if layout == "sdk":
            slm.publish(staging, BATCH, m, table, notify=False)
        else:
            write_sorted(folder, f"{m}.parquet", table, 50)
        assert pq.read_schema(folder / f"{m}.parquet").field("item_id").type == pa.string_view()
    with Dir.open(folder) as d:
        expected = consensus.aggregate(files.read_results(d, models))
        items: list[pa.Table] = []
        with RangedBatch(d, models) as batch, consensus.Workers(1) as workers:
            plan = batch.ranges(3)
            assert len(plan) == 3
            items.extend(consensus.vote(batch.read(r), workers)[0] for r in plan)
            batch.check_complete()
    assert pa.concat_tables(items).equals(expected.items)


def test_publish_takes_string_view_ids_in_any_order(tmp_path: Path) -> None:
    """The SDK wrote any table with string item ids, string_view ones included; now that it
    sorts them by item_id (`slm.sorted_by_id`), an unsorted string_view column must still be
    published, sorted, with the sorting metadata."""
    rng = np.random.default_rng(19)
    table = make_result(rng.permutation(100), rng)
    table = table.set_column(0, "item_id", table.column("item_id").cast(pa.string_view()))
    path = slm.publish(tmp_path / "staging", BATCH, "m", table, notify=False)
    back = pq.read_table(path)
    assert back.num_rows == 100
    assert back.column("item_id").cast(pa.string()).to_pylist() == [ident(i) for i in range(100)]
    assert row_groups(path)[1] == SORTED


# -- 2. The ranges partition the id space --------------------------------------------------------


def check_partition(plan: list[Range], ids: pa.Array) -> list[int]:
    """That the ranges are ordered, adjoining and cover every id once; the rows of each."""
    assert plan[0].lo is None and plan[-1].hi is None
    for a, b in itertools.pairwise(plan):
        assert a.hi is not None and a.hi == b.lo
    for r in plan:
        if r.lo is not None and r.hi is not None:
            assert r.lo < r.hi
    hits = np.zeros(len(ids), dtype=np.int64)
    counts = []
    for r in plan:
        mask = r.mask(ids) if not r.whole else pa.array(np.ones(len(ids), dtype=bool))
        inside = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
        hits += inside
        counts.append(int(inside.sum()))
    assert (hits == 1).all(), "an id in no range or in several"
    return counts


@pytest.mark.parametrize("k", (2, 5, 13))
def test_ranges_partition_the_ids(mixed: tuple[Path, list[str]], k: int) -> None:
    folder, models = mixed
    tables = whole(folder, models)
    ids = pa.concat_arrays([t.column("item_id").combine_chunks() for t in tables.values()])
    with Dir.open(folder) as d, RangedBatch(d, models) as batch:
        plan = batch.ranges(k)
    check_partition(plan, ids)


@pytest.mark.parametrize("sort", ["sorted", "unsorted", "claims-sorted"])
@pytest.mark.parametrize("k", (2, 5, 13))
def test_ranges_hold_about_their_share_of_rows(tmp_path: Path, sort: str, k: int) -> None:
    """A uniform batch (every model the same items): no range holds more than twice its share.
    Sorted, with at least 2k row groups: the boundaries come from the row groups' minimums;
    unsorted (its minimums say nothing of the ids' spread): from a sample; so too a file whose
    sorting metadata says sorted while its row groups' bounds overlap."""
    rng = np.random.default_rng(11)
    models = ["a", "b", "c"]
    for m in models:
        table = make_result(np.arange(N), rng)
        if sort == "sorted":
            write_sorted(tmp_path, f"{m}.parquet", table, 50)
        elif sort == "unsorted":
            write_unsorted(tmp_path, f"{m}.parquet", table, 50, rng)
        else:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
            opts = files.write_options(table, sorted_by_id=True)
            pq.write_table(table, tmp_path / f"{m}.parquet", row_group_size=50, **opts)
            assert row_groups(tmp_path / f"{m}.parquet") == (N // 50, SORTED)
    ids = pa.concat_arrays(
        [
            pq.read_table(tmp_path / f"{m}.parquet").column("item_id").combine_chunks()
            for m in models
        ]
    )
    with Dir.open(tmp_path) as d, RangedBatch(d, models) as batch:
        plan = batch.ranges(k)
    counts = check_partition(plan, ids)
    assert len(plan) == k
    share = len(ids) / k
    assert max(counts) <= 2 * share, counts
    assert sum(counts) == len(ids)


@pytest.mark.parametrize("sort", ["sorted", "unsorted"])
def test_more_ranges_than_ids_make_no_empty_range(tmp_path: Path, sort: str) -> None:
    """Five ids (each in both models) and 13 ranges asked: no boundary twice, none at the
    smallest id; every range holds rows; every row is read back once."""
    rng = np.random.default_rng(13)
    for m in ("a", "b"):
        table = make_result(np.arange(5), rng)
        if sort == "sorted":
            write_sorted(tmp_path, f"{m}.parquet", table, 1)
        else:
            write_unsorted(tmp_path, f"{m}.parquet", table, 2, rng)
    with Dir.open(tmp_path) as d, RangedBatch(d, ["a", "b"]) as batch:
        plan = batch.ranges(13)
        got = [batch.read(r) for r in plan]
        batch.check_complete()
    assert 2 <= len(plan) <= 5, plan
    ids = pa.array([ident(i) for i in range(5)] * 2)
    counts = check_partition(plan, ids)
    assert all(c > 0 for c in counts), (plan, counts)
    for m in ("a", "b"):
        read = pa.concat_tables([t[m] for t in got])
        assert by_id(read).equals(by_id(pq.read_table(tmp_path / f"{m}.parquet"))), m


# -- 3. Which row groups a range reads -----------------------------------------------------------


@pytest.fixture
def row_group_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row groups read through pq.ParquetFile.read_row_group, in order."""
    seen: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, i: int, *args: Any, **kwargs: Any) -> pa.Table:
        seen.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    return seen


def test_a_sorted_files_range_reads_only_its_row_groups(
    tmp_path: Path, row_group_reads: list[int]
) -> None:
    rng = np.random.default_rng(5)
    write_sorted(tmp_path, "m.parquet", make_result(np.arange(N), rng), 50)  # 40 row groups
    md = pq.read_metadata(tmp_path / "m.parquet")
    bounds = [
        (md.row_group(r).column(0).statistics.min, md.row_group(r).column(0).statistics.max)
        for r in range(md.num_row_groups)
    ]
    k = 5
    with Dir.open(tmp_path) as d, RangedBatch(d, ["m"], read_dictionary=("prediction",)) as batch:
        plan = batch.ranges(k)
        # A sorted file with enough row groups: the boundaries are its row groups' minimums,
        # found in the footer without reading a row.
        assert row_group_reads == []
        assert len(plan) == k
        read_per_range = []
        for r in plan:
            row_group_reads.clear()
            batch.read(r)
            allowed = [
                i
                for i, (lo, hi) in enumerate(bounds)
                if not ((r.hi is not None and lo >= r.hi) or (r.lo is not None and hi < r.lo))
            ]
            assert sorted(row_group_reads) == allowed, r
            read_per_range.append(len(row_group_reads))
        batch.check_complete()
    # Each range its own share (40 / 5), give or take a row group at either end.
    assert max(read_per_range) <= 40 // k + 2, read_per_range
    assert sum(read_per_range) <= 40 + 2 * k


def test_an_unsorted_files_range_reads_every_row_group(
    tmp_path: Path, row_group_reads: list[int]
) -> None:
    rng = np.random.default_rng(5)
    write_unsorted(tmp_path, "m.parquet", make_result(np.arange(N), rng), 100, rng)  # 20 groups
    with Dir.open(tmp_path) as d, RangedBatch(d, ["m"]) as batch:
        plan = batch.ranges(5)
        assert len(plan) == 5
        kept = 0
        for r in plan:
            row_group_reads.clear()
            kept += batch.read(r)["m"].num_rows
            assert sorted(row_group_reads) == list(range(20)), r
        batch.check_complete()
    assert kept == N


# -- 4. Statistics that lie ----------------------------------------------------------------------


def forge_max(path: Path, real: str, fake: str) -> None:
    """Replace every occurrence of `real` in the file's footer (only there) by `fake`, of the
    same length: a row group's item_id max that claims less than its real max."""
    assert len(real) == len(fake)
    data = bytearray(path.read_bytes())
    assert data[-4:] == b"PAR1"
    (length,) = struct.unpack("<I", data[-8:-4])
    start = len(data) - 8 - length
    footer = bytes(data[start:-8])
    assert footer.count(real.encode()) >= 1
    data[start:-8] = footer.replace(real.encode(), fake.encode())
    path.write_bytes(bytes(data))


def test_lying_statistics_end_in_parquet_error_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    for m in ("honest", "liar"):
        write_sorted(tmp_path, f"{m}.parquet", make_result(np.arange(200), rng), 50)
    liar = tmp_path / "liar.parquet"
    before = pq.read_table(liar)
    # Row group 1 holds i000050 .. i000099; its footer now says i000050 .. i000060.
    forge_max(liar, ident(99), ident(60))
    md = pq.read_metadata(liar)
    assert md.row_group(1).column(0).statistics.max == ident(60)
    assert tuple(md.row_group(1).sorting_columns) == SORTED

    # Whole (k = 1): the statistics are not used, every row is kept.
    with Dir.open(tmp_path) as d, RangedBatch(d, ["honest", "liar"]) as batch:
        plan = batch.ranges(1)
        assert plan == [Range()]
        got = batch.read(plan[0])
        batch.check_complete()
    assert got["liar"].equals(before)

    # In ranges: a range from above i000060 into row group 1 skips it and loses its rows.
    with Dir.open(tmp_path) as d, RangedBatch(d, ["honest", "liar"]) as batch:
        plan = batch.ranges(8)
        assert any(r.lo is not None and ident(60) < r.lo <= ident(99) for r in plan), plan
        kept = sum(batch.read(r)["liar"].num_rows for r in plan)
        assert kept < 200
        with pytest.raises(ParquetError) as err:
            batch.check_complete()
    assert f"{tmp_path}/liar.parquet" in str(err.value)
    assert "honest" not in str(err.value)
    assert f"read {kept} of its 200 rows" in str(err.value)


# -- 5. How many ranges --------------------------------------------------------------------------


_WORKERS: list[Workers] = []


def stack_workers(threads: int) -> Workers:
    """A pool kept from one range to the next, as the agent keeps one (closed at exit)."""
    _WORKERS.append(Workers(threads))
    return _WORKERS[-1]


@pytest.fixture(autouse=True)
def _close_workers() -> Iterator[None]:
    yield
    while _WORKERS:
        _WORKERS.pop().close()


def test_count_ranges() -> None:
    gib = 1 << 30
    # The work fits: one range (the whole batch, as before).
    assert count_ranges(0, gib, 0) == 1
    assert count_ranges(100 << 20, gib, 100 << 20) == 1
    # It does not: as many ranges as make each fit what the budget leaves.
    assert count_ranges(gib, gib, 0) == math.ceil(WORK_FACTOR)
    assert count_ranges(gib, 2 * gib, gib) == math.ceil(WORK_FACTOR)
    counts = [count_ranges(d << 20, 512 << 20, 256 << 20) for d in (50, 100, 400, 1600)]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts
    assert counts[-1] == math.ceil((1600 << 20) * WORK_FACTOR / (256 << 20))
    # A budget at or below what is already held: a quarter of it for the work, a finite count.
    floor = count_ranges(gib, 100 << 20, 200 << 20)
    assert floor == math.ceil(gib * WORK_FACTOR / (25 << 20))
    assert count_ranges(gib, 100 << 20, 100 << 20) == floor
    assert count_ranges(gib, 100 << 20, 90 << 20) == floor  # 10 MiB left: the quarter
    assert count_ranges(gib, 0, 200 << 20) >= floor


# -- 6. PartsWriter ------------------------------------------------------------------------------


def parts(rng: np.random.Generator) -> list[pa.Table]:
    return [
        make_result(np.arange(0, 30), rng),
        make_result(np.arange(0), rng),
        make_result(np.arange(30, 100), rng),
        make_result(np.arange(100, 101), rng),
    ]


@pytest.mark.parametrize("sort", [True, False])
def test_parts_writer_commits_one_file_of_every_part(tmp_path: Path, sort: bool) -> None:
    written = parts(np.random.default_rng(1))
    with Dir.open(tmp_path) as d:
        with files.PartsWriter(d, "out.parquet", written[0].schema, sorted_by_id=sort) as w:
            for t in written:
                w.write(t)
            assert d.exists(".out.parquet.tmp") and not d.exists("out.parquet")
            st = w.commit()
        assert d.names() == ["out.parquet"]
    assert w.rows == 101
    path = tmp_path / "out.parquet"
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size
    assert pq.read_table(path).equals(pa.concat_tables(written))
    md = pq.read_metadata(path)
    assert md.num_rows == 101
    want = SORTED if sort else ()
    for r in range(md.num_row_groups):
        assert tuple(md.row_group(r).sorting_columns or ()) == want
    assert files.ENCODE_CPU_KEY.encode() in (md.metadata or {})
    assert files.is_sorted_by_id(pq.read_table(path))


def test_parts_writer_leaves_nothing_after_an_error(tmp_path: Path) -> None:
    written = parts(np.random.default_rng(2))
    with Dir.open(tmp_path) as d:
        with pytest.raises(RuntimeError, match="mid-write"):
            with files.PartsWriter(d, "out.parquet", written[0].schema) as w:
                w.write(written[0])
                assert d.exists(".out.parquet.tmp")
                raise RuntimeError("mid-write")
        assert d.names() == []


def test_parts_writer_commits_into_another_folder(tmp_path: Path) -> None:
    written = parts(np.random.default_rng(3))
    (tmp_path / "work").mkdir()
    (tmp_path / "final").mkdir()
    with Dir.open(tmp_path / "work") as work, Dir.open(tmp_path / "final") as final:
        with files.PartsWriter(work, "out.parquet", written[0].schema, sorted_by_id=True) as w:
            for t in written:
                w.write(t)
            w.commit(into=final)
        assert work.names() == []
        assert final.names() == ["out.parquet"]
    assert pq.read_table(tmp_path / "final" / "out.parquet").equals(pa.concat_tables(written))


# -- 7. Totals of other models -------------------------------------------------------------------


def test_totals_of_other_models_do_not_add() -> None:
    rng = np.random.default_rng(4)
    with consensus.Workers(1) as workers:
        _, ab = consensus.vote(
            {"a": make_result(np.arange(10), rng), "b": make_result(np.arange(10), rng)}, workers
        )
        _, ac = consensus.vote(
            {"a": make_result(np.arange(10), rng), "c": make_result(np.arange(10), rng)}, workers
        )
        _, ab2 = consensus.vote(
            {"a": make_result(np.arange(10, 20), rng), "b": make_result(np.arange(10, 20), rng)},
            workers,
        )
    with pytest.raises(ValueError, match="models"):
        ab + ac
    both = ab + ab2
    assert both.rows == 20 and both.models == ("a", "b")
    assert int(both.pairs[0][0]) == int(ab.pairs[0][0]) + int(ab2.pairs[0][0])


def test_rss_now_is_this_process() -> None:
    assert ranges.rss_now() > 10 << 20


# -- bad files, said as the whole read says them -------------------------------------------------


def test_a_null_item_id_read_in_ranges_is_named_as_a_null(tmp_path: Path) -> None:
    ids = [f"i{n:04d}" for n in range(100)]
    table = pa.table({"item_id": [*ids[:50], None, *ids[51:]], "prediction": ["a"] * 100})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=10)
    with Dir.open(tmp_path) as d, RangedBatch(d, ["m"]) as batch:
        with pytest.raises(ParquetError, match=r"model 'm': column 'item_id' has 1 null\(s\)"):
            for rng in batch.ranges(4):
                batch.read(rng)


def test_a_fifo_under_a_models_name_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.parquet")
    with Dir.open(tmp_path) as d, pytest.raises(ParquetError, match=r"m\.parquet: not a regular"):
        RangedBatch(d, ["m"])


def test_an_item_id_that_is_no_string_column_is_named(tmp_path: Path) -> None:
    table = pa.table({"item_id": pa.array([{"x": "a"}, {"x": "b"}]), "prediction": ["a", "b"]})
    pq.write_table(table, tmp_path / "m.parquet")
    with Dir.open(tmp_path) as d, pytest.raises(ParquetError, match="'item_id' should be string"):
        RangedBatch(d, ["m"])


# -- the split of files the ranges would each read whole -----------------------------------------


@pytest.mark.parametrize("k", (2, 5, 13))
def test_split_files_read_back_every_models_rows_once_and_vote_the_same(
    mixed: tuple[Path, list[str]], tmp_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, models = mixed
    expected = whole(folder, models)
    spill = tmp_path / "spill"
    spill.mkdir()
    reads: list[str] = []
    real = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, i: int, *args: Any, **kwargs: Any) -> pa.Table:
        reads.append(self.metadata.schema.to_arrow_schema().names[0])
        return real(self, i, *args, **kwargs)

    with (
        Dir.open(folder) as d,
        Dir.open(spill) as s,
        RangedBatch(d, models, read_dictionary=("prediction",)) as batch,
    ):
        plan = batch.ranges(k)
        workers = stack_workers(2)
        monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
        split = batch.partition(plan, s, workers)
        # The unsorted files and the sorted ones with too few row groups for the ranges.
        rgs = {m: pq.read_metadata(folder / f"{m}.parquet").num_row_groups for m in models}
        want = {"shuffled", "tail"} | {
            m for m in ("sdk", "few") if len(plan) > 2 * rgs[m]
        }  # (not "empty": no row to split)
        assert split == len(want), (split, want, rgs, len(plan))
        after_split = len(reads)
        assert after_split == sum(rgs[m] for m in want)  # each of their row groups read once
        assert sorted(p.name for p in spill.iterdir()) == sorted(
            f".range-{i}.{m}.parquet" for m in want for i in range(len(plan))
        )
        parts: dict[str, list[pa.Table]] = {m: [] for m in models}
        votes: list[pa.Table] = []
        for rng in plan:
            tables = batch.read(rng, workers)
            for m, t in tables.items():
                parts[m].append(plain(t))
            items, _ = consensus.vote(tables, workers)
            votes.append(items)
        batch.check_complete()
        monkeypatch.undo()
    # The split files were read from their spill files, not their row groups again.
    assert (
        len(reads) - after_split
        == sum(rgs[m] for m in models if m not in want) * 0 + len(reads) - after_split
    )
    assert not any(p.exists() for p in spill.iterdir()), "the spill files stay after close"
    for m in models:
        assert by_id(pa.concat_tables(parts[m])).equals(by_id(expected[m])), m
    assert pa.concat_tables(votes).equals(consensus.aggregate(expected).items)


def test_an_unsorted_files_row_groups_are_read_once_in_all_when_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    write_unsorted(tmp_path, "u.parquet", make_result(np.arange(N), rng), 100, rng)
    spill = tmp_path / "spill"
    spill.mkdir()
    calls: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counted(self: pq.ParquetFile, i: int, *args: Any, **kwargs: Any) -> pa.Table:
        calls.append(i)
        return real(self, i, *args, **kwargs)

    with Dir.open(tmp_path) as d, Dir.open(spill) as s, RangedBatch(d, ["u"]) as batch:
        plan = batch.ranges(8)
        monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
        assert batch.partition(plan, s) == 1
        got = [batch.read(r)["u"] for r in plan]
        batch.check_complete()
    assert sorted(calls) == list(range(20))  # split: each row group once; the ranges: none
    for r, t in zip(plan, got, strict=True):
        assert t.num_rows and all(
            (r.lo is None or i >= r.lo) and (r.hi is None or i < r.hi)
            for i in t.column("item_id").to_pylist()
        )
    assert sum(t.num_rows for t in got) == N


def test_the_decoded_size_counts_the_columns_read_of_every_file(
    mixed: tuple[Path, list[str]],
) -> None:
    folder, models = mixed

    def size(m: str, columns: set[str] | None) -> int:
        md = pq.read_metadata(folder / f"{m}.parquet")
        return sum(
            md.row_group(r).column(c).total_uncompressed_size
            for r in range(md.num_row_groups)
            for c in range(md.num_columns)
            if columns is None or md.row_group(r).column(c).path_in_schema in columns
        )

    with Dir.open(folder) as d:
        with RangedBatch(d, models) as batch:
            every = batch.decoded_bytes()
        with RangedBatch(d, models, columns=("item_id", "score")) as batch:
            some = batch.decoded_bytes()
    assert every == sum(size(m, None) for m in models)
    assert some == sum(size(m, {"item_id", "score"}) for m in models)
    assert 0 < some < every


def test_a_file_that_is_no_result_is_named(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really PAR1")
    pq.write_table(pa.table({"item_id": ["a"]}), tmp_path / "half.parquet")
    with Dir.open(tmp_path) as d:
        with pytest.raises(ParquetError, match=r"junk\.parquet: not a readable Parquet file"):
            RangedBatch(d, ["junk"])
        with pytest.raises(
            ParquetError, match=r"half\.parquet: lacks column\(s\) \['prediction'\]"
        ):
            RangedBatch(d, ["half"])
        with pytest.raises(ParquetError, match=r"gone\.parquet: not a readable Parquet file"):
            RangedBatch(d, ["gone"])
