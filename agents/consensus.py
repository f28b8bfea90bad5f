"""The default aggregation of a batch: majority vote, pairwise agreement and Fleiss' kappa.

Pure functions over pyarrow tables, one table per model with the default result schema
(`item_id` string, `prediction` string, optional `score` float64; other columns are ignored).
No I/O and no event loop: callers run this in a worker thread.

Everything is vectorised. The models' results become one vote matrix: rows are the union of
item ids (sorted), columns are the models (sorted by name), each cell the integer code of that
model's prediction (-1 where the model has no row for the item or its prediction is null). Codes
follow the lexicographic order of the labels, so "the smaller value" is "the smaller code".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from coordinator.core.errors import ParquetError
from coordinator.core.summary import PairAgreement

__all__ = [
    "ITEMS_SCHEMA",
    "BatchAggregate",
    "PairAgreement",
    "VoteMatrix",
    "aggregate",
    "agreement_matrix",
    "fleiss_kappa",
    "majority_vote",
    "normalise_result",
    "vote_matrix",
]

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("consensus", pa.string()),
        pa.field("votes", pa.int32(), nullable=False),
        pa.field("n_models", pa.int32(), nullable=False),
        pa.field("confidence", pa.float64()),
    ]
)

NO_VOTE = -1

Codes = npt.NDArray[np.int32]
Floats = npt.NDArray[np.float64]
Positions = npt.NDArray[np.int64]


@dataclass(frozen=True)
class BatchAggregate:
    """The aggregate of one batch: consensus per item and agreement between the models."""

    items: pa.Table  # ITEMS_SCHEMA, sorted by item_id
    agreement: tuple[PairAgreement, ...]
    fleiss_kappa: float | None
    consensus_agreement: dict[str, float | None]  # None: the model predicted no item
    models: tuple[str, ...]


@dataclass(frozen=True)
class VoteMatrix:
    """Every model's predictions and scores, aligned on one item index."""

    models: tuple[str, ...]  # sorted; column order of `codes` and `scores`
    item_ids: pa.Array  # string, sorted, one per row
    labels: pa.Array  # string, sorted, distinct; a code indexes into it
    codes: Codes  # (n_items, n_models); NO_VOTE where the model did not predict the item
    scores: Floats  # (n_items, n_models); NaN where there is no score or no vote
    rows: tuple[Positions, ...]  # per model: the matrix row of each of its table's rows, or -1


_STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return any(test(t) for test in _STRING_TYPES)


def _column(model: str, table: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ParquetError(
            f"model {model!r}: result has no {name!r} column (found {table.column_names})"
        )
    return table.column(name)


def _as_string(model: str, table: pa.Table, name: str) -> pa.ChunkedArray:
    col = _column(model, table, name)
    if not (_is_string(col.type) or pa.types.is_null(col.type)):
        raise ParquetError(f"model {model!r}: column {name!r} should be string, found {col.type}")
    return col.cast(pa.string())


def normalise_result(model: str, table: pa.Table) -> pa.Table:
    """Validate one model's result and return just `item_id`, `prediction`, `score` (float64).

    Raises ParquetError naming the model and column when a required column is missing or of
    the wrong type, or an item id is null. (Duplicate ids are caught by `vote_matrix`.)
    """
    item_id = _as_string(model, table, "item_id")
    prediction = _as_string(model, table, "prediction")
    if "score" in table.column_names:
        score = table.column("score")
        if not (
            pa.types.is_floating(score.type)
            or pa.types.is_integer(score.type)
            or pa.types.is_null(score.type)
        ):
            raise ParquetError(
                f"model {model!r}: column 'score' should be float64, found {score.type}"
            )
        score = score.cast(pa.float64())
    else:
        score = pa.chunked_array([pa.nulls(table.num_rows, pa.float64())])
    if item_id.null_count:
        raise ParquetError(f"model {model!r}: column 'item_id' has {item_id.null_count} null(s)")
    return pa.table({"item_id": item_id, "prediction": prediction, "score": score})


def _numpy(values: pa.Array | pa.ChunkedArray) -> Positions:
    """Integer indices (nulls as NO_VOTE) as one int64 numpy array."""
    return np.asarray(pc.fill_null(values.cast(pa.int64()), NO_VOTE).to_numpy(), dtype=np.int64)


def _duplicate(models: Sequence[str], item_id: object) -> ParquetError:
    who = ", ".join(repr(m) for m in models)
    noun = "model" if len(models) == 1 else "models"
    return ParquetError(f"{noun} {who}: column 'item_id' has duplicates, e.g. {item_id!r}")


def _check_unique(models: Sequence[str], positions: Positions, index: pa.Array) -> None:
    found = positions[positions >= 0]
    counts = np.bincount(found, minlength=len(index))
    if len(counts) and counts.max() > 1:
        raise _duplicate(models, index[int(counts.argmax())].as_py())


def _sorted_positions(models: Sequence[str], ids: pa.ChunkedArray) -> tuple[pa.Array, Positions]:
    """One column's ids sorted (the index), and each row's position in it."""
    ids = ids.combine_chunks()
    n = len(ids)
    if n < 2 or pc.all(pc.less(ids[:-1], ids[1:])).as_py():
        # Producers usually write ids in order; strictly increasing also means no duplicates.
        return ids, np.arange(n, dtype=np.int64)
    order = _numpy(pc.array_sort_indices(ids))
    index = ids.take(order)
    same = _numpy(pc.equal(index[:-1], index[1:])) > 0
    if same.any():
        raise _duplicate(models, index[int(same.argmax())].as_py())
    positions = np.empty(n, dtype=np.int64)
    positions[order] = np.arange(n, dtype=np.int64)
    return index, positions


def _encode(columns: Sequence[pa.ChunkedArray]) -> tuple[pa.Array, list[Positions]]:
    """The sorted distinct values of `columns`, and each column as indices into them."""
    chunks = [chunk for column in columns for chunk in column.chunks if len(chunk)]
    encoded = pa.chunked_array(chunks, pa.string()).dictionary_encode()
    if encoded.num_chunks == 0:
        return pa.array([], pa.string()), [np.empty(0, dtype=np.int64) for _ in columns]
    # Every chunk of a dictionary-encoded ChunkedArray shares one dictionary (nulls stay null).
    dictionary = encoded.chunk(0).dictionary
    order = _numpy(pc.array_sort_indices(dictionary))
    rank = np.empty(len(order) + 1, dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    rank[-1] = NO_VOTE  # NO_VOTE indexes the last slot, so nulls map to NO_VOTE
    flat = rank[_numpy(pa.chunked_array([c.indices for c in encoded.chunks], pa.int32()))]
    bounds = np.cumsum([len(column) for column in columns])[:-1]
    return dictionary.take(pa.array(order)), np.split(flat, bounds)


def _group_identical(columns: Sequence[pa.ChunkedArray]) -> list[int]:
    """For each column, the first column equal to it (models usually share one id column)."""
    first: list[int] = []
    for j, column in enumerate(columns):
        same = (
            i
            for i in sorted(set(first))
            if len(columns[i]) == len(column) and columns[i].equals(column)
        )
        first.append(next(same, j))
    return first


def _item_positions(
    models: Sequence[str], ids: Sequence[pa.ChunkedArray], restrict_to: int | None
) -> tuple[pa.Array, list[Positions]]:
    first = _group_identical(ids)
    reps = sorted(set(first))
    members = {r: [models[j] for j in range(len(models)) if first[j] == r] for r in reps}
    positions: dict[int, Positions] = {}
    if restrict_to is not None:
        own = first[restrict_to]
        index, positions[own] = _sorted_positions(members[own], ids[own])
        for r in reps:
            if r != own:
                positions[r] = _numpy(pc.index_in(ids[r], value_set=index))
                _check_unique(members[r], positions[r], index)
    elif len(reps) == 1:
        index, positions[reps[0]] = _sorted_positions(members[reps[0]], ids[reps[0]])
    else:
        index, parts = _encode([ids[r] for r in reps])
        for r, part in zip(reps, parts, strict=True):
            _check_unique(members[r], part, index)
            positions[r] = part
    return index, [positions[first[j]] for j in range(len(models))]


def vote_matrix(tables: Mapping[str, pa.Table], *, restrict_to: str | None = None) -> VoteMatrix:
    """Align every model's predictions on one item index.

    The index is the sorted union of all models' item ids, or with `restrict_to` the item ids
    of that one model (other models' rows for other items are left out unchecked). Raises
    ParquetError naming the model when a result is malformed or repeats an item id.
    """
    if restrict_to is not None and restrict_to not in tables:
        raise ValueError(f"model {restrict_to!r} is not among {sorted(tables)}")
    models = tuple(sorted(tables))
    results = [normalise_result(m, tables[m]) for m in models]
    own = None if restrict_to is None else models.index(restrict_to)
    index, rows = _item_positions(models, [r.column("item_id") for r in results], own)
    labels, predictions = _encode([r.column("prediction") for r in results])

    n_items, n_models = len(index), len(models)
    # Column-major: every per-model step below reads one contiguous column.
    codes = np.full((n_items, n_models), NO_VOTE, dtype=np.int32, order="F")
    scores = np.full((n_items, n_models), np.nan, dtype=np.float64, order="F")
    for j, result in enumerate(results):
        keep = rows[j] >= 0
        score = pc.fill_null(result.column("score"), np.nan).to_numpy()
        codes[rows[j][keep], j] = predictions[j][keep]
        scores[rows[j][keep], j] = score[keep]
    # Only votes carry scores: a null prediction's score belongs to no label.
    scores[codes == NO_VOTE] = np.nan
    return VoteMatrix(models, index, labels, codes, scores, tuple(rows))


Votes = npt.NDArray[np.int32]


def _columns_voted(codes: Codes) -> list[npt.NDArray[np.bool_]]:
    return [codes[:, j] != NO_VOTE for j in range(codes.shape[1])]


def _peer_votes(codes: Codes) -> Votes:
    """Per cell: how many models in the row voted the label this model voted (0: no vote)."""
    voted = _columns_voted(codes)
    votes = np.zeros(codes.shape, dtype=np.int32, order="F")
    for j in range(codes.shape[1]):
        votes[:, j] += voted[j]
        for k in range(j + 1, codes.shape[1]):
            same = voted[j] & (codes[:, j] == codes[:, k])
            votes[:, j] += same
            votes[:, k] += same
    return votes


def _break_ties(codes: Codes, scores: Floats, votes: Votes, top: Votes) -> Codes:
    """Among the labels with `top` votes in each row: higher mean score, then smaller code."""
    n_rows, n_models = codes.shape
    has_score = ~np.isnan(scores)
    best_code = np.full(n_rows, NO_VOTE, dtype=np.int32)
    best_scored = np.zeros(n_rows, dtype=bool)
    best_mean = np.zeros(n_rows, dtype=np.float64)
    for j in range(n_models):
        code = codes[:, j]
        total = np.zeros(n_rows, dtype=np.float64)
        n_scores = np.zeros(n_rows, dtype=np.int32)
        for k in range(n_models):
            # Summed in model order, so every voter of a label reaches the same mean bit for bit.
            same = (codes[:, k] == code) & has_score[:, k]
            np.add(total, scores[:, k], out=total, where=same)
            n_scores += same
        scored = n_scores > 0
        mean = np.divide(total, n_scores, out=np.zeros(n_rows), where=scored)
        better = (votes[:, j] == top) & (
            (best_code == NO_VOTE)
            | (scored & ~best_scored)
            | (
                (scored == best_scored)
                & ((mean > best_mean) | ((mean == best_mean) & (code < best_code)))
            )
        )
        best_code[better] = code[better]
        best_scored[better] = scored[better]
        best_mean[better] = mean[better]
    return best_code


def _winners(vm: VoteMatrix, votes: Votes) -> tuple[Codes, Votes]:
    """Per row: the winning code (NO_VOTE if nobody voted) and the votes for it."""
    n_items, n_models = vm.codes.shape
    columns = [votes[:, j] for j in range(n_models)]
    top = np.zeros(n_items, dtype=np.int32)
    for column in columns:
        np.maximum(top, column, out=top)
    # Without a tie every cell holding the top count voted the same label: take the largest code.
    winner = np.full(n_items, NO_VOTE, dtype=np.int32)
    at_top = np.zeros(n_items, dtype=np.int32)
    for j, column in enumerate(columns):
        is_top = (column == top) & (top > 0)
        np.maximum(winner, vm.codes[:, j], out=winner, where=is_top)
        at_top += is_top
    # A tie shows as more cells at the top count than the count itself; only those rows need
    # the scores, and they are usually few.
    tied = np.flatnonzero(at_top > top)
    if len(tied):
        winner[tied] = _break_ties(vm.codes[tied], vm.scores[tied], votes[tied], top[tied])
    return winner, top


def _items_table(vm: VoteMatrix, votes: Votes) -> tuple[pa.Table, Codes]:
    winner, votes_for = _winners(vm, votes)
    n_voting = np.zeros(len(winner), dtype=np.int32)
    for voted in _columns_voted(vm.codes):
        n_voting += voted
    nobody = n_voting == 0
    consensus = vm.labels.take(pa.array(np.where(nobody, 0, winner), mask=nobody))
    confidence = np.divide(votes_for, n_voting, out=np.zeros(len(winner)), where=~nobody)
    table = pa.table(
        [
            vm.item_ids,
            consensus,
            pa.array(votes_for),
            pa.array(n_voting),
            pa.array(confidence, mask=nobody),
        ],
        schema=ITEMS_SCHEMA,
    )
    return table, winner


def majority_vote(tables: Mapping[str, pa.Table]) -> pa.Table:
    """Consensus per item by majority vote (ties: higher mean score, then the smaller label).

    Returns ITEMS_SCHEMA sorted by item_id: `votes` for the winner, `n_models` voting, and
    `confidence` = votes / n_models. Null (or NaN) scores are left out of the means. An item on
    which every prediction is null keeps its row with a null consensus and confidence, 0 votes
    and 0 models.
    """
    vm = vote_matrix(tables)
    return _items_table(vm, _peer_votes(vm.codes))[0]


def _agreement(vm: VoteMatrix) -> tuple[PairAgreement, ...]:
    codes = vm.codes
    voted = _columns_voted(codes)
    pairs = []
    for a in range(len(vm.models)):
        for b in range(a + 1, len(vm.models)):
            both = voted[a] & voted[b]
            n_common = int(both.sum())
            agree = int((both & (codes[:, a] == codes[:, b])).sum())
            pairs.append(
                PairAgreement(
                    vm.models[a],
                    vm.models[b],
                    agree / n_common if n_common else None,
                    n_common,
                )
            )
    return tuple(pairs)


def agreement_matrix(tables: Mapping[str, pa.Table]) -> tuple[PairAgreement, ...]:
    """Agreement of every unordered pair of models (model_a < model_b), sorted by the pair.

    `agreement` is the share of the items both predicted (non-null) on which they agree.
    """
    return _agreement(vote_matrix(tables))


def _fleiss(vm: VoteMatrix, votes: Votes) -> float | None:
    n = len(vm.models)
    if n < 2:
        return None
    full = np.logical_and.reduce(_columns_voted(vm.codes))
    n_subjects = int(full.sum())
    if n_subjects == 0:
        return None
    # sum_j n_ij^2 is the sum, over the raters, of how many raters chose that rater's category;
    # so sum_i P_i = (sum of those peer counts - N n) / (n (n - 1)).
    sum_sq = sum(int(votes[full, j].sum(dtype=np.int64)) for j in range(n))
    p_bar = (sum_sq - n_subjects * n) / (n * (n - 1)) / n_subjects
    counts = np.zeros(len(vm.labels), dtype=np.int64)
    for j in range(n):
        counts += np.bincount(vm.codes[full, j], minlength=len(vm.labels))
    p_j = counts[counts > 0] / (n_subjects * n)
    p_e = float(np.square(p_j).sum())
    if p_e == 1.0:
        # Every rating fell in one category, so every rater agreed on every subject.
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def fleiss_kappa(tables: Mapping[str, pa.Table]) -> float | None:
    """Fleiss' kappa of the models over the items that every model predicted.

    Fleiss, J. L. (1971), "Measuring nominal scale agreement among many raters",
    Psychological Bulletin 76(5):378-382. With N subjects, n raters each (here: the models),
    and n_ij the raters putting subject i in category j:

        P_i   = (sum_j n_ij^2 - n) / (n (n - 1))      P_bar = mean_i P_i
        p_j   = sum_i n_ij / (N n)                    P_e   = sum_j p_j^2
        kappa = (P_bar - P_e) / (1 - P_e)

    Categories are the labels seen on those items. None with fewer than two models or no item
    predicted by all; 1.0 when every rating is the same single category (P_e = 1).
    """
    vm = vote_matrix(tables)
    return _fleiss(vm, _peer_votes(vm.codes))


def _consensus_agreement(vm: VoteMatrix, winner: Codes) -> dict[str, float | None]:
    shares: dict[str, float | None] = {}
    for j, model in enumerate(vm.models):
        voted = vm.codes[:, j] != NO_VOTE
        n_voted = int(voted.sum())
        n_same = int((voted & (vm.codes[:, j] == winner)).sum())
        shares[model] = n_same / n_voted if n_voted else None
    return shares


def aggregate(tables: Mapping[str, pa.Table]) -> BatchAggregate:
    """Aggregate one batch: consensus per item, pairwise agreement, Fleiss' kappa.

    `tables` maps model name to its result (or its cross-check result); every key takes part.
    """
    vm = vote_matrix(tables)
    votes = _peer_votes(vm.codes)
    items, winner = _items_table(vm, votes)
    return BatchAggregate(
        items=items,
        agreement=_agreement(vm),
        fleiss_kappa=_fleiss(vm, votes),
        consensus_agreement=_consensus_agreement(vm, winner),
        models=vm.models,
    )
