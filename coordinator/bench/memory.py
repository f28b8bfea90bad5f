"""The memory budget at the seed's upper size: 7 models x 400 MB of zstd Parquet, one agent.

The batch is generated as the SDK writes results (sorted by item_id, the sorting metadata
set, zstd 3), one row group of 2^20 rows at a time, so the generator never holds a model's
file either. A child process then runs a real `Agent`'s steps on it as the coordinator would
ask them (stage, cross-check of all 7 models, aggregate) with `agents.memory_budget` set,
and reports each step's reply: its seconds, its peak RSS (the agent's own VmHWM, reset
before each step) and the ranges of item ids it worked in. The row compares the highest
peak with the budget (target: at most the budget).

No database and no daemon: the steps are the agent's, called in its process as `serve` calls
them; the coordinator's COPY of the rows is measured in the ingest row.

    python -m coordinator.bench.memory CONFIG BATCH_ID   (the child; prints JSON)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coordinator.core import files

__all__ = ["GROUP_ROWS", "generate", "rows_for", "run_agent_steps"]

GROUP_ROWS = 1 << 20
LABELS = pa.array(["cat", "dog", "emu", "fox", "gnu", "yak"], pa.string())
ACCURACY = (0.93, 0.91, 0.89, 0.87, 0.85, 0.83, 0.8)


def _ids(start: int, n: int) -> pa.Array:
    digits = pc.utf8_lpad(
        pa.array(np.arange(start, start + n, dtype=np.int64)).cast(pa.string()), 10, "0"
    )
    return pc.binary_join_element_wise(pa.scalar("item-"), digits, pa.scalar(""))


def _group(start: int, n: int, rng: np.random.Generator, models: list[str]) -> dict[str, pa.Table]:
    ids = _ids(start, n)
    truth = rng.integers(0, len(LABELS), n)
    out = {}
    for j, model in enumerate(models):
        right = rng.random(n) < ACCURACY[j % len(ACCURACY)]
        shift = rng.integers(1, len(LABELS), n)
        pred = np.where(right, truth, (truth + shift) % len(LABELS))
        score = np.where(right, rng.uniform(0.5, 1.0, n), rng.uniform(0.2, 0.8, n))
        out[model] = pa.table(
            {
                "item_id": ids,
                "prediction": LABELS.take(pa.array(pred)),
                "score": pa.array(score, pa.float64()),
            }
        )
    return out


def rows_for(mb: float, models: list[str], seed: int = 11) -> int:
    """About how many rows make each model's file `mb` MB (1e6 bytes) as `generate` writes it."""
    n = min(GROUP_ROWS, max(1000, int(mb * 1e6 / 8)))
    table = _group(0, n, np.random.default_rng(seed), models[:1])[models[0]]
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **files.write_options(table, sorted_by_id=True))
    per_row = buf.getvalue().size / n
    return max(100, int(mb * 1e6 / per_row))


def generate(folder: Path, models: list[str], rows: int, seed: int = 11) -> int:
    """Write each model's file `<model>.parquet` of `rows` rows into `folder`, as the SDK
    writes them; return their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = _group(0, 1, np.random.default_rng(0), models)[models[0]].schema
    writers = {
        m: pq.ParquetWriter(
            folder / f"{m}.parquet", schema, **files.write_options(schema, sorted_by_id=True)
        )
        for m in models
    }
    try:
        for start in range(0, rows, GROUP_ROWS):
            for m, table in _group(start, min(GROUP_ROWS, rows - start), rng, models).items():
                writers[m].write_table(table)
    finally:
        for w in writers.values():
            w.close()
    return sum((folder / f"{m}.parquet").stat().st_size for m in models)


def run_agent_steps(config: Path, batch_id: str, timeout: float = 3600.0) -> dict[str, Any]:
    """Run the child (this module) on `batch_id` under `config`; what it printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.bench.memory", str(config), batch_id],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the agent's steps failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _child(config: Path, batch_id: str) -> dict[str, Any]:
    from agents.agent import Agent
    from coordinator.core.config import load_config
    from coordinator.core.logs import configure
    from coordinator.core.messages import Aggregate, Crosscheck, Stage

    configure("warning", "json")
    cfg = load_config(config)
    agent = Agent(cfg, 0)
    models = tuple(cfg.node(0).models)
    out: dict[str, Any] = {"budget": cfg.agents.memory_budget, "threads": agent.threads}
    t0 = time.perf_counter()
    staged = agent.stage(Stage(batch_id=batch_id, files=tuple(f"{m}.parquet" for m in models)))
    out["stage"] = {
        "seconds": time.perf_counter() - t0,
        "peak_rss": staged.peak_rss,
        "bytes": staged.bytes,
    }
    out["compressed_bytes"] = staged.compressed_bytes
    out["decoded_bytes"] = staged.decoded_bytes
    t0 = time.perf_counter()
    checked = agent.crosscheck(Crosscheck(batch_id=batch_id, models=models))
    out["crosscheck"] = {
        "seconds": time.perf_counter() - t0,
        "peak_rss": checked.peak_rss,
        "ranges": checked.ranges,
    }
    idents = {f"crosscheck_{m}.parquet": ident for m, ident in checked.idents.items()}
    t0 = time.perf_counter()
    agg = agent.aggregate(Aggregate(batch_id=batch_id, models=models, idents=idents))
    out["aggregate"] = {
        "seconds": time.perf_counter() - t0,
        "peak_rss": agg.peak_rss,
        "ranges": agg.ranges,
        "rows": agg.summary.get("rows"),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m coordinator.bench.memory CONFIG BATCH_ID", file=sys.stderr)
        return 2
    print(json.dumps(_child(Path(args[0]), args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
