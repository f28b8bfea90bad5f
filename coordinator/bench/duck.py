"""The cross-check and the aggregation as a user would write them in DuckDB: the anchor of the
benchmark's cross-check and aggregation rows.

The same two steps as the agents, on the same files, with the same outputs:

1. cross-check: the models' zstd Parquet files in, one `crosscheck_<model>.parquet` per model
   out (per item of that model, sorted by item_id: its prediction and score, how many other
   models predicted the item, how many agree, and which, sorted by name);
2. aggregation: the cross-check files in, the majority vote (ties: the higher mean score, then
   the smaller label) out as `aggregates.parquet` and the COPY CSV `aggregates.csv`
   (`batch_id` first, a header, an item nobody predicted with confidence 0).

DuckDB runs with `SET threads = N`, the agents' thread count, and writes zstd level 3 as the
SDK does. tests/unit/test_duck_anchor.py checks that its files hold the same rows as ours.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DuckTimes", "aggregate", "connect", "crosscheck", "run"]

CROSSCHECK = "crosscheck_{model}.parquet"
PARQUET_OPTIONS = "FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 3"


def _lit(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def connect(threads: int) -> Any:
    """A DuckDB connection in memory running `threads` threads."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {int(threads)}")
    return con


def crosscheck(sources: Mapping[str, Path], out: Path, *, threads: int) -> list[Path]:
    """Write `out/crosscheck_<model>.parquet` for every model of `sources` (model -> its
    result file); return the paths.

    One wide table, a row per item and a prediction, score and has-a-row column per model
    (the files joined on item_id), then one COPY per model: of the plans tried at 1 M items,
    the fastest (a self-join of all rows grouped by item and label took 1.7x as long)."""
    con = connect(threads)
    try:
        models = list(sources)
        n = len(models)
        ids = [f"t{i}.item_id" for i in range(n)]
        cols = ", ".join(
            f"t{i}.prediction AS p{i}, t{i}.score AS s{i}, t{i}.item_id IS NOT NULL AS h{i}"
            for i in range(n)
        )
        joined = f"read_parquet({_lit(str(sources[models[0]]))}) t0" + "".join(
            f" FULL JOIN read_parquet({_lit(str(sources[m]))}) t{i}"
            f" ON t{i}.item_id = coalesce({', '.join(ids[:i])})"
            for i, m in enumerate(models)
            if i
        )
        item_id = f"coalesce({', '.join(ids)})" if n > 1 else ids[0]
        con.execute(f"CREATE TEMP TABLE w AS SELECT {item_id} AS item_id, {cols} FROM {joined}")
        paths = []
        for j, m in enumerate(models):
            others = [i for i in range(n) if i != j]
            n_others = " + ".join(f"(p{i} IS NOT NULL)::INTEGER" for i in others) or "0"
            agree = (
                "list_filter(["
                + ", ".join(f"CASE WHEN p{i} = p{j} THEN {_lit(models[i])} END" for i in others)
                + "], x -> x IS NOT NULL)"
                if others
                else "[]::VARCHAR[]"
            )
            path = out / CROSSCHECK.format(model=m)
            con.execute(
                f"COPY (SELECT item_id, p{j} AS prediction, s{j} AS score, "
                f"({n_others})::INTEGER AS n_others, len({agree})::INTEGER AS n_agree, "
                f"{agree} AS agree_models FROM w WHERE h{j} ORDER BY item_id) "
                f"TO {_lit(str(path))} ({PARQUET_OPTIONS})"
            )
            paths.append(path)
        return paths
    finally:
        con.close()


def aggregate(crosschecks: Sequence[Path], out: Path, batch_id: str, *, threads: int) -> None:
    """Write `out/aggregates.parquet` and `out/aggregates.csv` from the cross-check files."""
    con = connect(threads)
    try:
        files = "[" + ", ".join(_lit(str(p)) for p in crosschecks) + "]"
        # Per item and label (a null label too, so an item nobody predicted keeps its row):
        # the votes and the mean score, a NaN score counting as none, as a null one does.
        con.execute(
            "CREATE TEMP TABLE per AS SELECT item_id, prediction, count(prediction) AS votes, "
            "avg(score) FILTER (WHERE NOT isnan(score)) AS mean "
            f"FROM read_parquet({files}) GROUP BY item_id, prediction"
        )
        con.execute(
            "CREATE TEMP TABLE items AS SELECT item_id, consensus, votes, n_models, "
            "CASE WHEN n_models > 0 THEN votes / n_models END AS confidence FROM ("
            "SELECT item_id, "
            "first(prediction ORDER BY votes DESC, mean DESC NULLS LAST, prediction) "
            "FILTER (WHERE prediction IS NOT NULL) AS consensus, "
            "max(votes)::INTEGER AS votes, sum(votes)::INTEGER AS n_models "
            "FROM per GROUP BY item_id) ORDER BY item_id"
        )
        con.execute(f"COPY items TO {_lit(str(out / 'aggregates.parquet'))} ({PARQUET_OPTIONS})")
        con.execute(
            f"COPY (SELECT {_lit(batch_id)} AS batch_id, item_id, consensus, votes, n_models, "
            "coalesce(confidence, 0) AS confidence FROM items) "
            f"TO {_lit(str(out / 'aggregates.csv'))} (FORMAT csv, HEADER)"
        )
    finally:
        con.close()


@dataclass(frozen=True)
class DuckTimes:
    """Wall seconds of each step."""

    crosscheck_s: float
    aggregate_s: float


def run(sources: Mapping[str, Path], out: Path, batch_id: str, *, threads: int) -> DuckTimes:
    """Both steps, timed: the cross-check files into `out`, then the aggregates from them."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = crosscheck(sources, out, threads=threads)
    t1 = time.perf_counter()
    aggregate(paths, out, batch_id, threads=threads)
    return DuckTimes(t1 - t0, time.perf_counter() - t1)
