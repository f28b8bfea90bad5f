"""The default aggregation: majority vote, pairwise agreement, Fleiss' kappa."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import consensus
from agents.consensus import (
    ITEMS_SCHEMA,
    PairAgreement,
    aggregate,
    agreement_matrix,
    fleiss_kappa,
    majority_vote,
)
from coordinator.core.errors import ParquetError
from tests.tables import Row, result


def votes(labels: Mapping[str, str | None], scores: Mapping[str, float | None] | None = None):
    """Tables voting on one item "i": model name -> its label (and optional score)."""
    return {
        m: result([("i", label, (scores or {}).get(m))], with_score=scores is not None)
        for m, label in labels.items()
    }


def only_row(table: pa.Table) -> dict[str, object]:
    assert table.num_rows == 1
    return table.to_pylist()[0]


# --- majority vote -------------------------------------------------------------------------


def test_clear_majority_wins_with_its_share_as_confidence() -> None:
    tables = votes({"a": "cat", "b": "cat", "c": "dog", "d": "cat"})
    assert only_row(majority_vote(tables)) == {
        "item_id": "i",
        "consensus": "cat",
        "votes": 3,
        "n_models": 4,
        "confidence": 0.75,
    }


def test_two_two_one_tie_goes_to_label_with_higher_mean_score() -> None:
    # "ant" has mean 0.6, "bee" has mean 0.7; "cow" alone cannot win.
    tables = votes(
        {"a": "ant", "b": "ant", "c": "bee", "d": "bee", "e": "cow"},
        {"a": 0.9, "b": 0.3, "c": 0.7, "d": 0.7, "e": 1.0},
    )
    row = only_row(majority_vote(tables))
    assert (row["consensus"], row["votes"], row["n_models"]) == ("bee", 2, 5)
    assert row["confidence"] == pytest.approx(0.4)


def test_tie_with_equal_mean_scores_goes_to_smaller_label() -> None:
    tables = votes({"a": "zebra", "b": "apple"}, {"a": 0.5, "b": 0.5})
    assert only_row(majority_vote(tables))["consensus"] == "apple"


def test_tie_without_scores_goes_to_smaller_label() -> None:
    tables = votes({"a": "zebra", "b": "apple"})
    assert only_row(majority_vote(tables))["consensus"] == "apple"


def test_tied_label_without_any_score_ranks_below_label_with_a_score() -> None:
    # "apple" would win on the smaller value, but none of its voters gave a score.
    tables = votes(
        {"a": "apple", "b": "zebra", "c": "zebra", "d": "apple"},
        {"a": None, "b": 0.01, "c": None, "d": None},
    )
    assert only_row(majority_vote(tables))["consensus"] == "zebra"


def test_null_scores_are_left_out_of_the_mean() -> None:
    # "x": mean of (0.8) = 0.8, not (0.8 + 0) / 2; "y": 0.6.
    tables = votes(
        {"a": "x", "b": "x", "c": "y", "d": "y"}, {"a": 0.8, "b": None, "c": 0.6, "d": 0.6}
    )
    assert only_row(majority_vote(tables))["consensus"] == "x"


def test_items_missing_from_some_models_count_only_the_models_that_have_them() -> None:
    tables = {
        "a": result([("i1", "x", None), ("i2", "x", None), ("i3", "y", None)]),
        "b": result([("i1", "x", None), ("i2", "y", None)]),
        "c": result([("i1", "y", None)]),
    }
    rows = majority_vote(tables).to_pylist()
    assert rows == [
        {"item_id": "i1", "consensus": "x", "votes": 2, "n_models": 3, "confidence": 2 / 3},
        {"item_id": "i2", "consensus": "x", "votes": 1, "n_models": 2, "confidence": 0.5},
        {"item_id": "i3", "consensus": "y", "votes": 1, "n_models": 1, "confidence": 1.0},
    ]


def test_null_predictions_do_not_vote() -> None:
    tables = votes({"a": None, "b": None, "c": "dog", "d": "cat", "e": "cat"})
    row = only_row(majority_vote(tables))
    assert (row["consensus"], row["votes"], row["n_models"], row["confidence"]) == (
        "cat",
        2,
        3,
        2 / 3,
    )


def test_item_with_only_null_predictions_keeps_a_row_with_null_consensus() -> None:
    tables = votes({"a": None, "b": None})
    assert only_row(majority_vote(tables)) == {
        "item_id": "i",
        "consensus": None,
        "votes": 0,
        "n_models": 0,
        "confidence": None,
    }


def test_items_come_back_sorted_by_item_id_with_the_items_schema() -> None:
    tables = {
        "a": result([("i3", "x", None), ("i1", "x", None)]),
        "b": result([("i2", "x", None), ("i1", "y", None)]),
    }
    items = majority_vote(tables)
    assert items.schema == ITEMS_SCHEMA
    assert items.column("item_id").to_pylist() == ["i1", "i2", "i3"]


def test_score_column_may_be_absent_in_some_models() -> None:
    tables = {
        "a": result([("i", "x", None)], with_score=False),
        "b": result([("i", "y", 0.1)]),
    }
    assert only_row(majority_vote(tables))["consensus"] == "y"


def test_extra_columns_are_ignored_and_large_strings_accepted() -> None:
    table = pa.table(
        {
            "prediction": pa.array(["x"], pa.large_string()),
            "item_id": pa.array(["i"], pa.large_string()),
            "tokens": pa.array([12]),
        }
    )
    assert only_row(majority_vote({"a": table}))["consensus"] == "x"


def test_chunked_columns_are_read_whole() -> None:
    table = pa.concat_tables([result([("i1", "x", 0.5)]), result([("i2", "y", None)])])
    assert table.column("item_id").num_chunks == 2
    rows = majority_vote({"a": table, "b": table}).to_pylist()
    assert [(r["item_id"], r["consensus"], r["votes"]) for r in rows] == [
        ("i1", "x", 2),
        ("i2", "y", 2),
    ]


def test_no_models_give_an_empty_aggregate() -> None:
    agg = aggregate({})
    assert agg.items.num_rows == 0
    assert agg.items.schema == ITEMS_SCHEMA
    assert (agg.agreement, agg.fleiss_kappa, agg.consensus_agreement, agg.models) == (
        (),
        None,
        {},
        (),
    )


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["item_id", "prediction"])
def test_missing_required_column_names_model_and_column(column: str) -> None:
    table = result([("i", "x", 0.5)]).drop_columns([column])
    with pytest.raises(ParquetError, match=rf"'slm-3'.*'{column}'"):
        aggregate({"slm-1": result([("i", "x", 0.5)]), "slm-3": table})


DUPLICATED = result([("j", "x", None), ("i", "x", None), ("j", "y", None)])


@pytest.mark.parametrize(
    "tables",
    [
        pytest.param({"slm-2": DUPLICATED}, id="alone"),
        pytest.param({"slm-2": DUPLICATED, "slm-1": result([("i", "x", None)])}, id="with-others"),
    ],
)
def test_duplicate_item_id_within_one_model_names_the_model_and_the_id(
    tables: dict[str, pa.Table],
) -> None:
    with pytest.raises(ParquetError, match=r"'slm-2'.*'item_id'.*duplicate.*'j'"):
        majority_vote(tables)


def test_models_sharing_one_id_column_line_up_on_the_same_items() -> None:
    ids = pa.array(["i2", "i1"])
    tables = {
        "a": pa.table({"item_id": ids, "prediction": ["x", "y"]}),
        "b": pa.table({"item_id": ids, "prediction": ["x", "z"]}),
        "c": pa.table({"item_id": ids, "prediction": ["w", "z"]}),
    }
    rows = majority_vote(tables).to_pylist()
    assert [(r["item_id"], r["consensus"], r["votes"]) for r in rows] == [
        ("i1", "z", 2),
        ("i2", "x", 2),
    ]


def test_null_item_id_names_the_model() -> None:
    table = pa.table({"item_id": pa.array([None], pa.string()), "prediction": ["x"]})
    with pytest.raises(ParquetError, match=r"'slm-4'.*'item_id'.*null"):
        majority_vote({"slm-4": table})


def test_non_string_prediction_names_model_column_and_type() -> None:
    table = pa.table({"item_id": ["i"], "prediction": pa.array([1])})
    with pytest.raises(ParquetError, match=r"'slm-5'.*'prediction'.*int64"):
        majority_vote({"slm-5": table})


def test_non_numeric_score_names_model_and_column() -> None:
    table = pa.table({"item_id": ["i"], "prediction": ["x"], "score": ["high"]})
    with pytest.raises(ParquetError, match=r"'slm-6'.*'score'"):
        majority_vote({"slm-6": table})


# --- agreement -----------------------------------------------------------------------------


def test_agreement_matrix_counts_only_items_both_models_predicted() -> None:
    tables = {
        "b": result([("i1", "x", None), ("i2", "y", None), ("i3", "x", None), ("i4", None, None)]),
        "a": result([("i1", "x", None), ("i2", "x", None), ("i4", "x", None)]),
        "c": result([("i5", "x", None)]),
    }
    assert agreement_matrix(tables) == (
        PairAgreement("a", "b", 0.5, 2),  # i1 agree, i2 differ, i4 null in b
        PairAgreement("a", "c", None, 0),
        PairAgreement("b", "c", None, 0),
    )


def test_consensus_agreement_is_share_of_own_predictions_matching_consensus() -> None:
    tables = {
        "a": result([("i1", "x", None), ("i2", "x", None)]),
        "b": result([("i1", "x", None), ("i2", "y", None), ("i3", None, None)]),
        "c": result([("i1", "y", None), ("i2", "x", None)]),
        "d": result([("i3", None, None)]),
    }
    agg = aggregate(tables)
    assert agg.models == ("a", "b", "c", "d")
    assert agg.consensus_agreement == {"a": 1.0, "b": 0.5, "c": 0.5, "d": None}


# --- Fleiss' kappa -------------------------------------------------------------------------

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 14 raters, 5 categories.
WIKIPEDIA_COUNTS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def tables_from_counts(counts: list[list[int]]) -> dict[str, pa.Table]:
    """One model per rater; rater r of subject s takes the category its position falls in."""
    n_raters = sum(counts[0])
    per_rater: dict[str, list[Row]] = {f"rater-{r:02d}": [] for r in range(n_raters)}
    for s, row in enumerate(counts):
        labels = [f"cat{j}" for j, n in enumerate(row) for _ in range(n)]
        for r, label in enumerate(labels):
            per_rater[f"rater-{r:02d}"].append((f"s{s}", label, None))
    return {name: result(rows) for name, rows in per_rater.items()}


def test_fleiss_kappa_matches_wikipedia_worked_example() -> None:
    # P_bar = 0.378, P_e = 0.213 (rounded in the article), kappa = 0.210.
    kappa = fleiss_kappa(tables_from_counts(WIKIPEDIA_COUNTS))
    assert kappa == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_is_one_for_perfect_agreement_on_several_categories() -> None:
    assert fleiss_kappa(tables_from_counts([[3, 0], [0, 3], [3, 0]])) == 1.0


def test_fleiss_kappa_is_one_when_every_rating_is_the_same_category() -> None:
    assert fleiss_kappa(tables_from_counts([[4], [4]])) == 1.0


def test_fleiss_kappa_is_none_for_a_single_model() -> None:
    assert fleiss_kappa({"a": result([("i", "x", None)])}) is None


def test_fleiss_kappa_is_none_when_no_item_was_predicted_by_all_models() -> None:
    tables = {"a": result([("i1", "x", None)]), "b": result([("i2", "x", None)])}
    assert fleiss_kappa(tables) is None


def test_fleiss_kappa_uses_only_items_every_model_predicted() -> None:
    base = tables_from_counts(WIKIPEDIA_COUNTS)
    # An extra item that one rater lacks and another leaves null must not move kappa.
    noisy = {
        name: pa.concat_tables(
            [table, result([("extra", None if name == "rater-01" else "z", 1.0)])]
        )
        for name, table in base.items()
        if name != "rater-00"
    } | {"rater-00": base["rater-00"]}
    assert fleiss_kappa(noisy) == pytest.approx(fleiss_kappa(base))


# --- cross-check against a plain reference ------------------------------------------------


def reference(tables: Mapping[str, list[Row]]) -> dict[str, object]:
    """A slow, obviously-correct aggregation over plain rows, to check the vectorised one."""
    models = sorted(tables)
    by_item: dict[str, dict[str, tuple[str, float | None]]] = {}
    for m in models:
        for item, label, score in tables[m]:
            by_item.setdefault(item, {})
            if label is not None:
                by_item[item][m] = (label, score)

    items = []
    winners: dict[str, str | None] = {}
    for item in sorted(by_item):
        ballots = by_item[item]
        tally: dict[str, list[float | None]] = {}
        for m in models:  # model order, so the float sums match the vectorised ones
            if m in ballots:
                label, score = ballots[m]
                tally.setdefault(label, []).append(score)

        def rank(label: str, tally: dict[str, list[float | None]] = tally) -> tuple[object, ...]:
            scores = [s for s in tally[label] if s is not None]
            mean = sum(scores) / len(scores) if scores else 0.0
            return (-len(tally[label]), not scores, -mean, label)

        winner = min(tally, key=rank) if tally else None
        winners[item] = winner
        n = len(ballots)
        v = len(tally[winner]) if winner is not None else 0
        items.append(
            {
                "item_id": item,
                "consensus": winner,
                "votes": v,
                "n_models": n,
                "confidence": v / n if n else None,
            }
        )

    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            common = [it for it, bl in by_item.items() if a in bl and b in bl]
            same = sum(by_item[it][a][0] == by_item[it][b][0] for it in common)
            pairs.append(PairAgreement(a, b, same / len(common) if common else None, len(common)))

    kappa = None
    full = [it for it, bl in by_item.items() if len(bl) == len(models)]
    if len(models) >= 2 and full:
        n, big_n = len(models), len(full)
        counts = [Counter(label for label, _ in by_item[it].values()) for it in full]
        p_bar = sum((sum(c * c for c in cnt.values()) - n) / (n * (n - 1)) for cnt in counts)
        p_bar /= big_n
        totals: Counter[str] = Counter()
        for cnt in counts:
            totals.update(cnt)
        p_e = sum((t / (big_n * n)) ** 2 for t in totals.values())
        kappa = 1.0 if math.isclose(p_e, 1.0) else (p_bar - p_e) / (1 - p_e)

    consensus_agreement: dict[str, float | None] = {}
    for m in models:
        mine = [it for it, bl in by_item.items() if m in bl]
        hits = sum(by_item[it][m][0] == winners[it] for it in mine)
        consensus_agreement[m] = hits / len(mine) if mine else None

    return {
        "items": items,
        "agreement": tuple(pairs),
        "fleiss_kappa": kappa,
        "consensus_agreement": consensus_agreement,
        "models": tuple(models),
    }


ITEM_POOL = [f"i{k}" for k in range(6)]


@st.composite
def batches(draw: st.DrawFn) -> dict[str, list[Row]]:
    """Small batches; the item ids are shared, sorted or independent (each takes its own path)."""
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=5, unique=True))
    layout = draw(st.sampled_from(["shared", "sorted", "independent"]))
    shared = draw(st.lists(st.sampled_from(ITEM_POOL), unique=True))
    out = {}
    for name in names:
        if layout == "shared":
            ids = shared
        else:
            ids = draw(st.lists(st.sampled_from(ITEM_POOL), unique=True))
            ids = sorted(ids) if layout == "sorted" else ids
        out[name] = [
            (
                item,
                draw(st.sampled_from(["x", "y", "z", "é", None])),
                draw(st.sampled_from([None, 0.0, 0.1, 0.2, 0.3, 0.5, 1.0])),
            )
            for item in ids
        ]
    return out


@settings(max_examples=300, deadline=None)
@given(batches(), st.booleans())
def test_vectorised_aggregate_matches_plain_reference(
    rows: dict[str, list[Row]], drop_scores: bool
) -> None:
    tables = {m: result(r, with_score=not (drop_scores and m == "a")) for m, r in rows.items()}
    if drop_scores and "a" in rows:
        rows = {**rows, "a": [(i, p, None) for i, p, _ in rows["a"]]}
    want = reference(rows)
    got = aggregate(tables)

    # Shares are the same integer ratios on both sides, so they must match exactly.
    assert got.items.to_pylist() == want["items"]
    assert got.agreement == want["agreement"]
    assert got.models == want["models"]
    assert got.consensus_agreement == want["consensus_agreement"]
    if want["fleiss_kappa"] is None:
        assert got.fleiss_kappa is None
    else:
        assert got.fleiss_kappa == pytest.approx(want["fleiss_kappa"])


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(1, 3), st.integers(1, 4))
def test_aggregate_in_row_slices_on_threads_matches_plain_reference(
    rows: dict[str, list[Row]], threads: int, slice_rows: int
) -> None:
    """The vote taken in slices of a few rows (instead of 2^17) on several threads, from
    predictions given as dictionary arrays (as read from Parquet): each slice's counts add up
    to the same aggregate, ties broken from the scores of the right rows."""
    tables = {}
    for m, r in rows.items():
        t = result(r)
        pred = t.column("prediction").combine_chunks().dictionary_encode()
        tables[m] = t.set_column(1, "prediction", pa.chunked_array([pred[:1], pred[1:]], pred.type))
    want = reference(rows)
    saved = consensus.SLICE_ROWS
    consensus.SLICE_ROWS = slice_rows
    try:
        got = aggregate(tables, threads=threads)
    finally:
        consensus.SLICE_ROWS = saved
    assert got.items.to_pylist() == want["items"]
    assert got.agreement == want["agreement"]
    assert got.consensus_agreement == want["consensus_agreement"]
    if want["fleiss_kappa"] is None:
        assert got.fleiss_kappa is None
    else:
        assert got.fleiss_kappa == pytest.approx(want["fleiss_kappa"])


def test_workers_refuse_fewer_than_one_thread() -> None:
    with pytest.raises(ValueError, match="threads is 0"):
        consensus.Workers(0)
