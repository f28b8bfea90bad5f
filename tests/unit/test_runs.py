"""daemon.runs: the one registry of batches and the only writer of a batch's state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.core.batch import FINAL, State, may_move
from coordinator.core.config import Config
from coordinator.core.errors import CoordinatorError
from coordinator.daemon.runs import BatchRun, Runs


def run_in(state: State, batch_id: str = "b1") -> BatchRun:
    now = time.time()
    return BatchRun(batch_id, Config(), state, now, now + 60)


def registry() -> tuple[Runs, list[tuple[str, bool]]]:
    calls: list[tuple[str, bool]] = []
    return Runs(on_finished=lambda r, count: calls.append((r.batch_id, count))), calls


@pytest.mark.parametrize("current", list(State))
@pytest.mark.parametrize("new", list(State))
def test_move_follows_the_transition_rule_exactly(current: State, new: State) -> None:
    runs, _ = registry()
    run = runs.add(run_in(current))
    if may_move(current, new):
        runs.move(run, new)
        assert run.state is new
    else:
        with pytest.raises(CoordinatorError, match=f"{current.value} -> {new.value} is not a move"):
            runs.move(run, new)
        assert run.state is current


def test_settle_takes_the_ledgers_final_word_and_nothing_else() -> None:
    runs, _ = registry()
    run = runs.add(run_in(State.AGGREGATING))
    runs.settle(run, State.DONE)  # finished in an earlier life: not a move this run makes
    assert run.state is State.DONE
    for state in set(State) - FINAL:
        with pytest.raises(CoordinatorError, match="not a final state"):
            runs.settle(run_in(State.AGGREGATING), state)


def test_finish_takes_a_batch_out_of_flight_and_remembers_how_it_ended() -> None:
    runs, calls = registry()
    done, failed, again = (runs.add(run_in(State.WAITING, b)) for b in ("d", "f", "a"))
    assert {r.batch_id for r in runs.unfinished()} == {"d", "f", "a"}
    runs.settle(done, State.DONE)
    runs.finish(done)
    runs.move(failed, State.FAILED)
    runs.finish(failed)
    runs.settle(again, State.DEGRADED)
    runs.finish(again, count=False)
    assert len(runs) == 0 and "d" not in runs and runs.get("d") is None
    assert calls == [("d", True), ("f", True), ("a", False)]
    assert runs.ended == {"d": State.DONE, "a": State.DEGRADED}
    assert runs.ignored == {"f"}  # a failed batch's folder stays for the operator
    assert [f["batch_id"] for f in runs.finished] == ["a", "f", "d"]  # newest first
    assert all("finished_at" in f and "timings" in f for f in runs.finished)


def test_the_finished_list_keeps_the_last_ten() -> None:
    runs, _ = registry()
    for i in range(12):
        run = runs.add(run_in(State.WAITING, f"b{i}"))
        runs.move(run, State.FAILED)
        runs.finish(run)
    assert [f["batch_id"] for f in runs.finished] == [f"b{i}" for i in range(11, 1, -1)]


def test_describe_is_what_status_shows(tmp_path: Path) -> None:
    run = run_in(State.STAGING)
    run.present, run.missing = ("m1",), ("m2",)
    run.placement = {"0": {"fraction": 0.99}, "below_min": ["1"]}
    d = run.describe()
    assert d["state"] == "staging" and d["present"] == ["m1"] and d["missing"] == ["m2"]
    assert d["placement"] == {"0": 0.99}  # the flag list is not a node
    assert 59 < d["deadline_in_s"] <= 60
