"""The default cross-check: one model's result validated against the other models' results.

Pure: the staging agent reads the node-local copies, calls the configured cross-check function
(an import path "module:function", by default "agents.crosscheck:crosscheck") and publishes
what it returns as `crosscheck_<model>.parquet`. The output keeps `item_id`, `prediction` and
`score`, so the coordinator aggregates cross-check files exactly like the models' results.

With the default function the agent calls `crosscheck_batch` instead: the vote matrix of the
batch is built once and every one of its models is cross-checked from it, the models side by
side on the agent's threads, each handed to `emit` (the agent writes it) as soon as it is done.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from agents.consensus import NO_VOTE, VoteMatrix, Workers, row_slices, vote_matrix
from coordinator.core.errors import ConfigError

__all__ = [
    "CROSSCHECK_SCHEMA",
    "DEFAULT_CROSSCHECK",
    "CrosscheckFn",
    "crosscheck",
    "crosscheck_batch",
    "load_crosscheck",
]

CrosscheckFn = Callable[[str, Mapping[str, pa.Table]], pa.Table]

DEFAULT_CROSSCHECK = "agents.crosscheck:crosscheck"

CROSSCHECK_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("prediction", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("n_others", pa.int32(), nullable=False),
        pa.field("n_agree", pa.int32(), nullable=False),
        pa.field("agree_models", pa.list_(pa.string()), nullable=False),
    ]
)


def crosscheck(model: str, tables: Mapping[str, pa.Table]) -> pa.Table:
    """Check `model`'s predictions against every other model in `tables`.

    One row per item of `model`, sorted by item_id (CROSSCHECK_SCHEMA): how many other models
    predicted the item (`n_others`), how many of them agree (`n_agree`) and which (`agree_models`,
    sorted). A null prediction agrees with nobody.
    """
    if model not in tables:
        raise ValueError(f"cross-check of model {model!r}: no result for it among {sorted(tables)}")
    vm = vote_matrix(tables, restrict_to=model)
    return _crosscheck_of(vm, vm.models.index(model), _n_voted(vm, Workers(1)))


T = TypeVar("T")


def crosscheck_batch(
    models: Sequence[str],
    tables: Mapping[str, pa.Table],
    emit: Callable[[str, pa.Table], T],
    *,
    threads: int = 1,
    workers: Workers | None = None,
) -> dict[str, T]:
    """Cross-check each of `models` against every model in `tables`, from one vote matrix.

    Each model's table (what `crosscheck` returns for it) goes to `emit(model, table)` as
    soon as it is built, on one of `threads` threads (or of `workers`, a pool kept from one
    call to the next); returns what `emit` returned, by model.
    Raises ParquetError naming the model when any result is malformed or repeats an item id
    (every model's ids are checked, not only those of the items of `models`).
    """
    unknown = [m for m in models if m not in tables]
    if unknown:
        raise ValueError(f"cross-check of {unknown}: no result for them among {sorted(tables)}")
    if not models:
        return {}
    if workers is None:
        with Workers(threads) as own:
            return crosscheck_batch(models, tables, emit, workers=own)
    vm = vote_matrix(tables, workers=workers)
    n_voted = _n_voted(vm, workers)

    def one(model: str) -> T:
        return emit(model, _crosscheck_of(vm, vm.models.index(model), n_voted))

    done = workers.map(one, models)
    return dict(zip(models, done, strict=True))


Counts = npt.NDArray[np.int32]


def _n_voted(vm: VoteMatrix, workers: Workers) -> Counts:
    """Per row of the matrix: how many models voted (a non-null prediction)."""
    n_voted = np.zeros(len(vm.item_ids), dtype=np.int32)

    def count(rows: slice) -> None:
        part = n_voted[rows]
        for j in range(len(vm.models)):
            part += vm.codes[rows, j] != NO_VOTE

    workers.map(count, row_slices(len(n_voted), workers.threads))
    return n_voted


# Up to this many other models, a row's agreeing models are one bit mask and its list is looked
# up in a table of the masks that occur; beyond it, the lists are built from the flags.
MASK_BITS = 16


def _agree_lists(
    agree: Sequence[npt.NDArray[np.bool_]], names: Sequence[str], n_rows: int
) -> tuple[Counts, pa.ListArray]:
    """Per row: how many of the models `names` agree (`agree[c]`: whether model c does), and
    which, in their (sorted) order."""
    if len(names) > MASK_BITS:
        flags = np.column_stack(agree) if agree else np.zeros((n_rows, 0), dtype=bool)
        n_agree = flags.sum(axis=1, dtype=np.int32)
        offsets = np.zeros(n_rows + 1, dtype=np.int32)
        np.cumsum(n_agree, out=offsets[1:])
        # Row-major nonzero walks each row's agreeing columns in (sorted) model order.
        values = pa.array(list(names), pa.string()).take(pa.array(np.nonzero(flags)[1]))
        return n_agree, pa.ListArray.from_arrays(pa.array(offsets), values)
    mask = np.zeros(n_rows, dtype=np.uint16)
    for bit, flag in enumerate(agree):
        mask |= flag.astype(np.uint16) << np.uint16(bit)
    used = np.flatnonzero(np.bincount(mask, minlength=1 << len(names)))
    lists: list[list[str]] = [[] for _ in range(1 << len(names))]
    for m in used.tolist():
        lists[m] = [name for bit, name in enumerate(names) if m >> bit & 1]
    table = pa.array(lists, pa.list_(pa.string()))
    sizes = np.array([len(x) for x in lists], dtype=np.int32)
    # Arrow takes with int32 indices more than twice as fast as with uint8 ones.
    return sizes[mask], table.take(pa.array(mask.astype(np.int32)))


def _crosscheck_of(vm: VoteMatrix, me: int, n_voted: Counts) -> pa.Table:
    """Model `me`'s cross-check table from the batch's vote matrix."""
    result = vm.results[me]
    rows: slice | npt.NDArray[np.int64]
    if vm.whole[me]:
        # The model's rows are the matrix's, in order: no row to pick or move.
        own, rows = result, slice(None)
    else:
        # Its rows put in matrix (item_id) order; its scores survive null predictions.
        order = np.argsort(vm.rows[me], kind="stable")
        own = result.take(pa.array(order))
        rows = vm.rows[me][order]
    mine = vm.codes[rows, me]
    voted = mine != NO_VOTE
    others = [j for j in range(len(vm.models)) if j != me]
    agree = []
    for j in others:
        same = np.equal(vm.codes[rows, j], mine)
        same &= voted
        agree.append(same)
    n_agree, agree_models = _agree_lists(agree, [vm.models[j] for j in others], len(mine))
    return pa.table(
        [
            own.column("item_id"),
            own.column("prediction").cast(pa.string()),
            own.column("score"),
            pa.array(n_voted[rows] - voted),
            pa.array(n_agree),
            agree_models,
        ],
        schema=CROSSCHECK_SCHEMA,
    )


def load_crosscheck(path: str) -> CrosscheckFn:
    """Resolve a "module:function" import path to the cross-check function it names.

    Raises ConfigError naming the path when it is malformed, the module cannot be imported,
    or the attribute is missing or not callable.
    """
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"cross-check {path!r}: expected 'module:function'")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cross-check {path!r}: cannot import {module_name!r}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ConfigError(
                f"cross-check {path!r}: {module_name!r} has no {attr_path!r}"
            ) from None
    if not callable(target):
        raise ConfigError(f"cross-check {path!r}: {attr_path!r} is not callable")
    return target
