"""Cross-check functions for tests, loaded by real agents through `[crosscheck] function`
(agents run with the repository root as their working directory, so `tests.plugins` imports)."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from agents.crosscheck import crosscheck


def crosscheck_duplicating_slm3(model: str, tables: Mapping[str, pa.Table]) -> pa.Table:
    """The default cross-check, except that slm-3's result repeats its first item: a plug-in
    bug that only the aggregation, which needs one row per item and model, can notice."""
    out = crosscheck(model, tables)
    if model == "slm-3" and out.num_rows:
        out = pa.concat_tables([out, out.slice(0, 1)])
    return out
