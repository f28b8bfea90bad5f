"""Small result tables for the aggregation, cross-check and ledger tests."""

from __future__ import annotations

import pyarrow as pa

Row = tuple[str, str | None, float | None]


def result(rows: list[Row], *, with_score: bool = True) -> pa.Table:
    """A model's result table from (item_id, prediction, score) rows."""
    columns: dict[str, pa.Array] = {
        "item_id": pa.array([r[0] for r in rows], pa.string()),
        "prediction": pa.array([r[1] for r in rows], pa.string()),
    }
    if with_score:
        columns["score"] = pa.array([r[2] for r in rows], pa.float64())
    return pa.table(columns)
