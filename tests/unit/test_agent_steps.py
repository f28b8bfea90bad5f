"""The aggregating agent's two steps called directly (no socket): aggregate the batch into its
node-local folder, then archive the batch into the lake from there."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents import slm
from agents.agent import Agent
from coordinator.core.config import load_config
from coordinator.core.errors import CoordinatorError, StagingError
from coordinator.core.messages import Aggregate, Archive, Crosscheck, Stage
from coordinator.core.summary import AggregateFiles
from tests.conftest import agent_config

MODELS = ["slm-1", "slm-2", "slm-3"]


def table(seed: int) -> pa.Table:
    ids = [f"i{k:03d}" for k in range(50)]
    labels = ["a", "b", "c"]
    return pa.table(
        {
            "item_id": ids,
            "prediction": [labels[(k * seed) % 3] for k in range(50)],
            "score": [0.5 + seed / 10] * 50,
        }
    )


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    """Node 1's agent with batch b1 published, staged into its tmpfs and cross-checked."""
    cfg = agent_config(tmp_path, f"{tmp_path / 'shm'}/node{{node}}", 1, MODELS)
    a = Agent(load_config(cfg), 1)
    a.tmpfs.mkdir(parents=True)
    (a.config.paths.staging / "b1").mkdir(parents=True)
    for i, m in enumerate(MODELS):
        slm.publish(a.config.paths.staging, "b1", m, table(i + 1))
    a.stage(Stage(batch_id="b1", files=tuple(f"{m}.parquet" for m in MODELS)))
    a.crosscheck(Crosscheck(batch_id="b1", models=tuple(MODELS)))
    return a


def test_aggregate_then_archive_puts_the_whole_batch_in_the_lake(agent: Agent) -> None:
    reply = agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    # What the coordinator accepts: relative paths, the batch's own files.
    files = AggregateFiles.from_reply(
        reply, 1, "b1", via="tmpfs", rows_root=agent.tmpfs, local_root=agent.tmpfs
    )
    assert files.rows_csv == agent.tmpfs / "b1" / "aggregates.csv"
    assert files.summary.rows == 50
    archived = agent.archive(Archive(batch_id="b1", date="2026-11-28", models=tuple(MODELS)))
    assert archived.lake_path == "batches/date=2026-11-28/batch=b1"  # relative to the root
    lake = Path(agent.config.paths.lake).resolve() / archived.lake_path
    names = sorted(p.name for p in lake.iterdir())
    assert names == sorted(
        [f"{m}.parquet" for m in MODELS]
        + [f"crosscheck_{m}.parquet" for m in MODELS]
        + ["aggregates.parquet"]
    )
    assert (lake / "aggregates.parquet").read_bytes() == files.parquet.read_bytes()
    assert archived.bytes == sum(p.stat().st_size for p in lake.iterdir())


def test_the_archive_takes_the_counted_content_from_node_memory_not_a_rewrite(
    agent: Agent,
) -> None:
    """A model's file rewritten in staging after it was staged: the lake gets the staged copy
    (what the barrier counted and the batch was computed from)."""
    agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    staged = (agent.tmpfs / "b1" / "slm-2.parquet").read_bytes()
    pq.write_table(table(9), agent.config.paths.staging / "b1" / "slm-2.parquet")
    archived = agent.archive(Archive(batch_id="b1", date="2026-11-28", models=tuple(MODELS)))
    assert (
        Path(agent.config.paths.lake).resolve() / archived.lake_path / "slm-2.parquet"
    ).read_bytes() == staged


def test_without_its_node_copy_the_archive_falls_back_to_staging(agent: Agent) -> None:
    agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    (agent.tmpfs / "b1" / "slm-3.parquet").unlink()
    archived = agent.archive(Archive(batch_id="b1", date="2026-11-28", models=tuple(MODELS)))
    in_staging = (agent.config.paths.staging / "b1" / "slm-3.parquet").read_bytes()
    assert (
        Path(agent.config.paths.lake).resolve() / archived.lake_path / "slm-3.parquet"
    ).read_bytes() == in_staging


@pytest.mark.parametrize("gone", ["aggregates.parquet", "crosscheck_slm-2.parquet"])
def test_an_archive_without_what_was_aggregated_is_refused_and_writes_nothing(
    agent: Agent, gone: str
) -> None:
    """The coordinator aggregates again when this happens; the lake shows no half batch."""
    agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    (agent.tmpfs / "b1" / gone).unlink()
    with pytest.raises(StagingError, match=rf"{re.escape(gone)} is gone from node memory"):
        agent.archive(Archive(batch_id="b1", date="2026-11-28", models=tuple(MODELS)))
    assert agent.lake.list_batch("b1", "2026-11-28") == []


@pytest.mark.parametrize("date", ["../../etc", "2026-11-28/x", "", "28.11.2026"])
def test_an_archive_date_that_is_not_a_day_is_refused(agent: Agent, date: str) -> None:
    agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    with pytest.raises(CoordinatorError, match="YYYY-MM-DD"):
        agent.archive(Archive(batch_id="b1", date=date, models=tuple(MODELS)))
    assert not (Path(agent.config.paths.lake) / "batches").exists()
