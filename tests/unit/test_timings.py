"""A batch's timings: the ledger's flat keys, built, read back and ordered."""

from __future__ import annotations

import json
import time

import pytest

from coordinator.core.timings import Phase, Timings, parse_key

# A ledger row's `timings` as the daemon wrote it before this module existed, in the order the
# pipeline set the keys (two nodes, aggregated and archived on node 1).
LEDGER = {
    "barrier_wait_ms": 1520.125,
    "staging_node0_ms": 30.5,
    "staging_node1_ms": 29.75,
    "staging_ms": 35.0,
    "crosscheck_node0_ms": 110.0,
    "crosscheck_node1_ms": 101.25,
    "crosscheck_ms": 250.5,
    "aggregate_ms": 80.0,
    "aggregate_node1_ms": 75.5,
    "commit_ms": 40.25,
    "archive_ms": 60.0,
    "archive_node1_ms": 55.0,
    "cleanup_ms": 5.5,
}


def test_the_keys_are_spelled_as_the_ledger_has_them() -> None:
    assert [p.key() for p in Phase] == [
        "barrier_wait_ms",
        "staging_ms",
        "crosscheck_ms",
        "aggregate_ms",
        "commit_ms",
        "archive_ms",
        "cleanup_ms",
    ]
    for p in Phase:
        for n in (0, 1, 7, 12):
            assert p.key(n) == f"{p.value}_node{n}_ms"


def test_set_builds_exactly_the_flat_object_the_ledger_holds() -> None:
    t = Timings()
    t.set(Phase.BARRIER_WAIT, 1520.125)
    t.set(Phase.STAGING, 30.5, node=0).set(Phase.STAGING, 29.75, node=1)
    t.set(Phase.STAGING, 35.0)
    t.set(Phase.CROSSCHECK, 110.0, node=0).set(Phase.CROSSCHECK, 101.25, node=1)
    t.set(Phase.CROSSCHECK, 250.5)
    t.set(Phase.AGGREGATE, 80.0).set(Phase.AGGREGATE, 75.5, node=1)
    t.set(Phase.COMMIT, 40.25)
    t.set(Phase.ARCHIVE, 60.0).set(Phase.ARCHIVE, 55.0, node=1)
    t.set(Phase.CLEANUP, 5.5)
    assert t.to_json() == LEDGER
    assert list(t.to_json()) == list(LEDGER)  # the order they were set in
    assert json.dumps(t.to_json()) == json.dumps(LEDGER)


def test_the_ledger_object_round_trips() -> None:
    t = Timings.from_json(LEDGER)
    assert t.to_json() == LEDGER and list(t.to_json()) == list(LEDGER)
    assert Timings.from_json(t.to_json()) == t
    assert Timings.from_json(json.loads(json.dumps(LEDGER))) == t


def test_a_phase_set_again_keeps_the_last_value() -> None:
    t = Timings().set(Phase.STAGING, 1.0).set(Phase.STAGING, 2.0)
    assert t.to_json() == {"staging_ms": 2.0}


def test_whole_phases_come_in_pipeline_order() -> None:
    t = Timings.from_json(LEDGER)
    assert list(t.phases()) == [
        (Phase.BARRIER_WAIT, 1520.125),
        (Phase.STAGING, 35.0),
        (Phase.CROSSCHECK, 250.5),
        (Phase.AGGREGATE, 80.0),
        (Phase.COMMIT, 40.25),
        (Phase.ARCHIVE, 60.0),
        (Phase.CLEANUP, 5.5),
    ]


def test_node_parts_come_in_pipeline_order_then_by_node() -> None:
    t = Timings.from_json(
        {"archive_node1_ms": 5.0, "staging_node10_ms": 3.0, "staging_node2_ms": 2.0, "x_ms": 1.0}
    )
    assert list(t.nodes()) == [
        (Phase.STAGING, 2, 2.0),
        (Phase.STAGING, 10, 3.0),
        (Phase.ARCHIVE, 1, 5.0),
    ]
    assert list(t.phases()) == []


def test_in_order_puts_each_phase_before_its_nodes_and_unknown_keys_last() -> None:
    shuffled = dict(reversed(list(LEDGER.items()))) | {"zzz_ms": 1.0, "copy_ms": 2.0}
    keys = [k for k, _ in Timings.from_json(shuffled).in_order()]
    assert keys == [
        "barrier_wait_ms",
        "staging_ms",
        "staging_node0_ms",
        "staging_node1_ms",
        "crosscheck_ms",
        "crosscheck_node0_ms",
        "crosscheck_node1_ms",
        "aggregate_ms",
        "aggregate_node1_ms",
        "commit_ms",
        "archive_ms",
        "archive_node1_ms",
        "cleanup_ms",
        "copy_ms",
        "zzz_ms",
    ]
    assert dict(Timings.from_json(shuffled).in_order()) == shuffled


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("staging_ms", (Phase.STAGING, None)),
        ("barrier_wait_ms", (Phase.BARRIER_WAIT, None)),
        ("staging_node0_ms", (Phase.STAGING, 0)),
        ("crosscheck_node12_ms", (Phase.CROSSCHECK, 12)),
        ("barrier_wait_node3_ms", (Phase.BARRIER_WAIT, 3)),
        ("staging", None),
        ("copy_ms", None),
        ("staging_node_ms", None),
        ("staging_node007_ms", None),  # not a key Phase.key makes: kept as it is
        ("staging_node-1_ms", None),
        ("Staging_ms", None),
        ("staging_nodex_ms", None),
    ],
)
def test_parse_key(key: str, parsed: tuple[Phase, int | None] | None) -> None:
    assert parse_key(key) == parsed
    if parsed is not None:
        assert parsed[0].key(parsed[1]) == key


def test_unknown_keys_are_kept_but_not_counted_as_phases() -> None:
    flat = {"staging_node007_ms": 1.0, "copy_ms": 2.0, "staging_ms": 3}
    t = Timings.from_json(flat)
    assert t.to_json() == flat
    assert list(t.phases()) == [(Phase.STAGING, 3.0)]
    assert list(t.nodes()) == []


@pytest.mark.parametrize("bad", ["12", None, True, [1.0], float("nan"), float("inf")])
def test_a_value_that_is_not_milliseconds_is_refused_naming_the_key(bad: object) -> None:
    with pytest.raises(ValueError, match="'staging_node1_ms'"):
        Timings.from_json({"staging_ms": 1.0, "staging_node1_ms": bad})


def test_set_keeps_microseconds_and_since_measures_from_a_perf_counter_reading() -> None:
    t = Timings().set(Phase.STAGING, 12.34567).set(Phase.STAGING, 1.0004, 1)
    assert t.to_json() == {"staging_ms": 12.346, "staging_node1_ms": 1.0}
    t0 = time.perf_counter() - 0.5  # half a second ago
    ms = Timings().since(Phase.COMMIT, t0).to_json()["commit_ms"]
    assert 500 <= ms < 60_000


def test_merge_takes_the_ledgers_values_and_later_sets_win() -> None:
    t = Timings().merge({"barrier_wait_ms": 7.0, "staging_node0_ms": 3.0})
    assert t.has(Phase.BARRIER_WAIT) and t.has(Phase.STAGING, 0)
    assert not t.has(Phase.STAGING) and not t.has(Phase.STAGING, 1)
    t.set(Phase.STAGING, 4.0, 0)
    assert t.to_json() == {"barrier_wait_ms": 7.0, "staging_node0_ms": 4.0}
    with pytest.raises(ValueError, match="'commit_ms'"):
        t.merge({"commit_ms": "soon"})
