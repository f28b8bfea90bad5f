"""The default cross-check and the loader for pluggable cross-check functions."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.consensus import aggregate
from agents.crosscheck import CROSSCHECK_SCHEMA, DEFAULT_CROSSCHECK, crosscheck, load_crosscheck
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


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_crosscheck_matches_plain_reference(
    rows: dict[str, list[Row]], data: st.DataObject
) -> None:
    model = data.draw(st.sampled_from(sorted(rows)))
    preds = {m: {item: p for item, p, _ in r} for m, r in rows.items()}
    want = []
    for item in sorted(preds[model]):
        mine = preds[model][item]
        others = [m for m in sorted(preds) if m != model and preds[m].get(item) is not None]
        agree = [m for m in others if mine is not None and preds[m][item] == mine]
        want.append((item, mine, len(others), len(agree), agree))

    out = crosscheck(model, {m: result(r) for m, r in rows.items()}).to_pylist()
    got = [
        (r["item_id"], r["prediction"], r["n_others"], r["n_agree"], r["agree_models"]) for r in out
    ]
    assert got == want


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
