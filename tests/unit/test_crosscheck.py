"""The default cross-check and the loader for pluggable cross-check functions."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import consensus
from agents import crosscheck as crosscheck_mod
from agents.consensus import aggregate
from agents.crosscheck import (
    CROSSCHECK_SCHEMA,
    DEFAULT_CROSSCHECK,
    crosscheck,
    crosscheck_batch,
    load_crosscheck,
)
from coordinator.core.errors import ConfigError, ParquetError
from tests.tables import Row, result

TABLES = {
    "m2": result([("i3", "x", 0.9), ("i1", "cat", 0.5), ("i2", None, None), ("i4", "y", None)]),
    "m1": result([("i1", "cat", None), ("i2", "dog", None), ("i3", "x", None)], with_score=False),
    "m3": result([("i1", "cat", 0.1), ("i2", "dog", 0.2), ("i3", "z", 0.3), ("i9", "x", 0.4)]),
    "m4": result([("i1", "dog", None), ("i3", None, None)]),
}


def test_crosscheck_counts_other_models_and_names_those_that_agree() -> None:
    out = crosscheck("m2", TABLES)
    assert out.schema == CROSSCHECK_SCHEMA
    assert out.to_pylist() == [
        {
            "item_id": "i1",
            "prediction": "cat",
            "score": 0.5,
            "n_others": 3,
            "n_agree": 2,
            "agree_models": ["m1", "m3"],
        },
        # Its own prediction is null: others predicted, nobody agrees.
        {
            "item_id": "i2",
            "prediction": None,
            "score": None,
            "n_others": 2,
            "n_agree": 0,
            "agree_models": [],
        },
        # m4's null prediction does not count as predicting i3.
        {
            "item_id": "i3",
            "prediction": "x",
            "score": 0.9,
            "n_others": 2,
            "n_agree": 1,
            "agree_models": ["m1"],
        },
        {
            "item_id": "i4",
            "prediction": "y",
            "score": None,
            "n_others": 0,
            "n_agree": 0,
            "agree_models": [],
        },
    ]


def test_crosscheck_without_score_column_gives_null_scores() -> None:
    out = crosscheck("m1", TABLES)
    assert out.column("item_id").to_pylist() == ["i1", "i2", "i3"]
    assert out.column("score").to_pylist() == [None, None, None]
    assert out.column("agree_models").to_pylist() == [["m2", "m3"], ["m3"], ["m2"]]


def test_crosscheck_of_a_lone_model_has_no_others() -> None:
    out = crosscheck("m1", {"m1": TABLES["m1"]})
    assert out.column("n_others").to_pylist() == [0, 0, 0]
    assert out.column("agree_models").to_pylist() == [[], [], []]


def test_crosscheck_of_unknown_model_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'slm-9'"):
        crosscheck("slm-9", TABLES)


def test_crosscheck_rejects_a_result_without_prediction_naming_the_model() -> None:
    bad = {**TABLES, "m5": pa.table({"item_id": ["i1"]})}
    with pytest.raises(ParquetError, match=r"'m5'.*'prediction'"):
        crosscheck("m1", bad)


def test_aggregate_reads_crosscheck_outputs_like_model_results() -> None:
    direct = aggregate(TABLES)
    via_crosscheck = aggregate({m: crosscheck(m, TABLES) for m in TABLES})
    assert via_crosscheck == direct


@st.composite
def batches(draw: st.DrawFn) -> dict[str, list[Row]]:
    names = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True))
    return {
        name: [
            (item, draw(st.sampled_from(["x", "y", None])), None)
            for item in draw(st.lists(st.sampled_from([f"i{k}" for k in range(6)]), unique=True))
        ]
        for name in names
    }


def plain_crosscheck(rows: dict[str, list[Row]], model: str) -> list[tuple[object, ...]]:
    """The cross-check of `model` in plain Python: (item, prediction, n_others, n_agree, agree)."""
    preds = {m: {item: p for item, p, _ in r} for m, r in rows.items()}
    want = []
    for item in sorted(preds[model]):
        mine = preds[model][item]
        others = [m for m in sorted(preds) if m != model and preds[m].get(item) is not None]
        agree = [m for m in others if mine is not None and preds[m][item] == mine]
        want.append((item, mine, len(others), len(agree), agree))
    return want


def columns_of(table: pa.Table) -> list[tuple[object, ...]]:
    return [
        (r["item_id"], r["prediction"], r["n_others"], r["n_agree"], r["agree_models"])
        for r in table.to_pylist()
    ]


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_crosscheck_matches_plain_reference(
    rows: dict[str, list[Row]], data: st.DataObject
) -> None:
    model = data.draw(st.sampled_from(sorted(rows)))
    out = crosscheck(model, {m: result(r) for m, r in rows.items()})
    assert columns_of(out) == plain_crosscheck(rows, model)


# --- load_crosscheck -----------------------------------------------------------------------


def test_load_crosscheck_resolves_the_default_path() -> None:
    assert load_crosscheck(DEFAULT_CROSSCHECK) is crosscheck


def test_load_crosscheck_resolves_dotted_attributes() -> None:
    assert load_crosscheck("os:path.join") is __import__("os").path.join


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("agents.crosscheck", "module:function"),
        ("agents.crosscheck:", "module:function"),
        (":crosscheck", "module:function"),
        ("agents.no_such_module:crosscheck", "cannot import"),
        ("agents.crosscheck:no_such_function", "has no"),
        ("agents.crosscheck:CROSSCHECK_SCHEMA.names", "not callable"),
        ("agents.crosscheck:DEFAULT_CROSSCHECK", "not callable"),
    ],
)
def test_load_crosscheck_bad_path_is_a_config_error_naming_the_path(path: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        load_crosscheck(path)
    assert repr(path) in str(info.value)


@pytest.mark.parametrize("offender", ["m1", "m3"])
def test_crosscheck_rejects_duplicate_item_ids_naming_the_model(offender: str) -> None:
    doubled = pa.concat_tables([TABLES[offender], TABLES[offender].slice(0, 1)])
    with pytest.raises(ParquetError, match=rf"'{offender}'.*duplicate.*'i1'"):
        crosscheck("m1", {**TABLES, offender: doubled})


# --- crosscheck_batch: one vote matrix for every model of the batch -------------------------


def as_dictionaries(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """The tables as a Parquet reader with read_dictionary=["prediction"] returns them: the
    prediction a dictionary array, in several chunks."""
    out = {}
    for m, t in tables.items():
        pred = t.column("prediction").combine_chunks().dictionary_encode()
        half = len(pred) // 2
        out[m] = t.set_column(
            t.column_names.index("prediction"),
            "prediction",
            pa.chunked_array([pred[:half], pred[half:]], pred.type),
        )
    return out


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dictionaries", [False, True])
def test_crosscheck_batch_gives_every_model_what_crosscheck_gives_it(
    threads: int, dictionaries: bool
) -> None:
    tables = as_dictionaries(TABLES) if dictionaries else TABLES
    emitted: list[str] = []

    def emit(model: str, table: pa.Table) -> pa.Table:
        emitted.append(model)
        return table

    got = crosscheck_batch(["m2", "m4", "m1"], tables, emit, threads=threads)
    assert list(got) == ["m2", "m4", "m1"]
    assert sorted(emitted) == ["m1", "m2", "m4"]
    for m in ("m1", "m2", "m4"):
        assert got[m].schema == CROSSCHECK_SCHEMA
        assert got[m].equals(crosscheck(m, TABLES)), m


def test_crosscheck_batch_returns_what_emit_returns_and_nothing_for_no_models() -> None:
    assert crosscheck_batch(["m3"], TABLES, lambda m, t: (m, t.num_rows)) == {"m3": ("m3", 4)}
    assert crosscheck_batch([], TABLES, lambda m, t: t) == {}


def test_crosscheck_batch_of_an_unknown_model_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'slm-9'"):
        crosscheck_batch(["m1", "slm-9"], TABLES, lambda m, t: t)


def test_crosscheck_batch_rejects_a_duplicate_in_any_model_naming_it() -> None:
    """The batch's matrix covers every model's items: a duplicate among m3's items that m1
    does not have (i9) is found too, where cross-checking m1 alone leaves it unchecked."""
    doubled = pa.concat_tables([TABLES["m3"], TABLES["m3"].slice(3, 1)])
    with pytest.raises(ParquetError, match=r"'m3'.*duplicate.*'i9'"):
        crosscheck_batch(["m1"], {**TABLES, "m3": doubled}, lambda m, t: t)
    assert crosscheck("m1", {**TABLES, "m3": doubled}).num_rows == 3


def test_crosscheck_batch_stops_on_an_emit_that_fails() -> None:
    def emit(model: str, table: pa.Table) -> None:
        if model == "m2":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        crosscheck_batch(["m1", "m2", "m3"], TABLES, emit, threads=2)


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(1, 3), st.integers(1, 4))
def test_crosscheck_batch_matches_plain_reference_in_row_slices_and_threads(
    rows: dict[str, list[Row]], threads: int, slice_rows: int
) -> None:
    """Slices of a few rows (instead of 2^17), so every boundary case is met on small tables."""
    tables = {m: result(r) for m, r in rows.items()}
    saved = consensus.SLICE_ROWS
    consensus.SLICE_ROWS = slice_rows
    try:
        got = crosscheck_batch(
            sorted(tables), as_dictionaries(tables), lambda m, t: t, threads=threads
        )
    finally:
        consensus.SLICE_ROWS = saved
    for m in tables:
        assert columns_of(got[m]) == plain_crosscheck(rows, m), m
        assert got[m].equals(crosscheck(m, tables)), m


@pytest.mark.parametrize("extra", [-4, 3])
def test_crosscheck_batch_of_many_models_matches_plain_reference(extra: int) -> None:
    """Up to MASK_BITS other models, a row's agreeing models are a bit mask (past 8: two
    bytes); beyond, they are listed from the flags instead."""
    n = crosscheck_mod.MASK_BITS + extra
    rows = {
        f"m{k:02d}": [
            (f"i{i}", "xyz"[(i * k) % 3] if (i + k) % 5 else None, None) for i in range(9)
        ]
        for k in range(n)
    }
    tables = {m: result(r) for m, r in rows.items()}
    got = crosscheck_batch(sorted(rows), tables, lambda m, t: t, threads=2)
    for m in rows:
        assert columns_of(got[m]) == plain_crosscheck(rows, m), m
    assert max(max(r["n_agree"] for r in got[m].to_pylist()) for m in rows) > 8
