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

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

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
    "Totals",
    "VoteMatrix",
    "Workers",
    "aggregate",
    "agreement_matrix",
    "agreement_of",
    "consensus_agreement_of",
    "fleiss_kappa",
    "fleiss_of",
    "majority_vote",
    "normalise_result",
    "row_slices",
    "vote",
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


T = TypeVar("T")
R = TypeVar("R")

# Rows per slice of the row-wise work: large enough that numpy's calls (which release the GIL)
# dominate the Python between them, small enough that a slice's columns stay in cache.
SLICE_ROWS = 1 << 17


class Workers:
    """The threads of one cross-check or aggregation: `map` runs a function over items on them
    (in the caller's thread with one thread). numpy and Arrow release the GIL in their loops,
    so slices of rows, models or files run side by side on the node's cores."""

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads is {threads}, expected >= 1")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, "consensus") if threads > 1 else None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` of each item, in order; the first error is raised once all have finished."""
        if self._pool is None:
            return [fn(x) for x in items]
        futures = [self._pool.submit(fn, x) for x in items]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_slices(n: int, threads: int = 1) -> list[slice]:
    """`n` rows as slices of about SLICE_ROWS rows (at least one slice per thread)."""
    if n == 0:
        return []
    parts = max(threads, -(-n // SLICE_ROWS))
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass(frozen=True)
class VoteMatrix:
    """Every model's predictions, aligned on one item index; scores on demand (`scores_at`)."""

    models: tuple[str, ...]  # sorted; column order of `codes`
    item_ids: pa.Array  # string, sorted, one per row
    labels: pa.Array  # string, sorted, distinct; a code indexes into it
    codes: Codes  # (n_items, n_models), column-major; NO_VOTE where the model did not predict
    rows: tuple[Positions, ...]  # per model: the matrix row of each of its table's rows, or -1
    whole: tuple[bool, ...]  # per model: its table's rows are the matrix's rows, in order
    results: tuple[pa.Table, ...] = field(repr=False)  # per model: normalised (normalise_result)

    def scores_at(self, index: Positions) -> Floats:
        """The scores of the matrix rows `index`, (len(index), n_models): NaN where the model
        gave no score or did not vote (only votes carry scores: a null prediction's score
        belongs to no label). Built only for the rows asked for (the tied ones)."""
        out = np.full((len(index), len(self.models)), np.nan, dtype=np.float64)
        for j, result in enumerate(self.results):
            score = result.column("score")
            if self.whole[j]:
                at = index
            else:
                where = np.full(len(self.item_ids), -1, dtype=np.int64)
                keep = self.rows[j] >= 0
                where[self.rows[j][keep]] = np.flatnonzero(keep)
                at = where[index]
            ok = at >= 0
            picked = score.take(pa.array(at[ok]))
            out[ok, j] = pc.fill_null(picked, np.nan).to_numpy()
        out[self.codes[index] == NO_VOTE] = np.nan
        return out


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


def _as_string(
    model: str, table: pa.Table, name: str, *, dictionary: bool = False
) -> pa.ChunkedArray:
    col = _column(model, table, name)
    if not (_is_string(col.type) or pa.types.is_null(col.type)):
        raise ParquetError(f"model {model!r}: column {name!r} should be string, found {col.type}")
    if dictionary and pa.types.is_dictionary(col.type):
        return col  # read as a dictionary: its strings are decoded only where needed
    return col.cast(pa.string())


def normalise_result(model: str, table: pa.Table) -> pa.Table:
    """Validate one model's result and return just `item_id`, `prediction`, `score` (float64).

    `prediction` is a string column, or a dictionary of strings where the table has one (a
    Parquet file read with `read_dictionary`): cast it to string to show it. Raises
    ParquetError naming the model and column when a required column is missing or of the
    wrong type, or an item id is null. (Duplicate ids are caught by `vote_matrix`.)
    """
    item_id = _as_string(model, table, "item_id")
    prediction = _as_string(model, table, "prediction", dictionary=True)
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


def _dictionary_chunks(column: pa.ChunkedArray) -> list[pa.DictionaryArray]:
    """Each chunk of a string column as a dictionary array (a Parquet reader's dictionary
    column as it is: no string is decoded or hashed again)."""
    return [
        c if pa.types.is_dictionary(c.type) else pc.dictionary_encode(c)
        for c in column.chunks
        if len(c)
    ]


def _encode_labels(
    columns: Sequence[pa.ChunkedArray], workers: Workers
) -> tuple[pa.Array, list[Codes]]:
    """The sorted distinct labels of `columns`, and each column as codes into them (NO_VOTE
    where null): each column encoded on its own (in parallel), then only the small
    dictionaries merged."""
    encoded = workers.map(_dictionary_chunks, columns)
    dictionaries = [c.dictionary.cast(pa.string()) for chunks in encoded for c in chunks]
    if dictionaries:
        labels = pc.unique(pa.concat_arrays(dictionaries)).drop_null()
        labels = labels.take(pc.array_sort_indices(labels))
    else:
        labels = pa.array([], pa.string())

    def codes(k: int) -> Codes:
        out = np.empty(len(columns[k]), dtype=np.int32)
        at = 0
        for chunk in encoded[k]:
            dictionary = chunk.dictionary.cast(pa.string())
            lookup = np.empty(len(dictionary) + 1, dtype=np.int32)
            lookup[:-1] = _numpy(pc.index_in(dictionary, value_set=labels))
            lookup[-1] = NO_VOTE  # nulls index the last slot
            idx = _numpy(pc.fill_null(chunk.indices, len(dictionary)))
            out[at : at + len(chunk)] = lookup[idx]
            at += len(chunk)
        out[at:] = NO_VOTE  # a column of all-null chunks (type null) has none encoded
        return out

    return labels, workers.map(codes, range(len(columns)))


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


def vote_matrix(
    tables: Mapping[str, pa.Table],
    *,
    restrict_to: str | None = None,
    workers: Workers | None = None,
) -> VoteMatrix:
    """Align every model's predictions on one item index.

    The index is the sorted union of all models' item ids, or with `restrict_to` the item ids
    of that one model (other models' rows for other items are left out unchecked). Raises
    ParquetError naming the model when a result is malformed or repeats an item id. With
    `workers`, the models' columns are encoded and placed on its threads.
    """
    if restrict_to is not None and restrict_to not in tables:
        raise ValueError(f"model {restrict_to!r} is not among {sorted(tables)}")
    w = workers or Workers(1)
    models = tuple(sorted(tables))
    results = [normalise_result(m, tables[m]) for m in models]
    own = None if restrict_to is None else models.index(restrict_to)
    index, rows = _item_positions(models, [r.column("item_id") for r in results], own)
    labels, predictions = _encode_labels([r.column("prediction") for r in results], w)

    n_items, n_models = len(index), len(models)
    identity = np.arange(n_items, dtype=np.int64)
    whole = tuple(len(r) == n_items and np.array_equal(r, identity) for r in rows)
    # Column-major: every per-model step reads one contiguous column.
    codes = np.empty((n_items, n_models), dtype=np.int32, order="F")

    def place(j: int) -> None:
        column = codes[:, j]
        if whole[j]:
            column[:] = predictions[j]
            return
        column.fill(NO_VOTE)
        keep = rows[j] >= 0
        column[rows[j][keep]] = predictions[j][keep]

    w.map(place, range(n_models))
    return VoteMatrix(models, index, labels, codes, tuple(rows), whole, tuple(results))


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


def _winners(
    codes: Codes, votes: Votes, scores_of: Callable[[Positions], Floats]
) -> tuple[Codes, Votes]:
    """Per row: the winning code (NO_VOTE if nobody voted) and the votes for it."""
    n_items, n_models = codes.shape
    columns = [votes[:, j] for j in range(n_models)]
    top = np.zeros(n_items, dtype=np.int32)
    for column in columns:
        np.maximum(top, column, out=top)
    # Without a tie every cell holding the top count voted the same label: take the largest code.
    winner = np.full(n_items, NO_VOTE, dtype=np.int32)
    at_top = np.zeros(n_items, dtype=np.int32)
    for j, column in enumerate(columns):
        is_top = (column == top) & (top > 0)
        np.maximum(winner, codes[:, j], out=winner, where=is_top)
        at_top += is_top
    # A tie shows as more cells at the top count than the count itself; only those rows need
    # the scores, and they are usually few.
    tied = np.flatnonzero(at_top > top)
    if len(tied):
        winner[tied] = _break_ties(codes[tied], scores_of(tied), votes[tied], top[tied])
    return winner, top


@dataclass
class _Tally:
    """What the vote finds over some rows: per row the winner, its votes and the models
    voting; over those rows the counts agreement, Fleiss' kappa and consensus agreement need.
    Tallies of disjoint rows add up (`add`)."""

    winner: Codes
    top: Votes
    n_voting: Votes
    pairs: npt.NDArray[np.int64]  # per pair (a < b, in order): [items both voted, agreeing]
    full: int  # items every model voted
    sum_sq: int  # over those: the sum of the peer counts of every model
    label_counts: npt.NDArray[np.int64]  # over those: how often each label was voted
    voted: npt.NDArray[np.int64]  # per model: items it voted
    same: npt.NDArray[np.int64]  # per model: items it voted the winner

    def add(self, other: _Tally) -> _Tally:
        return _Tally(
            np.concatenate([self.winner, other.winner]),
            np.concatenate([self.top, other.top]),
            np.concatenate([self.n_voting, other.n_voting]),
            self.pairs + other.pairs,
            self.full + other.full,
            self.sum_sq + other.sum_sq,
            self.label_counts + other.label_counts,
            self.voted + other.voted,
            self.same + other.same,
        )


def _tally_rows(vm: VoteMatrix, rows: slice) -> _Tally:
    codes = vm.codes[rows]
    n_models = len(vm.models)
    votes = _peer_votes(codes)
    start = rows.start or 0
    winner, top = _winners(codes, votes, lambda tied: vm.scores_at(tied + start))
    voted = _columns_voted(codes)
    n_voting = np.zeros(len(codes), dtype=np.int32)
    for v in voted:
        n_voting += v
    pairs = np.zeros((n_models * (n_models - 1) // 2, 2), dtype=np.int64)
    k = 0
    for a in range(n_models):
        for b in range(a + 1, n_models):
            both = voted[a] & voted[b]
            pairs[k] = (int(both.sum()), int((both & (codes[:, a] == codes[:, b])).sum()))
            k += 1
    full = n_voting == n_models
    label_counts = np.zeros(len(vm.labels), dtype=np.int64)
    sum_sq = 0
    for j in range(n_models):
        sum_sq += int(votes[full, j].sum(dtype=np.int64))
        label_counts += np.bincount(codes[full, j], minlength=len(vm.labels))
    return _Tally(
        winner,
        top,
        n_voting,
        pairs,
        int(full.sum()) if n_models else 0,
        sum_sq,
        label_counts,
        np.array([int(v.sum()) for v in voted], dtype=np.int64),
        np.array(
            [int((voted[j] & (codes[:, j] == winner)).sum()) for j in range(n_models)],
            dtype=np.int64,
        ),
    )


def _tally(vm: VoteMatrix, workers: Workers) -> _Tally:
    """The vote over every row, in slices of rows on the workers' threads."""
    parts = workers.map(
        lambda rows: _tally_rows(vm, rows), row_slices(len(vm.item_ids), workers.threads)
    )
    if not parts:
        return _tally_rows(vm, slice(0, 0))
    total = parts[0]
    for part in parts[1:]:
        total = total.add(part)
    return total


def _items_table(vm: VoteMatrix, t: _Tally) -> pa.Table:
    nobody = t.n_voting == 0
    consensus = vm.labels.take(pa.array(np.where(nobody, 0, t.winner), mask=nobody))
    confidence = np.divide(t.top, t.n_voting, out=np.zeros(len(t.winner)), where=~nobody)
    return pa.table(
        [
            vm.item_ids,
            consensus,
            pa.array(t.top),
            pa.array(t.n_voting),
            pa.array(confidence, mask=nobody),
        ],
        schema=ITEMS_SCHEMA,
    )


def majority_vote(tables: Mapping[str, pa.Table]) -> pa.Table:
    """Consensus per item by majority vote (ties: higher mean score, then the smaller label).

    Returns ITEMS_SCHEMA sorted by item_id: `votes` for the winner, `n_models` voting, and
    `confidence` = votes / n_models. Null (or NaN) scores are left out of the means. An item on
    which every prediction is null keeps its row with a null consensus and confidence, 0 votes
    and 0 models.
    """
    vm = vote_matrix(tables)
    return _items_table(vm, _tally(vm, Workers(1)))


@dataclass(frozen=True)
class Totals:
    """What the vote over some items adds up to: the counts behind pair agreement, Fleiss'
    kappa and consensus agreement. Totals of disjoint items of one batch add up (`+`), so a
    batch voted on range by range of items (`agents.ranges`) gets the figures of the whole."""

    models: tuple[str, ...]
    rows: int  # items
    pairs: npt.NDArray[np.int64]  # per pair (a < b, in order): [items both voted, agreeing]
    full: int  # items every model voted
    sum_sq: int  # over those: the sum of the peer counts of every model
    label_counts: Mapping[str, int]  # over those: how often each label was voted
    voted: npt.NDArray[np.int64]  # per model: items it voted
    same: npt.NDArray[np.int64]  # per model: items it voted the winner

    def __add__(self, other: Totals) -> Totals:
        if other.models != self.models:
            raise ValueError(f"totals of models {other.models} added to {self.models}")
        counts = dict(self.label_counts)
        for label, n in other.label_counts.items():
            counts[label] = counts.get(label, 0) + n
        return Totals(
            self.models,
            self.rows + other.rows,
            self.pairs + other.pairs,
            self.full + other.full,
            self.sum_sq + other.sum_sq,
            counts,
            self.voted + other.voted,
            self.same + other.same,
        )


def _totals(vm: VoteMatrix, t: _Tally) -> Totals:
    counts = {
        label: int(n)
        for label, n in zip(vm.labels.to_pylist(), t.label_counts.tolist(), strict=True)
        if n
    }
    return Totals(vm.models, len(vm.item_ids), t.pairs, t.full, t.sum_sq, counts, t.voted, t.same)


def agreement_of(t: Totals) -> tuple[PairAgreement, ...]:
    """Agreement of every unordered pair of models (model_a < model_b), sorted by the pair."""
    pairs = []
    n = len(t.models)
    k = 0
    for a in range(n):
        for b in range(a + 1, n):
            n_common, agree = (int(x) for x in t.pairs[k])
            pairs.append(
                PairAgreement(
                    t.models[a],
                    t.models[b],
                    agree / n_common if n_common else None,
                    n_common,
                )
            )
            k += 1
    return tuple(pairs)


def agreement_matrix(tables: Mapping[str, pa.Table]) -> tuple[PairAgreement, ...]:
    """Agreement of every unordered pair of models (model_a < model_b), sorted by the pair.

    `agreement` is the share of the items both predicted (non-null) on which they agree.
    """
    vm = vote_matrix(tables)
    return agreement_of(_totals(vm, _tally(vm, Workers(1))))


def fleiss_of(t: Totals) -> float | None:
    """Fleiss' kappa from the totals (`fleiss_kappa` says how)."""
    n = len(t.models)
    if n < 2:
        return None
    n_subjects = t.full
    if n_subjects == 0:
        return None
    # sum_j n_ij^2 is the sum, over the raters, of how many raters chose that rater's category;
    # so sum_i P_i = (sum of those peer counts - N n) / (n (n - 1)).
    p_bar = (t.sum_sq - n_subjects * n) / (n * (n - 1)) / n_subjects
    counts = np.array([c for c in t.label_counts.values() if c > 0], dtype=np.int64)
    p_j = counts / (n_subjects * n)
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
    return fleiss_of(_totals(vm, _tally(vm, Workers(1))))


def consensus_agreement_of(t: Totals) -> dict[str, float | None]:
    """Per model: the share of its votes that are the consensus (None: it voted on nothing)."""
    return {
        model: int(t.same[j]) / int(t.voted[j]) if t.voted[j] else None
        for j, model in enumerate(t.models)
    }


def vote(tables: Mapping[str, pa.Table], workers: Workers) -> tuple[pa.Table, Totals]:
    """The consensus per item (ITEMS_SCHEMA, sorted by item_id) of `tables`, and the totals of
    the vote, which add up over disjoint items. Every key of `tables` takes part."""
    vm = vote_matrix(tables, workers=workers)
    t = _tally(vm, workers)
    return _items_table(vm, t), _totals(vm, t)


def aggregate(tables: Mapping[str, pa.Table], *, threads: int = 1) -> BatchAggregate:
    """Aggregate one batch: consensus per item, pairwise agreement, Fleiss' kappa.

    `tables` maps model name to its result (or its cross-check result); every key takes part.
    With `threads` > 1 the columns and then slices of the rows are worked on side by side.
    """
    with Workers(threads) as workers:
        items, t = vote(tables, workers)
    return BatchAggregate(
        items=items,
        agreement=agreement_of(t),
        fleiss_kappa=fleiss_of(t),
        consensus_agreement=consensus_agreement_of(t),
        models=t.models,
    )
