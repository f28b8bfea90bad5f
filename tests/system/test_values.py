"""End-to-end values (issue 18, item 7): what the real daemon commits to PostgreSQL equals an
independent vote over the tables the models published.

The expected values are computed here in plain Python (dicts, collections.Counter, math), from
the rules as docs/protocol.md and the aggregation's docstrings state them, not with
coordinator/aggregate.py:
- an item is every item id any model published; a model votes on an item when it has a row for
  it with a non-null prediction;
- the consensus is the label with the most votes; a tie goes to the label whose voters have the
  higher mean score (null and NaN scores left out; a label with any score beats one with none),
  then to the smaller label (code point order);
- `votes` counts the winner's votes, `n_models` the models voting, `confidence` their ratio;
  an item nobody voted on has a null consensus, 0 votes, 0 models and confidence 0;
- agreement of a pair: the share of the items both voted on where they voted alike (null when
  they share none); a model's consensus agreement: the share of its votes that are the
  consensus; Fleiss' kappa over the items every model voted on.
The data mixes hand-made cases for each rule with a few hundred random items.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from itertools import combinations
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import MODELS
from tests.faultlib import FINAL, db_rows, lake_dirs, ledger, place, publish

Vote = tuple[str | None, float | None]  # (prediction, score) of one model for one item
Batch = dict[str, dict[str, Vote]]  # model -> item_id -> vote
NAN = float("nan")
Rank = tuple[bool, float, str]  # (no score at all, minus the mean score, label): smallest wins
NO_SCORE_COLUMN = "slm-6"  # this model publishes no `score` column at all


def handmade() -> Batch:
    """One item per rule; a model not named has no row for the item."""
    m = MODELS  # slm-1 .. slm-7
    cases: dict[str, dict[str, Vote]] = {
        # plain majority
        "h-clear": {**dict.fromkeys(m[:5], ("a", 0.1)), m[5]: ("b", None), m[6]: ("b", 0.99)},
        # 3:3, the higher mean score wins over the smaller label; a null prediction abstains
        "h-tie-score": {
            **dict.fromkeys(m[:3], ("a", 0.2)),
            **dict.fromkeys((m[3], m[4], m[6]), ("b", 0.9)),
            m[5]: (None, 0.99),
        },
        # 2:2 with equal means: the smaller label
        "h-tie-label": {m[0]: ("z", 0.5), m[1]: ("z", 0.5), m[2]: ("y", 0.5), m[3]: ("y", 0.5)},
        # 2:2, one label's voters have no score at all: the scored label wins though larger
        "h-tie-scored": {m[0]: ("m", None), m[1]: ("m", None), m[2]: ("n", 0.1), m[3]: ("n", 0.1)},
        # 2:2, both unscored (slm-6 publishes no score column): the smaller label
        "h-tie-unscored": {
            m[5]: ("k", None),
            m[0]: ("k", None),
            m[1]: ("j", None),
            m[2]: ("j", None),
        },
        # NaN and null scores are left out of the mean: p = 0.3, q = 0.4
        "h-nan": {m[0]: ("p", NAN), m[1]: ("p", 0.3), m[2]: ("q", 0.4), m[3]: ("q", None)},
        # nobody votes
        "h-all-null": dict.fromkeys(m, (None, 0.5)),
        # one voter only
        "h-one": {m[6]: ("solo", 0.7)},
        # labels that need care on the way: an empty string (not null), a comma, a quote, UTF-8
        "h-empty": {m[0]: ("", 0.6), m[1]: ("", 0.6), m[2]: ("x", 0.1)},
        "h-quote": {m[0]: ('say "hi", twice', 0.5), m[1]: ('say "hi", twice', 0.5)},
        "h-utf8": {m[0]: ("é", 0.5), m[1]: ("é", 0.5), m[2]: ("z", 0.5), m[3]: ("z", 0.5)},
        # a three-way tie
        "h-three": {m[0]: ("c", 0.5), m[1]: ("b", 0.5), m[2]: ("a", 0.25), m[3]: ("d", None)},
    }
    out: Batch = {x: {} for x in m}
    for item, votes in cases.items():
        for model, vote in votes.items():
            out[model][item] = vote
    return out


def random_items(seed: int, n: int = 400) -> Batch:
    """Random items over three labels, with missing rows, null predictions, scores on a coarse
    grid (so equal means happen) and null scores."""
    rnd = random.Random(seed)
    out: Batch = {x: {} for x in MODELS}
    for k in range(n):
        item = f"r{k:06d}"
        for model in MODELS:
            roll = rnd.random()
            if roll < 0.08:
                continue  # no row
            pred = None if roll < 0.13 else rnd.choice(["cat", "dog", "emu"])
            score = None if rnd.random() < 0.1 else rnd.choice([0.25, 0.5, 0.75])
            out[model][item] = (pred, score)
    return out


def merged(*parts: Batch) -> Batch:
    return {m: {k: v for p in parts for k, v in p[m].items()} for m in MODELS}


def to_table(model: str, rows: dict[str, Vote]) -> pa.Table:
    """A model's published table, rows in a shuffled order (ids need not be sorted)."""
    ids = sorted(rows)
    random.Random(model).shuffle(ids)
    cols: dict[str, pa.Array] = {
        "item_id": pa.array(ids, pa.string()),
        "prediction": pa.array([rows[i][0] for i in ids], pa.string()),
    }
    if model != NO_SCORE_COLUMN:
        cols["score"] = pa.array([rows[i][1] for i in ids], pa.float64())
    return pa.table(cols)


def voters(batch: Batch, item: str) -> list[tuple[str, str, float | None]]:
    """(model, label, usable score or None) of each model voting on `item`, in model order."""
    out = []
    for model in sorted(batch):
        vote = batch[model].get(item)
        if vote is None or vote[0] is None:
            continue
        score = None if model == NO_SCORE_COLUMN else vote[1]
        if score is not None and math.isnan(score):
            score = None
        out.append((model, vote[0], score))
    return out


def expected_items(batch: Batch) -> dict[str, tuple[str | None, int, int, float, str]]:
    """item -> (consensus, votes, n_models, confidence, how the winner was decided)."""
    items = sorted({i for rows in batch.values() for i in rows})
    out = {}
    for item in items:
        ballots = voters(batch, item)
        if not ballots:
            out[item] = (None, 0, 0, 0.0, "nobody")
            continue
        counts = Counter(label for _, label, _ in ballots)
        top = max(counts.values())
        tied = [label for label, c in counts.items() if c == top]

        def rank(label: str, ballots: list[tuple[str, str, float | None]] = ballots) -> Rank:
            scores = [s for _, lab, s in ballots if lab == label and s is not None]
            total = 0.0
            for s in scores:
                total += s
            mean = total / len(scores) if scores else 0.0
            return (not scores, -mean, label)

        winner = min(tied, key=rank)
        if len(tied) == 1:
            how = "majority"
        else:
            ranks = sorted(rank(label) for label in tied)
            if ranks[0][0] != ranks[1][0]:
                how = "scored"
            elif ranks[0][1] != ranks[1][1]:
                how = "mean score"
            else:
                how = "label"
        out[item] = (winner, top, len(ballots), top / len(ballots), how)
    return out


def expected_agreement(batch: Batch) -> dict[tuple[str, str], tuple[float | None, int]]:
    def votes_of(model: str) -> dict[str, str]:
        return {i: p for i, (p, _) in batch[model].items() if p is not None}

    out = {}
    for a, b in combinations(sorted(batch), 2):
        va, vb = votes_of(a), votes_of(b)
        common = set(va) & set(vb)
        agree = sum(va[i] == vb[i] for i in common)
        out[(a, b)] = (agree / len(common) if common else None, len(common))
    return out


def expected_consensus_agreement(batch: Batch, items: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for model in sorted(batch):
        mine = [(i, p) for i, (p, _) in batch[model].items() if p is not None]
        same = sum(items[i][0] == p for i, p in mine)
        out[model] = same / len(mine) if mine else None
    return out


def expected_kappa(batch: Batch) -> float | None:
    """Fleiss (1971) over the items every model voted on."""
    models = sorted(batch)
    n = len(models)
    everyone = [
        i
        for i in sorted({i for rows in batch.values() for i in rows})
        if all(batch[m].get(i, (None, None))[0] is not None for m in models)
    ]
    if n < 2 or not everyone:
        return None
    table = [Counter(batch[m][i][0] for m in models) for i in everyone]
    p_bar = sum((sum(c * c for c in row.values()) - n) / (n * (n - 1)) for row in table)
    p_bar /= len(everyone)
    totals: Counter[str] = Counter()
    for row in table:
        totals.update(row)
    p_e = sum((t / (len(everyone) * n)) ** 2 for t in totals.values())
    return 1.0 if p_e == 1.0 else (p_bar - p_e) / (1 - p_e)


@pytest.fixture
def batch() -> Iterator[Batch]:
    yield merged(handmade(), random_items(1871))


def test_the_committed_consensus_is_an_independent_majority_vote_over_the_published_tables(
    env, daemon, batch: Batch
) -> None:
    want = expected_items(batch)
    # The data exercises every rule (else this test would prove less than it says).
    assert {how for *_, how in want.values()} == {
        "majority",
        "mean score",
        "scored",
        "label",
        "nobody",
    }
    d = daemon().start()
    for model in MODELS:
        publish(env, "values", model, to_table(model, batch[model]))
    assert d.wait_state("values", FINAL, timeout=90)["state"] == "done", d.tail()
    check_committed(env, "values", batch, want)


def test_a_batch_over_the_memory_budget_is_voted_in_ranges_to_the_same_values(env, daemon) -> None:
    """With agents.memory_budget at its floor (64M, less than an agent holds before any work),
    the agent works the batch in ranges of item ids: the committed values are still those of
    the independent vote. Half the models are written without the SDK, unsorted and without
    sorting metadata (every range then passes over their files)."""
    batch = merged(handmade(), random_items(1872, n=50_000))
    want = expected_items(batch)
    env.write_config(agents={"memory_budget": "64M"})
    d = daemon().start()
    for i, model in enumerate(MODELS):
        table = to_table(model, batch[model])
        if i % 2:
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            place(env.staging / "ranges" / f"{model}.parquet", buf.getvalue().to_pybytes())
        else:
            publish(env, "ranges", model, table)
    assert d.wait_state("ranges", FINAL, timeout=120)["state"] == "done", d.tail()
    [usage] = db_rows(env, "SELECT work_ranges FROM {s}.node_usage WHERE batch_id = $1", "ranges")
    assert usage["work_ranges"] >= 2, usage
    check_committed(env, "ranges", batch, want)


def check_committed(
    env: Any, batch_id: str, batch: Batch, want: dict[str, tuple[Any, ...]]
) -> None:
    """What the daemon committed for `batch_id` (PostgreSQL and the lake) is `want` and the
    figures of the independent vote over `batch`."""
    rows = db_rows(
        env,
        "SELECT item_id, consensus, votes, n_models, confidence FROM {s}.aggregates"
        " WHERE batch_id = $1 ORDER BY item_id",
        batch_id,
    )
    got = {r["item_id"]: r for r in rows}
    assert sorted(got) == sorted(want)
    wrong = []
    for item, (consensus, votes, n_models, confidence, how) in want.items():
        r = got[item]
        if (r["consensus"], r["votes"], r["n_models"]) != (consensus, votes, n_models) or (
            r["confidence"] != pytest.approx(confidence, rel=1e-12, abs=0)
        ):
            wrong.append((item, how, (consensus, votes, n_models, confidence), r))
    assert not wrong, f"{len(wrong)} of {len(want)} items differ, e.g. {wrong[:5]}"

    pairs = db_rows(
        env,
        "SELECT model_a, model_b, agreement, n_common FROM {s}.model_agreement WHERE batch_id = $1",
        batch_id,
    )
    got_pairs = {(p["model_a"], p["model_b"]): (p["agreement"], p["n_common"]) for p in pairs}
    want_pairs = expected_agreement(batch)
    assert set(got_pairs) == set(want_pairs)
    for key, (agreement, n_common) in want_pairs.items():
        assert got_pairs[key][1] == n_common, key
        assert got_pairs[key][0] == pytest.approx(agreement, rel=1e-12), key

    row = ledger(env, batch_id)
    assert row is not None and row["rows"] == len(want)
    shares = row["consensus_agreement"]
    shares = json.loads(shares) if isinstance(shares, str) else shares
    for model, share in expected_consensus_agreement(batch, want).items():
        assert shares[model] == pytest.approx(share, rel=1e-12), model
    assert row["fleiss_kappa"] == pytest.approx(expected_kappa(batch), rel=1e-9)

    # The lake's aggregates.parquet carries the same values.
    [lake] = lake_dirs(env, batch_id)
    lake_rows = pq.read_table(lake / "aggregates.parquet").to_pylist()
    assert [(r["item_id"], r["consensus"], r["votes"], r["n_models"]) for r in lake_rows] == [
        (i, c, v, n) for i, (c, v, n, _, _) in sorted(want.items())
    ]
