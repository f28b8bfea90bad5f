"""The default cross-check: one model's result validated against the other models' results.

Pure: the staging agent reads the node-local copies, calls the configured cross-check function
(an import path "module:function", by default "agents.crosscheck:crosscheck") and publishes
what it returns as `crosscheck_<model>.parquet`. The output keeps `item_id`, `prediction` and
`score`, so the coordinator aggregates cross-check files exactly like the models' results.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa

from agents.consensus import NO_VOTE, normalise_result, vote_matrix
from coordinator.core.errors import ConfigError

__all__ = [
    "CROSSCHECK_SCHEMA",
    "DEFAULT_CROSSCHECK",
    "CrosscheckFn",
    "crosscheck",
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
    me = vm.models.index(model)
    # The model's own rows, put in matrix (item_id) order; its scores survive null predictions.
    order = np.empty(len(vm.item_ids), dtype=np.int64)
    order[vm.rows[me]] = np.arange(len(order), dtype=np.int64)
    own = normalise_result(model, tables[model]).take(pa.array(order))
    others = [j for j in range(len(vm.models)) if j != me]
    mine = vm.codes[:, me : me + 1]
    their = vm.codes[:, others]
    predicted = their != NO_VOTE
    agree = predicted & (their == mine) & (mine != NO_VOTE)

    n_agree = agree.sum(axis=1, dtype=np.int32)
    offsets = np.zeros(len(n_agree) + 1, dtype=np.int32)
    np.cumsum(n_agree, out=offsets[1:])
    # Row-major nonzero walks each row's agreeing columns in (sorted) model order.
    names = pa.array([vm.models[j] for j in others], pa.string())
    agree_models = pa.ListArray.from_arrays(
        pa.array(offsets), names.take(pa.array(np.nonzero(agree)[1]))
    )
    return pa.table(
        [
            own.column("item_id"),
            own.column("prediction"),
            own.column("score"),
            pa.array(predicted.sum(axis=1, dtype=np.int32)),
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
