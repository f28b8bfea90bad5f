"""The batch state machine and the barrier's decisions (pure functions)."""

from __future__ import annotations

import itertools

import pytest

from coordinator.core.batch import (
    FINAL,
    State,
    Step,
    barrier,
    classify,
    deadline_verdict,
    may_move,
    moves_into,
    resume_step,
)

MODELS = [f"slm-{i}" for i in range(1, 8)]

# The lifecycle as docs/protocol.md §2 writes it, spelled out rather than taken from the module.
PIPELINE = [
    "waiting",
    "ready",
    "staging",
    "staged",
    "crosschecking",
    "crosschecked",
    "aggregating",
    "committed",
    "archived",
    "done",
]


# --- classify ------------------------------------------------------------------------------


def test_classify_sorts_results_and_crosschecks_by_role() -> None:
    roles, ignored = classify(
        ["slm-1.parquet", "crosscheck_slm-1.parquet", "slm-7.parquet"], MODELS
    )
    assert roles == {
        "slm-1.parquet": "result",
        "crosscheck_slm-1.parquet": "crosscheck",
        "slm-7.parquet": "result",
    }
    assert ignored == []


def test_classify_skips_temp_files_silently() -> None:
    roles, ignored = classify(
        [".slm-1.parquet.tmp", ".slm-2.parquet", ".quarantine", ".crosscheck_slm-3.parquet"],
        MODELS,
    )
    assert roles == {}
    assert ignored == []


@pytest.mark.parametrize(
    ("name", "reason_part"),
    [
        ("notes.txt", "does not match"),
        ("slm-1.parquet.bak", "does not match"),
        ("slm-1.csv", "does not match"),
        ("slm 1.parquet", "does not match"),
        ("-slm.parquet", "does not match"),
        ("slm-8.parquet", "unknown model 'slm-8'"),
        ("crosscheck_slm-8.parquet", "cross-check of unknown model 'slm-8'"),
    ],
)
def test_classify_ignores_unknown_names_with_a_reason(name: str, reason_part: str) -> None:
    roles, ignored = classify([name, "slm-2.parquet"], MODELS)
    assert roles == {"slm-2.parquet": "result"}
    assert len(ignored) == 1
    assert ignored[0][0] == name
    assert reason_part in ignored[0][1]


def test_classify_handles_model_names_with_dots_and_underscores() -> None:
    models = ["m.v2", "m_v3"]
    roles, ignored = classify(
        ["m.v2.parquet", "crosscheck_m.v2.parquet", "m_v3.parquet", "m.parquet"], models
    )
    assert roles == {
        "m.v2.parquet": "result",
        "crosscheck_m.v2.parquet": "crosscheck",
        "m_v3.parquet": "result",
    }
    assert [n for n, _ in ignored] == ["m.parquet"]


# --- barrier -------------------------------------------------------------------------------


def test_barrier_is_complete_when_every_expected_model_is_valid() -> None:
    b = barrier(MODELS, reversed(MODELS))
    assert b.complete
    assert b.present == tuple(MODELS)
    assert b.missing == ()


def test_barrier_lists_missing_models_in_expected_order() -> None:
    b = barrier(MODELS, ["slm-5", "slm-1", "slm-9"])
    assert not b.complete
    assert b.present == ("slm-1", "slm-5")
    assert b.missing == ("slm-2", "slm-3", "slm-4", "slm-6", "slm-7")


def test_barrier_with_nothing_valid_is_incomplete() -> None:
    b = barrier(["a"], [])
    assert (b.complete, b.present, b.missing) == (False, (), ("a",))


# --- may_move: the one transition rule ----------------------------------------------------

# The rule written out move by move (docs/protocol.md §2), independently of the module: from
# each state, the states a batch may move to.
STEPS = ["ready", "staging", "staged", "crosschecking", "crosschecked", "aggregating"]
ALLOWED: dict[str, set[str]] = {
    "waiting": {"waiting", *STEPS, "committed", "failed"},
    **{s: {*STEPS, "committed", "failed"} for s in STEPS},
    "committed": {"committed", "archived", "done", "degraded"},
    "archived": {"archived", "done", "degraded"},
    "done": set(),
    "degraded": set(),
    "failed": set(),
}


def test_the_lifecycle_order_is_the_documented_one() -> None:
    assert [s.value for s in State][: len(PIPELINE)] == PIPELINE
    assert {s.value for s in FINAL} == {"done", "degraded", "failed"}
    assert set(ALLOWED) == {s.value for s in State}


@pytest.mark.parametrize(
    ("a", "b"), list(itertools.product(list(ALLOWED), list(ALLOWED))), ids=lambda s: str(s)
)
def test_may_move_allows_exactly_the_documented_moves(a: str, b: str) -> None:
    assert may_move(State(a), State(b)) is (b in ALLOWED[a])


@pytest.mark.parametrize("new", list(State))
def test_the_ledger_guard_is_the_rule_turned_round(new: State) -> None:
    assert moves_into(new) == {State(a) for a, to in ALLOWED.items() if new.value in to}


# --- resume_step ---------------------------------------------------------------------------

RESUME = {
    State.WAITING: "barrier",
    State.READY: "stage",
    State.STAGING: "stage",
    State.STAGED: "stage",
    State.CROSSCHECKING: "stage",
    State.CROSSCHECKED: "stage",
    State.AGGREGATING: "stage",
    State.COMMITTED: "archive",
    State.ARCHIVED: "cleanup",
    State.DONE: "none",
    State.DEGRADED: "none",
    State.FAILED: "none",
}


def test_resume_table_covers_every_state() -> None:
    assert set(RESUME) == set(State)


@pytest.mark.parametrize(("state", "step"), list(RESUME.items()))
def test_resume_step_for_each_state(state: State, step: str) -> None:
    got = resume_step(state)
    assert isinstance(got, Step)
    # The daemon compares the step with its name, logs it and passes it on as a string.
    assert got == step and got.value == step and f"{got}" == step and str(got) == step
    assert (got != "barrier") is (step != "barrier")
    assert Step(step) is got


def test_the_steps_are_the_ones_the_resume_table_names() -> None:
    assert {s.value for s in Step} == set(RESUME.values())


# --- deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("present", "quorum", "verdict"),
    [
        (7, 7, State.DEGRADED),
        (5, 5, State.DEGRADED),
        (6, 5, State.DEGRADED),
        (4, 5, State.FAILED),
        (0, 1, State.FAILED),
    ],
)
def test_deadline_goes_on_degraded_with_a_quorum_else_fails(
    present: int, quorum: int, verdict: State
) -> None:
    assert deadline_verdict(present, quorum) is verdict
